//! How much of its device's memory a generation holds at its peak beyond the resident weights:
//! what a worker reserves from the device's budget before it runs a job
//! ([`kiln_core::engine::Engine::job_memory`]), so that jobs sharing a GPU never overcommit it.
//!
//! A generation's phases run one after another, so its peak is the largest phase's:
//! - the transformer's steps: a few hidden-width and MLP-width activations per token (image,
//!   text and reference tokens), plus the attention's scores, which kiln bounds to 256 MiB off
//!   the CPU (the CPU's attention works in small blocks);
//! - the autoencoder: its decoder's widest level (channels times that level's pixels) at the
//!   output's size, or its encoder's at a reference image's, the largest of them.
//!
//! Each phase is linear in its size, and its factor is measured, not derived: the constants
//! below are the measured peak over the phase's widest activation, rounded up (see their
//! comments). They are kiln's own (candle's convolutions through im2col on CUDA hold far more
//! than kiln's Winograd convolutions on the CPU), and the estimate is meant to be an upper
//! bound; `tests/memory.rs` checks that a real generation's growth stays under it.

use crate::options::Runtime;
use candle_core::Device;

/// What sizes a family's working memory.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryShape {
    /// The transformer's width and its MLP's.
    pub hidden: usize,
    pub mlp_hidden: usize,
    /// The autoencoder's `block_out_channels` (encoder order: full resolution first), whose
    /// decoder runs them in reverse.
    pub vae_channels: Vec<usize>,
}

/// A generation's sizes, in the units the phases scale with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobSize {
    /// Pixels of the image decoded (the generated size, before any upscaling).
    pub pixels: u64,
    /// Tokens the transformer attends over: image, text and reference tokens.
    pub tokens: u64,
    /// Pixels of the largest reference image the encoder reads (0 for none).
    pub reference_pixels: u64,
}

/// Activation values per token, in units of `hidden + mlp_hidden / 4` (two hidden widths in
/// FLUX's 4x MLP): a step holds the residual streams, the norms' outputs, q, k, v, the
/// attention's output and the MLP's hidden activation at once. Measured with `kiln-bench child
/// transformer-1024 --precision f32` (2026-12-05, AMD EPYC, 2 threads): a peak of 3437 MB
/// with 2182 MB of weights mapped, about 1.21 GB of activations over 4608 tokens, 10.7 units;
/// set at 12.
const TRANSFORMER_VALUES: u64 = 12;

/// The attention's scores at once: kiln's CPU kernel works a head per thread, each on a block of
/// queries, with at most 32 MiB of scores over all threads (`kiln_kernels::attention`); other
/// devices a group of heads or query rows of at most `layers::SCORES_BUDGET`.
const SCORES_CPU: u64 = 32 << 20;
const SCORES_OFF_CPU: u64 = crate::layers::SCORES_BUDGET as u64;

/// The decoder's peak over its widest activation (values of the activation dtype), by device:
/// - CPU: `kiln-bench child vae-decode-1024 --precision f32` (2026-12-05, AMD EPYC, 2
///   threads) grew 3.76 GB past its resident weights decoding 1024x1024 with FLUX's
///   autoencoder (widest: 256 channels at full resolution, f32 activations, which the CPU
///   keeps in bf16 too): 3.5x; set at 4.
/// - CUDA: 9.7 GB on an H200 for the same decode in bf16 (BENCHMARKS.md: 10357 MiB with the
///   CUDA context and weights), 19x (candle's im2col holds 9 copies of a level's input); set
///   at 22.
const DECODE_FACTOR_CPU: u64 = 4;
const DECODE_FACTOR_GPU: u64 = 22;

/// What every job holds besides its phases' peaks: the prompt's encoding, the latents, the
/// output image, and the allocator's slack.
const FIXED: u64 = 256 << 20;

/// About how many bytes a generation of `size` holds at its peak on `rt`'s device, beyond the
/// weights.
pub fn job_bytes(shape: &MemoryShape, rt: &Runtime, size: JobSize) -> u64 {
    let value = rt.dtype.size_in_bytes() as u64;
    let per_token = (shape.hidden + shape.mlp_hidden / 4) as u64 * TRANSFORMER_VALUES * value;
    let scores = match rt.device {
        Device::Cpu => SCORES_CPU,
        _ => SCORES_OFF_CPU,
    };
    let transformer = size.tokens * per_token + scores;
    let factor = match rt.device {
        Device::Cpu => DECODE_FACTOR_CPU,
        _ => DECODE_FACTOR_GPU,
    };
    let widest = widest_level(&shape.vae_channels);
    let autoencoder = factor * widest * size.pixels.max(size.reference_pixels) * value;
    FIXED + transformer.max(autoencoder)
}

/// The decoder's widest level, in channels per output pixel: the largest of each level's
/// channels (its input's and its own) over the pixels it works at, a quarter of the next
/// level's. The encoder's levels are the same sizes in the other direction, so this bounds
/// both.
fn widest_level(channels: &[usize]) -> u64 {
    let levels = channels.len();
    let decoder: Vec<u64> = channels.iter().rev().map(|&c| c as u64).collect();
    (0..levels)
        .map(|i| {
            let input = decoder[i.saturating_sub(1)];
            let shrink = 4u64.pow((levels - 1 - i) as u32);
            input.max(decoder[i]).div_ceil(shrink)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Products;
    use candle_core::DType;

    fn flux() -> MemoryShape {
        MemoryShape {
            hidden: 3072,
            mlp_hidden: 12288,
            vae_channels: vec![128, 256, 512, 512],
        }
    }

    #[test]
    fn the_widest_decoder_level_is_the_full_resolution_input() {
        // FLUX's decoder: 512, 512, 256, 128 channels; its last level reads 256 channels at
        // full resolution, the one before 512 at a quarter of the pixels.
        assert_eq!(widest_level(&[128, 256, 512, 512]), 256);
        // The demo checkpoint's.
        assert_eq!(widest_level(&[16, 32, 64, 64]), 32);
    }

    #[test]
    fn the_decode_dominates_a_large_image_and_grows_with_its_pixels() {
        let cpu = Runtime {
            device: Device::Cpu,
            dtype: DType::F32,
            products: Products::Native,
        };
        let at = |side: u64| JobSize {
            pixels: side * side,
            tokens: (side / 16) * (side / 16) + 512,
            reference_pixels: 0,
        };
        let mib = |b: u64| b >> 20;
        // 4 x 256 x 1 MiPx x 4 bytes + 256 MiB.
        assert_eq!(mib(job_bytes(&flux(), &cpu, at(1024))), 4096 + 256);
        assert_eq!(mib(job_bytes(&flux(), &cpu, at(2048))), 4 * 4096 + 256);
        // A reference larger than the output sizes the encoder's phase.
        let edit = JobSize {
            reference_pixels: 4 << 20,
            ..at(1024)
        };
        assert_eq!(mib(job_bytes(&flux(), &cpu, edit)), 4 * 4096 + 256);
    }
}
