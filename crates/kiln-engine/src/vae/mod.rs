//! The autoencoders: the encoder and decoder networks FLUX.1 and FLUX.2 share, FLUX.1's
//! decoder (diffusers' `AutoencoderKL`, 16 latent channels) here, FLUX.2's in [`flux2`].

pub(crate) mod flux2;

use crate::error::{Error, Result};
use crate::layers::blocks::count_indexed;
use crate::layers::{attention_in, Conv2d, GroupNorm, Linear};
use crate::weights::Weights;
use candle_core::Tensor;
use serde::Deserialize;

const EPS: f64 = 1e-6;

/// How many up blocks a VAE configuration's decoder has (what BFL's tensor names count).
pub(crate) trait UpBlocks {
    fn up_blocks(&self) -> usize;
}

impl UpBlocks for VaeConfig {
    fn up_blocks(&self) -> usize {
        self.block_out_channels.len()
    }
}

/// The decoder's shape and latent normalisation. Read from diffusers' `vae/config.json`, or
/// inferred from BFL's `ae.safetensors` with FLUX.1's normalisation constants, which that
/// file does not store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub use_post_quant_conv: Option<bool>,
}

pub(crate) fn groups() -> usize {
    32
}

impl VaeConfig {
    /// Pixels per latent pixel.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The configuration of BFL's `ae.safetensors` (FLUX.1's or FLUX.2's), read from the
    /// tensors; the GroupNorm groups cannot be, so they are given (BFL's: [`groups`]).
    pub(crate) fn infer_bfl(w: &Weights, norm_groups: usize) -> Result<Self> {
        let names = w.stored_names();
        let levels = count_indexed(&names, "decoder.up.");
        let conv_in = w.stored_shape("decoder.conv_in.weight").ok_or_else(|| {
            Error::checkpoint(
                w.path(),
                "not a FLUX autoencoder: no decoder.conv_in.weight",
            )
        })?;
        let block_out_channels = (0..levels)
            .map(|i| {
                w.stored_shape(&format!("decoder.up.{i}.block.0.conv2.weight"))
                    .map(|s| s[0])
                    .ok_or_else(|| {
                        Error::checkpoint(w.path(), format!("no decoder.up.{i}.block.0"))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            latent_channels: conv_in[1],
            block_out_channels,
            layers_per_block: count_indexed(&names, "decoder.up.0.block.") - 1,
            norm_num_groups: norm_groups,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            use_post_quant_conv: Some(false),
        })
    }
}

fn conv(w: &Weights, p: &str, padding: usize) -> Result<Conv2d> {
    conv_strided(w, p, padding, 1)
}

fn conv_strided(w: &Weights, p: &str, padding: usize, stride: usize) -> Result<Conv2d> {
    w.conv2d(p, padding, stride)
}

fn group_norm(w: &Weights, p: &str, channels: usize, groups: usize) -> Result<GroupNorm> {
    let weight = w.tensor(&format!("{p}.weight"))?;
    if weight.dims() != [channels] {
        return Err(Error::checkpoint(
            w.path(),
            format!("{p}.weight is {:?}, expected [{channels}]", weight.dims()),
        ));
    }
    Ok(GroupNorm::new(
        weight,
        w.tensor(&format!("{p}.bias"))?,
        groups,
        EPS,
    )?)
}

struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn load(w: &Weights, p: &str, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(w, &format!("{p}.norm1"), cin, groups)?,
            conv1: conv(w, &format!("{p}.conv1"), 1)?,
            norm2: group_norm(w, &format!("{p}.norm2"), cout, groups)?,
            conv2: conv(w, &format!("{p}.conv2"), 1)?,
            shortcut: if cin != cout {
                Some(conv(w, &format!("{p}.conv_shortcut"), 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The mid block's single-head self-attention over all pixels.
struct PixelAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl PixelAttention {
    fn load(w: &Weights, p: &str, channels: usize, groups: usize) -> Result<Self> {
        // BFL stores these projections as 1x1 convolutions: flatten them to matrices.
        let lin = |n: &str| -> Result<Linear> {
            let weight = w
                .tensor(&format!("{p}.{n}.weight"))?
                .reshape((channels, channels))?;
            w.dense_linear(weight, Some(w.tensor(&format!("{p}.{n}.bias"))?))
        };
        Ok(Self {
            norm: group_norm(w, &format!("{p}.group_norm"), channels, groups)?,
            q: lin("to_q")?,
            k: lin("to_k")?,
            v: lin("to_v")?,
            out: lin("to_out.0")?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .unsqueeze(1)?;
        // The products of the scores and the weighted values run in the projections'
        // precision, as the transformer's attention does.
        let a = attention_in(
            self.q.products(),
            &self.q.forward(&n)?,
            &self.k.forward(&n)?,
            &self.v.forward(&n)?,
            1.0 / (c as f64).sqrt(),
            None,
        )?;
        let a = self
            .out
            .forward(&a)?
            .squeeze(1)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        x + a
    }
}

/// Resnet, single-head attention, resnet: the middle of both coders.
struct MidBlock(Resnet, PixelAttention, Resnet);

impl MidBlock {
    fn load(w: &Weights, p: &str, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self(
            Resnet::load(w, &format!("{p}.resnets.0"), channels, channels, groups)?,
            PixelAttention::load(w, &format!("{p}.attentions.0"), channels, groups)?,
            Resnet::load(w, &format!("{p}.resnets.1"), channels, channels, groups)?,
        ))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.2.forward(&self.1.forward(&self.0.forward(x)?)?)
    }
}

struct DownBlock {
    resnets: Vec<Resnet>,
    /// A 3x3 convolution of stride 2 after zero padding on the right and bottom only.
    downsample: Option<Conv2d>,
}

/// The encoder network of diffusers' `Encoder` (two latent halves: mean and log-variance)
/// and the `quant_conv` after it, for FLUX.2's reference images.
pub(crate) struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl Encoder {
    pub(crate) fn load(
        block_out_channels: &[usize],
        layers_per_block: usize,
        groups: usize,
        quant_conv: bool,
        w: &Weights,
    ) -> Result<Self> {
        let g = groups;
        let mut down = Vec::with_capacity(block_out_channels.len());
        let mut cin = block_out_channels[0];
        for (i, &cout) in block_out_channels.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let mut resnets = Vec::with_capacity(layers_per_block);
            for j in 0..layers_per_block {
                resnets.push(Resnet::load(w, &format!("{p}.resnets.{j}"), cin, cout, g)?);
                cin = cout;
            }
            let downsample = if i + 1 < block_out_channels.len() {
                Some(conv_strided(w, &format!("{p}.downsamplers.0.conv"), 0, 2)?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                downsample,
            });
        }
        Ok(Self {
            conv_in: conv(w, "encoder.conv_in", 1)?,
            down,
            mid: MidBlock::load(w, "encoder.mid_block", cin, g)?,
            norm_out: group_norm(w, "encoder.conv_norm_out", cin, g)?,
            conv_out: conv(w, "encoder.conv_out", 1)?,
            quant_conv: if quant_conv {
                Some(conv(w, "quant_conv", 0)?)
            } else {
                None
            },
        })
    }

    /// The posterior's mean `(batch, C, H/f, W/f)` (diffusers' `latent_dist.mode()`) for
    /// images in [-1, 1], `(batch, 3, H, W)`.
    pub(crate) fn mean(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down {
            for r in &block.resnets {
                h = r.forward(&h)?;
            }
            if let Some(conv) = &block.downsample {
                h = conv.forward(&h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        h = self.mid.forward(&h)?;
        h = self.conv_out.forward(&self.norm_out.forward_silu(&h)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let c = h.dim(1)? / 2;
        Ok(h.narrow(1, 0, c)?)
    }
}

struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Conv2d>,
}

/// The decoder network of diffusers' `Decoder`, which FLUX.1's and FLUX.2's autoencoders share
/// (FLUX.2's adds a 1x1 `post_quant_conv` in front). It takes latents in the decoder's own
/// space; each model's latent normalisation is undone by its caller.
pub(crate) struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub(crate) fn load(
        block_out_channels: &[usize],
        layers_per_block: usize,
        groups: usize,
        post_quant_conv: bool,
        w: &Weights,
    ) -> Result<Self> {
        let g = groups;
        let chans: Vec<usize> = block_out_channels.iter().rev().copied().collect();
        let top = chans[0];
        let mid = MidBlock::load(w, "decoder.mid_block", top, g)?;
        let mut up = Vec::with_capacity(chans.len());
        let mut cin = top;
        for (i, &cout) in chans.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let mut resnets = Vec::with_capacity(layers_per_block + 1);
            for j in 0..=layers_per_block {
                resnets.push(Resnet::load(w, &format!("{p}.resnets.{j}"), cin, cout, g)?);
                cin = cout;
            }
            let upsample = if i + 1 < chans.len() {
                Some(conv(w, &format!("{p}.upsamplers.0.conv"), 1)?)
            } else {
                None
            };
            up.push(UpBlock { resnets, upsample });
        }
        Ok(Self {
            post_quant_conv: if post_quant_conv {
                Some(conv(w, "post_quant_conv", 0)?)
            } else {
                None
            },
            conv_in: conv(w, "decoder.conv_in", 1)?,
            mid,
            up,
            norm_out: group_norm(w, "decoder.conv_norm_out", cin, g)?,
            conv_out: conv(w, "decoder.conv_out", 1)?,
        })
    }

    /// Images in [-1, 1], `(batch, 3, H, W)`, from decoder-space latents `(batch, C, h, w)`.
    pub(crate) fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid.forward(&x)?;
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = &block.upsample {
                let (_, _, h, w) = x.dims4()?;
                x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        let x = self.norm_out.forward_silu(&x)?;
        Ok(self.conv_out.forward(&x)?)
    }
}

/// FLUX.1's decoder with its scale/shift latent normalisation.
pub(crate) struct VaeDecoder {
    cfg: VaeConfig,
    decoder: Decoder,
}

impl VaeDecoder {
    pub(crate) fn load(cfg: VaeConfig, w: &Weights) -> Result<Self> {
        if cfg.use_post_quant_conv == Some(true) {
            return Err(Error::checkpoint(
                w.path(),
                "a VAE with post_quant_conv is not FLUX.1's",
            ));
        }
        let decoder = Decoder::load(
            &cfg.block_out_channels,
            cfg.layers_per_block,
            cfg.norm_num_groups,
            false,
            w,
        )?;
        Ok(Self { cfg, decoder })
    }

    pub(crate) fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Images in [-1, 1], `(batch, 3, H, W)`, from diffusion-space latents `(batch, C, h, w)`
    /// (un-normalised here: `z / scale + shift`).
    pub(crate) fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = (z / self.cfg.scaling_factor)?;
        let z = match self.cfg.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        };
        self.decoder.forward(&z)
    }
}
