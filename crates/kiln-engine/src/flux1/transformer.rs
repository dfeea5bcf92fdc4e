//! The FLUX.1 transformer (diffusers' `FluxTransformer2DModel`), in diffusers' tensor names.

use crate::error::{Error, Result};
use crate::layers::blocks::{
    count_indexed, load_blocks, modulation, single_stream_residual, DoubleStreams, FeedForward,
    FinalLayer, Mlp2, Qkv, Rope, TimeEmbed, IMAGE_QKV, NORM_EPS, TEXT_QKV, TIME_PROJ_DIM,
};
use crate::layers::{modulated_layer_norm, Linear};
use crate::options::LoadProgress;
use crate::weights::Weights;
use candle_core::{Device, Tensor};
use serde::Deserialize;

/// The transformer's shape. Read from diffusers' `transformer/config.json`, or inferred from a
/// BFL file's tensors. Whether it has a guidance embedding (dev) is always read from the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub depth: usize,
    pub depth_single: usize,
    pub joint_dim: usize,
    pub pooled_dim: usize,
    pub mlp_hidden: usize,
    pub axes_dim: Vec<usize>,
    pub theta: f64,
    pub guidance_embeds: bool,
}

/// diffusers' `transformer/config.json`.
#[derive(Deserialize)]
struct DiffusersConfig {
    #[serde(default = "one")]
    patch_size: usize,
    in_channels: usize,
    out_channels: Option<usize>,
    num_layers: usize,
    num_single_layers: usize,
    attention_head_dim: usize,
    num_attention_heads: usize,
    joint_attention_dim: usize,
    pooled_projection_dim: usize,
    #[serde(default = "flux_axes")]
    axes_dims_rope: Vec<usize>,
}

fn one() -> usize {
    1
}
fn flux_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

impl TransformerConfig {
    pub(crate) fn from_diffusers_json(text: &str, w: &Weights) -> Result<Self> {
        let c: DiffusersConfig = serde_json::from_str(text)
            .map_err(|e| Error::checkpoint(w.path(), format!("transformer config.json: {e}")))?;
        if c.patch_size != 1 {
            return Err(Error::checkpoint(
                w.path(),
                "only patch_size 1 (FLUX.1) is supported",
            ));
        }
        let hidden = c.num_attention_heads * c.attention_head_dim;
        let mlp_hidden = w
            .shape("single_transformer_blocks.0.proj_mlp.weight")
            .map(|s| s[0])
            .unwrap_or(4 * hidden);
        Ok(Self {
            in_channels: c.in_channels,
            out_channels: c.out_channels.unwrap_or(c.in_channels),
            num_heads: c.num_attention_heads,
            head_dim: c.attention_head_dim,
            depth: c.num_layers,
            depth_single: c.num_single_layers,
            joint_dim: c.joint_attention_dim,
            pooled_dim: c.pooled_projection_dim,
            mlp_hidden,
            axes_dim: c.axes_dims_rope,
            theta: 10_000.0,
            guidance_embeds: w.contains("time_text_embed.guidance_embedder.linear_1.weight"),
        })
    }

    /// The configuration of a BFL-named transformer, from its tensors' shapes and names
    /// (`prefix` is what precedes BFL's names). The RoPE axes are not stored: FLUX.1's split of
    /// the head dimension (16, 56, 56 of 128) is scaled to the head dimension found.
    pub(crate) fn infer_bfl(w: &Weights, prefix: &str) -> Result<Self> {
        let names = w.stored_names();
        let shape = |n: &str| {
            w.stored_shape(&format!("{prefix}{n}")).ok_or_else(|| {
                Error::checkpoint(
                    w.path(),
                    format!("not a FLUX.1 transformer: no {prefix}{n}"),
                )
            })
        };
        let img_in = shape("img_in.weight")?;
        let hidden = img_in[0];
        let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")?[0];
        let count = |stem: &str| count_indexed(&names, &format!("{prefix}{stem}."));
        let axes_side = (head_dim * 7 / 16) & !1;
        Ok(Self {
            in_channels: img_in[1],
            out_channels: shape("final_layer.linear.weight")?[0],
            num_heads: hidden / head_dim,
            head_dim,
            depth: count("double_blocks"),
            depth_single: count("single_blocks"),
            joint_dim: shape("txt_in.weight")?[1],
            pooled_dim: shape("vector_in.in_layer.weight")?[1],
            mlp_hidden: shape("double_blocks.0.img_mlp.0.weight")?[0],
            axes_dim: vec![head_dim - 2 * axes_side, axes_side, axes_side],
            theta: 10_000.0,
            guidance_embeds: names.contains(&format!("{prefix}guidance_in.in_layer.weight")),
        })
    }

