//! The FLUX.2 transformer (diffusers' `Flux2Transformer2DModel`), in diffusers' tensor names:
//! no biases, one modulation per stream shared by all blocks, SwiGLU feed-forwards, single
//! blocks with fused qkv+MLP projections, 4-axis RoPE.

use crate::error::{Error, Result};
use crate::layers::blocks::{
    count_indexed, heads, load_blocks, modulation, single_stream_residual, DoubleStreams,
    FeedForward, FinalLayer, Qkv, Rope, TimeEmbed, IMAGE_QKV, NORM_EPS, TEXT_QKV,
};
use crate::layers::{modulated_layer_norm, Linear};
use crate::options::LoadProgress;
use crate::weights::Weights;
use candle_core::{Device, Tensor, D};
use serde::Deserialize;

/// The transformer's shape, as diffusers' `transformer/config.json` states it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Flux2TransformerConfig {
    #[serde(default = "one")]
    pub patch_size: usize,
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    #[serde(default = "guidance_channels")]
    pub timestep_guidance_channels: usize,
    #[serde(default = "mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "axes")]
    pub axes_dims_rope: Vec<usize>,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default = "yes")]
    pub guidance_embeds: bool,
}

fn one() -> usize {
    1
}
fn guidance_channels() -> usize {
    256
}
fn mlp_ratio() -> f64 {
    3.0
}
fn axes() -> Vec<usize> {
    vec![32, 32, 32, 32]
}
fn theta() -> f64 {
    2000.0
}
fn yes() -> bool {
    true
}

impl Flux2TransformerConfig {
    /// The configuration of a BFL-named FLUX.2 transformer (`prefix` precedes BFL's names),
    /// from its tensors' shapes and names. The RoPE split is not stored: FLUX.2's four equal
    /// axes (32 each of 128) and theta 2000 are assumed.
    pub(crate) fn infer_bfl(w: &Weights, prefix: &str) -> Result<Self> {
        let shape = |n: &str| {
            w.stored_shape(&format!("{prefix}{n}")).ok_or_else(|| {
                Error::checkpoint(
                    w.path(),
                    format!("not a FLUX.2 transformer: no {prefix}{n}"),
                )
            })
        };
        let names = w.stored_names();
        let count = |stem: &str| count_indexed(&names, &format!("{prefix}{stem}."));
        let img_in = shape("img_in.weight")?;
        let hidden = img_in[0];
        let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")?[0];
        let mlp_in = shape("double_blocks.0.img_mlp.0.weight")?[0];
        Ok(Self {
            patch_size: 1,
            in_channels: img_in[1],
            // As diffusers' config.json has it: unset when equal to the input's.
            out_channels: Some(shape("final_layer.linear.weight")?[0]).filter(|&o| o != img_in[1]),
            num_layers: count("double_blocks"),
            num_single_layers: count("single_blocks"),
            attention_head_dim: head_dim,
            num_attention_heads: hidden / head_dim,
            joint_attention_dim: shape("txt_in.weight")?[1],
            timestep_guidance_channels: shape("time_in.in_layer.weight")?[1],
            mlp_ratio: mlp_in as f64 / (2 * hidden) as f64,
            axes_dims_rope: vec![head_dim / 4; 4],
            rope_theta: theta(),
            guidance_embeds: names.contains(&format!("{prefix}guidance_in.in_layer.weight")),
        })
    }

    pub fn hidden(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    pub(crate) fn mlp_hidden(&self) -> usize {
        (self.hidden() as f64 * self.mlp_ratio) as usize
    }
}

/// `linear_in` (gate and value halves), SwiGLU, `linear_out`.
struct SwiGlu {
    linear_in: Linear,
    linear_out: Linear,
}

impl SwiGlu {
    fn load(w: &Weights, p: &str) -> Result<Self> {
        Ok(Self {
            linear_in: w.linear(&format!("{p}.linear_in"))?,
            linear_out: w.linear(&format!("{p}.linear_out"))?,
        })
    }
}

impl FeedForward for SwiGlu {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_out
            .forward(&swiglu(&self.linear_in.forward(x)?)?)
    }
}

/// `silu(first half) * second half` of the last dimension.
fn swiglu(x: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    x.narrow(D::Minus1, 0, half)?.silu()? * x.narrow(D::Minus1, half, half)?
}

struct SingleBlock {
    qkv_mlp: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    out: Linear,
}

pub(crate) struct Flux2Transformer {
    cfg: Flux2TransformerConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    time: TimeEmbed,
    mod_img: Linear,
    mod_txt: Linear,
    mod_single: Linear,
    double: Vec<DoubleStreams<SwiGlu>>,
    single: Vec<SingleBlock>,
    out: FinalLayer,
}

