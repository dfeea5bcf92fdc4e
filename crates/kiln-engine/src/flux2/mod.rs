//! FLUX.2 on candle, written from diffusers' `transformer_flux2.py`, `pipeline_flux2.py`,
//! `pipeline_flux2_klein.py` and `autoencoder_kl_flux2.py`, on the FLUX.1 engine's weights, layers and sampler.
//!
//! # Layout
//! - `lm`: the text encoders (klein's Qwen3, dev's Mistral), stacked hidden states of chosen
//!   layers.
//! - `transformer`: the FLUX.2 transformer (shared modulation, SwiGLU, 4-axis RoPE).
//! - `vae`: the FLUX.2 autoencoder: decoder with its batch-norm latent denormalisation, and
//!   the encoder for reference images.
//! - [`sampling`]: the empirical-mu schedule and channels-last packing.
//! - [`pipeline`]: [`Flux2Pipeline`], loading and running a whole generation (dev, klein),
//!   text-to-image or with reference images.
//! - `engine`: [`Flux2Engine`] and its [`Flux2Config`], kiln-core's `Engine` for the worker.

mod engine;
mod lm;
pub mod pipeline;
pub mod sampling;
mod transformer;
mod vae;

pub use engine::{Flux2Config, Flux2Engine};
pub use lm::{LmConfig, TokenChoice};
pub use pipeline::{
    mistral_chat_text, qwen3_chat_text, Expansion, Flux2Pipeline, Flux2PromptEmbeddings,
    Flux2Variant, EXPANSION_MAX_NEW_TOKENS, EXPANSION_TEMPERATURE, SYSTEM_MESSAGE,
    SYSTEM_MESSAGE_UPSAMPLING_T2I,
};
pub use transformer::Flux2TransformerConfig;
pub use vae::Flux2VaeConfig;