    pub fn hidden(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

/// FLUX.1's feed-forward: `linear, gelu (tanh), linear`.
struct GeluMlp(Mlp2);

impl FeedForward for GeluMlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.l2.forward(&self.0.l1.forward_gelu(x)?)
    }
}

struct DoubleBlock {
    img_mod: Linear,
    txt_mod: Linear,
    streams: DoubleStreams<GeluMlp>,
}

struct SingleBlock {
    modulation: Linear,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
}

pub(crate) struct FluxTransformer {
    cfg: TransformerConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    time: TimeEmbed,
    text: Mlp2,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    out: FinalLayer,
}

impl FluxTransformer {
    pub(crate) fn load(
        cfg: TransformerConfig,
        w: &Weights,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let total = cfg.depth + cfg.depth_single;
        let double = load_blocks(cfg.depth, (0, total), progress, |i| {
            let p = format!("transformer_blocks.{i}");
            Ok(DoubleBlock {
                img_mod: w.linear(&format!("{p}.norm1.linear"))?,
                txt_mod: w.linear(&format!("{p}.norm1_context.linear"))?,
                streams: DoubleStreams {
                    img_qkv: Qkv::load(w, &p, IMAGE_QKV)?,
                    txt_qkv: Qkv::load(w, &p, TEXT_QKV)?,
                    img_out: w.linear(&format!("{p}.attn.to_out.0"))?,
                    txt_out: w.linear(&format!("{p}.attn.to_add_out"))?,
                    img_ff: GeluMlp(Mlp2::load(w, &p, "ff.net.0.proj", "ff.net.2")?),
                    txt_ff: GeluMlp(Mlp2::load(
                        w,
                        &p,
                        "ff_context.net.0.proj",
                        "ff_context.net.2",
                    )?),
                },
            })
        })?;
        let single = load_blocks(cfg.depth_single, (cfg.depth, total), progress, |i| {
            let p = format!("single_transformer_blocks.{i}");
            Ok(SingleBlock {
                modulation: w.linear(&format!("{p}.norm.linear"))?,
                qkv: Qkv::load(w, &p, IMAGE_QKV)?,
                proj_mlp: w.linear(&format!("{p}.proj_mlp"))?,
                proj_out: w.linear(&format!("{p}.proj_out"))?,
            })
        })?;
        let tte = "time_text_embed";
        Ok(Self {
            x_embedder: w.linear("x_embedder")?,
            context_embedder: w.linear("context_embedder")?,
            time: TimeEmbed::load(w, tte, cfg.guidance_embeds, TIME_PROJ_DIM)?,
            text: Mlp2::load(w, &format!("{tte}.text_embedder"), "linear_1", "linear_2")?,
            double,
            single,
            out: FinalLayer::load(w)?,
            cfg,
        })
    }

    pub(crate) fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// RoPE tables for `txt_len` text tokens (ids all zero) followed by an `h x w` grid of image
    /// tokens (ids `[0, row, col]`).
    pub(crate) fn rope(&self, txt_len: usize, h: usize, w: usize, dev: &Device) -> Result<Rope> {
        let positions = (0..txt_len)
            .map(|_| [0.0; 3])
            .chain((0..h).flat_map(|r| (0..w).map(move |c| [0.0, r as f64, c as f64])));
        Rope::new(positions, &self.cfg.axes_dim, self.cfg.theta, dev)
    }

    /// The velocity for packed latents `img (1, h*w, in_channels)`. `timestep` and `guidance`
    /// are as the transformer sees them (diffusers' `timestep * 1000`), already rounded to the
    /// compute dtype as diffusers rounds them.
    pub(crate) fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        pooled: &Tensor,
        timestep: f32,
        guidance: Option<f32>,
        rope: &Rope,
    ) -> Result<Tensor> {
        let temb = self
            .time
            .forward(timestep, guidance, img.device(), img.dtype())?;
        let temb_act = (temb + self.text.forward_silu(pooled)?)?.silu()?;
        let mut img = self.x_embedder.forward(img)?;
        let mut txt = self.context_embedder.forward(txt)?;
        let heads = self.cfg.num_heads;
        let txt_len = txt.dim(1)?;
        for b in &self.double {
            let im = modulation(&b.img_mod, &temb_act, 6)?;
            let tm = modulation(&b.txt_mod, &temb_act, 6)?;
            (img, txt) = b.streams.forward(&img, &txt, &im, &tm, heads, rope)?;
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for b in &self.single {
            let m = modulation(&b.modulation, &temb_act, 3)?;
            let n = modulated_layer_norm(&x, &m[0], &m[1], NORM_EPS)?;
            let mlp = b.proj_mlp.forward_gelu(&n)?;
            let (q, k, v) = b.qkv.forward(&n, heads, rope)?;
            x = single_stream_residual(&x, (&q, &k, &v), mlp, &b.proj_out, &m[2])?;
        }
        self.out.forward(&x, txt_len, &temb_act)
    }
}