impl Flux2Transformer {
    pub(crate) fn load(
        cfg: Flux2TransformerConfig,
        w: &Weights,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        if cfg.patch_size != 1 {
            return Err(Error::checkpoint(
                w.path(),
                "only patch_size 1 (FLUX.2) is supported",
            ));
        }
        if cfg.axes_dims_rope.len() != 4
            || cfg.axes_dims_rope.iter().sum::<usize>() != cfg.attention_head_dim
        {
            return Err(Error::checkpoint(
                w.path(),
                "FLUX.2's RoPE has 4 axes that split the head dimension",
            ));
        }
        let total = cfg.num_layers + cfg.num_single_layers;
        let double = load_blocks(cfg.num_layers, (0, total), progress, |i| {
            let p = format!("transformer_blocks.{i}");
            Ok(DoubleStreams {
                img_qkv: Qkv::load(w, &p, IMAGE_QKV)?,
                txt_qkv: Qkv::load(w, &p, TEXT_QKV)?,
                img_out: w.linear(&format!("{p}.attn.to_out.0"))?,
                txt_out: w.linear(&format!("{p}.attn.to_add_out"))?,
                img_ff: SwiGlu::load(w, &format!("{p}.ff"))?,
                txt_ff: SwiGlu::load(w, &format!("{p}.ff_context"))?,
            })
        })?;
        let single = load_blocks(
            cfg.num_single_layers,
            (cfg.num_layers, total),
            progress,
            |i| {
                let p = format!("single_transformer_blocks.{i}.attn");
                Ok(SingleBlock {
                    qkv_mlp: w.linear(&format!("{p}.to_qkv_mlp_proj"))?,
                    norm_q: w.tensor(&format!("{p}.norm_q.weight"))?,
                    norm_k: w.tensor(&format!("{p}.norm_k.weight"))?,
                    out: w.linear(&format!("{p}.to_out"))?,
                })
            },
        )?;
        let tge = "time_guidance_embed";
        let has_guidance = w.contains(&format!("{tge}.guidance_embedder.linear_1.weight"));
        let channels = cfg.timestep_guidance_channels;
        Ok(Self {
            x_embedder: w.linear("x_embedder")?,
            context_embedder: w.linear("context_embedder")?,
            time: TimeEmbed::load(w, tge, has_guidance, channels)?,
            mod_img: w.linear("double_stream_modulation_img.linear")?,
            mod_txt: w.linear("double_stream_modulation_txt.linear")?,
            mod_single: w.linear("single_stream_modulation.linear")?,
            double,
            single,
            out: FinalLayer::load(w)?,
            cfg: Flux2TransformerConfig {
                guidance_embeds: has_guidance,
                ..cfg
            },
        })
    }

    pub(crate) fn config(&self) -> &Flux2TransformerConfig {
        &self.cfg
    }

    /// RoPE tables for `txt_len` text tokens (ids `(0, 0, 0, l)`), an `h x w` grid of image
    /// tokens (ids `(0, row, col, 0)`), then each reference image's grid `(h_i, w_i)` at time
    /// `10 + 10 i` (diffusers' `_prepare_image_ids`).
    pub(crate) fn rope(
        &self,
        txt_len: usize,
        (h, w): (usize, usize),
        references: &[(usize, usize)],
        dev: &Device,
    ) -> Result<Rope> {
        let grid = |t: f64, h: usize, w: usize| {
            (0..h).flat_map(move |r| (0..w).map(move |c| [t, r as f64, c as f64, 0.0]))
        };
        let positions = (0..txt_len)
            .map(|l| [0.0, 0.0, 0.0, l as f64])
            .chain(grid(0.0, h, w))
            .chain(
                references
                    .iter()
                    .enumerate()
                    .flat_map(move |(i, &(rh, rw))| grid(10.0 + 10.0 * i as f64, rh, rw)),
            );
        Rope::new(
            positions,
            &self.cfg.axes_dims_rope,
            self.cfg.rope_theta,
            dev,
        )
    }

    /// The velocity for packed latents `img (1, tokens, in_channels)` given text embeddings
    /// `txt (1, txt_len, joint_dim)`. `timestep` and `guidance` are as the transformer sees
    /// them (`* 1000`), rounded to the compute dtype as diffusers rounds them.
    pub(crate) fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        timestep: f32,
        guidance: Option<f32>,
        rope: &Rope,
    ) -> Result<Tensor> {
        let dtype = img.dtype();
        let temb_act = self
            .time
            .forward(timestep, guidance, img.device(), dtype)?
            .silu()?;
        let im = modulation(&self.mod_img, &temb_act, 6)?;
        let tm = modulation(&self.mod_txt, &temb_act, 6)?;
        let sm = modulation(&self.mod_single, &temb_act, 3)?;
        let mut img = self.x_embedder.forward(img)?;
        let mut txt = self.context_embedder.forward(txt)?;
        let heads = self.cfg.num_attention_heads;
        let txt_len = txt.dim(1)?;
        for b in &self.double {
            (img, txt) = b.forward(&img, &txt, &im, &tm, heads, rope)?;
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for b in &self.single {
            x = self.single_block(b, &x, &sm, rope)?;
        }
        Ok(self.out.forward(&x, txt_len, &temb_act)?.to_dtype(dtype)?)
    }

    /// A single-stream block: one fused projection gives q, k, v (RMS-normed) and the SwiGLU
    /// MLP's input, all modulated by the shared single-stream vectors `sm`.
    fn single_block(
        &self,
        b: &SingleBlock,
        x: &Tensor,
        sm: &[Tensor],
        rope: &Rope,
    ) -> Result<Tensor> {
        let n_heads = self.cfg.num_attention_heads;
        let inner = self.cfg.hidden();
        let n = modulated_layer_norm(x, &sm[0], &sm[1], NORM_EPS)?;
        let proj = b.qkv_mlp.forward(&n)?;
        let part = |i: usize| proj.narrow(D::Minus1, i * inner, inner);
        let q = heads(&[(&part(0)?, Some(&b.norm_q))], n_heads, Some(rope))?;
        let k = heads(&[(&part(1)?, Some(&b.norm_k))], n_heads, Some(rope))?;
        let v = heads(&[(&part(2)?, None)], n_heads, None)?;
        let mlp = swiglu(&proj.narrow(D::Minus1, 3 * inner, 2 * self.cfg.mlp_hidden())?)?;
        single_stream_residual(x, (&q, &k, &v), mlp, &b.out, &sm[2])
    }
}
