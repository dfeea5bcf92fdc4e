//! kiln's inference engine on candle: FLUX.1 (dev, schnell and their fine-tunes) and FLUX.2
//! (dev, klein), text-to-image and, for FLUX.2, editing with reference images.
//!
//! Two ways in: [`ModelEngine`], kiln-core's [`kiln_core::engine::Engine`] for the worker,
//! built from an operator's [`ModelConfig`]; and [`Pipeline`], the direct API `kiln generate`
//! and the parity tests use (explicit sizes, steps, seeds, initial latents, final latents).
//! Both are generic over a model [`Family`]: [`Flux1`] or [`Flux2`].
//!
//! # Layout
//! - [`pipeline`]: the [`Family`] trait and the one generation path every family runs.
//! - `engine`: [`ModelEngine`] and its [`ModelConfig`]: deployment defaults, route options
//!   (raw mode, prompt expansion), an edit's output size.
//! - [`options`]: device, precision, load progress, sampling defaults.
//! - [`memory`]: the memory a generation holds beyond the weights, for workers' budgets.
//! - [`checkpoint`]: which layout a directory holds and where each part is; shared loaders.
//! - `weights`: memory-mapped safetensors/GGUF tensors, the BFL -> diffusers name maps,
//!   quantized tensors kept quantized.
//! - `layers`: linear layers (dense or quantized), attention, norms; `layers::blocks` the
//!   transformer blocks both families share (double-stream attention, RoPE, timestep
//!   embedding).
//! - [`text`]: CLIP, T5 and the decoder-only language models (Qwen3, Mistral), tokenizers,
//!   chat templates.
//! - `vae`: the autoencoder (FLUX.1's decoder; `vae::flux2` FLUX.2's, with its encoder).
//! - [`sampling`]: noise, packing, the shifted schedule, the Euler loop.
//! - `image_io`: RGB from the decoder, latent previews (encoding is `kiln_core::image_file`).
//! - [`flux1`], [`flux2`]: each family's models and its [`Family`] implementation.
//! - [`bench`] (feature `bench`): the benchmark's workloads.
//! - `error`: the crate's [`Error`].

#[cfg(feature = "bench")]
pub mod bench;
pub mod checkpoint;
mod engine;
mod error;
pub mod flux1;
pub mod flux2;
mod image_io;
mod layers;
pub mod memory;
pub mod options;
pub mod pipeline;
pub mod sampling;
pub mod text;
mod vae;
mod weights;

pub use candle_core::Tensor;
pub use checkpoint::{
    checkpoint_family, checkpoint_name, CheckpointFiles, CheckpointSettings, Layout, WeightFormat,
};
pub use engine::{Flux1Engine, Flux2Engine, ModelConfig, ModelEngine, RawModeConfig};
pub use error::{Error, Result};
pub use flux1::transformer::TransformerConfig;
pub use flux1::{Flux1, Flux1Pipeline, PromptEmbeddings, Variant};
pub use flux2::{Flux2, Flux2Pipeline};
pub use options::{
    free_memory, DeviceSpec, EngineOptions, LoadProgress, Precision, Products, Runtime,
    SamplingDefaults,
};
pub use pipeline::{
    read_latents, write_latents, Expanded, Expansion, Family, Pipeline, PipelineOutput,
    PipelineRequest,
};
pub use text::clip::ClipTextConfig;
pub use text::t5::T5Config;
pub use vae::VaeConfig;

/// Loads the CPU's matrix-product library (OpenBLAS where the machine has it) now rather than
/// at the first product, and says which it is and with which kernels. Binaries call it first
/// thing in `main`, before other threads exist: loading may set an environment variable for
/// OpenBLAS (see `kiln_kernels::gemm`).
pub fn load_cpu_kernels() -> String {
    format!(
        "{}; bf16 products: {}",
        kiln_kernels::gemm::describe(),
        cpu_bf16_kernel().unwrap_or("none (this CPU has neither AMX-BF16 nor AVX512-BF16)")
    )
}

/// The environment variable that narrows the CPU's bf16 kernel (`avx512-bf16`, `none`).
pub use kiln_kernels::bf16::KERNEL_VARIABLE as BF16_KERNEL_VARIABLE;

/// What runs bf16 products on this CPU (AMX tiles or AVX512-BF16), if anything does.
pub fn cpu_bf16_kernel() -> Option<&'static str> {
    kiln_kernels::bf16::kernel().map(|k| k.name())
}
