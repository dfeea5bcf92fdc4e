//! FLUX.2's autoencoder (diffusers' `AutoencoderKLFlux2`): the shared decoder network behind a
//! 1x1 `post_quant_conv`, with latents normalised by a batch norm's running statistics over
//! the 2x2-patchified channels instead of FLUX.1's scale and shift; and, where the checkpoint
//! has it, the encoder that turns reference images into tokens.

use crate::error::{Error, Result};
use crate::sampling;
use crate::vae::{groups, Decoder, Encoder, VaeConfig};
use crate::weights::Weights;
use candle_core::Tensor;
use serde::Deserialize;

/// diffusers' `vae/config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Flux2VaeConfig {
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default)]
    pub decoder_block_out_channels: Option<Vec<usize>>,
    pub layers_per_block: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "bn_eps")]
    pub batch_norm_eps: f64,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "patch")]
    pub patch_size: Vec<usize>,
}

fn bn_eps() -> f64 {
    1e-4
}
fn yes() -> bool {
    true
}
fn patch() -> Vec<usize> {
    vec![2, 2]
}

impl super::UpBlocks for Flux2VaeConfig {
    fn up_blocks(&self) -> usize {
        self.block_out_channels.len()
    }
}

impl Flux2VaeConfig {
    /// The decoder's `block_out_channels` (encoder order), where they differ from the encoder's.
    pub fn decoder_channels(&self) -> &[usize] {
        self.decoder_block_out_channels
            .as_deref()
            .unwrap_or(&self.block_out_channels)
    }

    /// The configuration of BFL's FLUX.2 `ae.safetensors`, read from its tensors (the
    /// GroupNorm groups excepted: BFL's are 32).
    pub(crate) fn infer_bfl(w: &Weights, norm_groups: usize) -> Result<Self> {
        let shared = VaeConfig::infer_bfl(w, norm_groups)?;
        Ok(Self {
            latent_channels: shared.latent_channels,
            block_out_channels: shared.block_out_channels,
            decoder_block_out_channels: None,
            layers_per_block: shared.layers_per_block,
            norm_num_groups: norm_groups,
            batch_norm_eps: bn_eps(),
            use_post_quant_conv: w.contains("decoder.post_quant_conv.weight"),
            use_quant_conv: w.contains("encoder.quant_conv.weight"),
            patch_size: patch(),
        })
    }

    /// Pixels per (un-patchified) latent pixel.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

pub(crate) struct Flux2Vae {
    cfg: Flux2VaeConfig,
    decoder: Decoder,
    /// Absent from checkpoints saved for text-to-image only.
    encoder: Option<Encoder>,
    /// The batch norm's running mean and `sqrt(running_var + eps)`, `(patchified channels,)`.
    bn_mean: Tensor,
    bn_std: Tensor,
}

impl Flux2Vae {
    pub(crate) fn load(cfg: Flux2VaeConfig, w: &Weights) -> Result<Self> {
        if cfg.patch_size != [2, 2] {
            return Err(Error::checkpoint(
                w.path(),
                "FLUX.2's autoencoder patchifies latents 2x2",
            ));
        }
        let decoder = Decoder::load(
            cfg.decoder_channels(),
            cfg.layers_per_block,
            cfg.norm_num_groups,
            cfg.use_post_quant_conv,
            w,
        )?;
        let encoder = if w.contains("encoder.conv_in.weight") {
            Some(Encoder::load(
                &cfg.block_out_channels,
                cfg.layers_per_block,
                cfg.norm_num_groups,
                cfg.use_quant_conv,
                w,
            )?)
        } else {
            None
        };
        let bn_mean = w.tensor("bn.running_mean")?;
        let bn_std = (w.tensor("bn.running_var")? + cfg.batch_norm_eps)?.sqrt()?;
        Ok(Self {
            cfg,
            decoder,
            encoder,
            bn_mean,
            bn_std,
        })
    }

    pub(crate) fn config(&self) -> &Flux2VaeConfig {
        &self.cfg
    }

    /// Packed diffusion-space tokens `(1, (h/2)*(w/2), 4*C)` to the decoder's latents
    /// `(1, C, h, w)`: the batch-norm statistics undone per patchified channel, then the 2x2
    /// patches unfolded (the packing order is FLUX.1's, so its `unpack` serves).
    pub(crate) fn denormalise(&self, packed: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let dtype = packed.dtype();
        let x = packed
            .broadcast_mul(&self.bn_std.to_dtype(dtype)?)?
            .broadcast_add(&self.bn_mean.to_dtype(dtype)?)?;
        sampling::unpack(&x, h, w)
    }

    /// An image in [-1, 1], `(1, 3, H, W)`, as packed normalised tokens
    /// `(1, (H/2f)*(W/2f), 4*C)`: the posterior's mean, patchified, batch-normalised
    /// (diffusers' `_encode_vae_image` then `_pack_latents`).
    pub(crate) fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let encoder = self.encoder.as_ref().ok_or_else(|| {
            Error::InvalidRequest(
                "this checkpoint's autoencoder has no encoder: reference images cannot be used"
                    .into(),
            )
        })?;
        let packed = sampling::pack(&encoder.mean(image)?)?;
        let dtype = packed.dtype();
        Ok(packed
            .broadcast_sub(&self.bn_mean.to_dtype(dtype)?)?
            .broadcast_div(&self.bn_std.to_dtype(dtype)?)?)
    }

    /// Images in [-1, 1], `(1, 3, H, W)`, from decoder-space latents.
    pub(crate) fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.forward(z)
    }
}
