//! kiln's FLUX.1 inference engine (dev, schnell and their fine-tunes) on candle.
//!
//! Two ways in: [`Flux1Engine`], kiln-core's [`kiln_core::engine::Engine`] for the worker, built
//! from an operator's [`Flux1Config`]; and [`Flux1Pipeline`], the direct API `kiln generate`
//! uses (explicit sizes, steps, seeds, initial latents, final latents).
//!
//! # Layout
//! - [`checkpoint`]: which layout a directory holds (diffusers folder, BFL single files, GGUF
//!   transformer) and where each part is; a clear error for anything else.
//! - `weights`: memory-mapped safetensors/GGUF tensors, the BFL -> diffusers name mapping,
//!   quantized tensors kept quantized.
//! - `nn`: linear layers (dense or quantized), attention, norms.
//! - `tokenizer`: CLIP's BPE from `vocab.json` + `merges.txt`, T5's `tokenizer.json`.
//! - `clip`, `t5`: the text encoders (pooled CLIP vector, T5 hidden states).
//! - `transformer`: the FLUX.1 transformer, RoPE in f32.
//! - `vae`: the autoencoder's decoder.
//! - [`sampling`]: noise, packing, the shifted schedule, Euler steps.
//! - `image_io`: RGB from the decoder, latent previews (encoding is `kiln_core::image_file`).
//! - [`pipeline`]: [`Flux1Pipeline`], loading and running a whole generation.
//! - `engine`: [`Flux1Engine`] and its configuration (defaults, raw mode).
//! - [`flux2`]: FLUX.2 klein ([`flux2::Flux2Pipeline`]), its own module tree on the pieces above.
//! - `error`: the crate's [`Error`].

pub mod bench;
pub mod checkpoint;
mod clip;
mod engine;
mod error;
pub mod flux2;
mod image_io;
mod nn;
pub mod pipeline;
pub mod sampling;
mod t5;
mod tokenizer;
mod transformer;
mod vae;
mod weights;

pub use candle_core::Tensor;
pub use checkpoint::{
    checkpoint_family, checkpoint_name, CheckpointFiles, CheckpointSettings, Layout, WeightFormat,
};
pub use clip::ClipTextConfig;
pub use engine::{Flux1Config, Flux1Engine, RawModeConfig};
pub use error::{Error, Result};
pub use flux2::{Flux2Config, Flux2Engine, Flux2Pipeline};
pub use pipeline::{
    read_latents, write_latents, DeviceSpec, EngineOptions, Flux1Pipeline, LoadProgress,
    PipelineOutput, PipelineRequest, Precision, PromptEmbeddings, SamplingDefaults, Variant,
};
pub use t5::T5Config;
pub use transformer::TransformerConfig;
pub use vae::VaeConfig;

/// Loads the CPU's matrix-product library (OpenBLAS where the machine has it) now rather than
/// at the first product, and says which it is and with which kernels. Binaries call it first
/// thing in `main`, before other threads exist: loading may set an environment variable for
/// OpenBLAS (see `kiln_kernels::gemm`).
pub fn load_cpu_kernels() -> String {
    kiln_kernels::gemm::describe()
}
