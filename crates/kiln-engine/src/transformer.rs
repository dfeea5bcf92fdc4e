//! The FLUX.1 transformer (diffusers' `FluxTransformer2DModel`), in diffusers' tensor names.

use crate::error::{Error, Result};
use crate::nn::{
    attention, chunks, gated_residual, gelu_of_fresh, modulated_layer_norm, rms_norm, Linear,
};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;
use std::collections::BTreeSet;

pub(crate) const QK_NORM_EPS: f64 = 1e-6;
pub(crate) const NORM_EPS: f64 = 1e-6;
/// The image stream's (and single blocks') projections and norms.
pub(crate) const IMAGE_QKV: [&str; 5] = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.norm_q",
    "attn.norm_k",
];
/// Width of the sinusoidal timestep (and guidance) embedding.
const TIME_PROJ_DIM: usize = 256;
/// The text stream's projections and norms in a double block.
pub(crate) const TEXT_QKV: [&str; 5] = [
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.norm_added_q",
    "attn.norm_added_k",
];

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

/// How many `stem.N.` indices the names hold (N = 0, 1, ...).
pub(crate) fn count_indexed(names: &BTreeSet<String>, stem: &str) -> usize {
    names
        .iter()
        .filter_map(|n| {
            n.strip_prefix(stem)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

pub(crate) struct Mlp2 {
    l1: Linear,
    l2: Linear,
}

impl Mlp2 {
    pub(crate) fn load(w: &Weights, p: &str, l1: &str, l2: &str) -> Result<Self> {
        Ok(Self {
            l1: w.linear(&format!("{p}.{l1}"))?,
            l2: w.linear(&format!("{p}.{l2}"))?,
        })
    }
    pub(crate) fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.l2.forward(&self.l1.forward(x)?.silu()?)
    }
}

/// A feed-forward sub-block of a double-stream block: FLUX.1's GELU MLP, FLUX.2's SwiGLU.
pub(crate) trait FeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

/// FLUX.1's feed-forward: `linear, gelu (tanh), linear`.
struct GeluMlp(Mlp2);

impl FeedForward for GeluMlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.l2.forward(&gelu_of_fresh(self.0.l1.forward(x)?)?)
    }
}

/// One stream's query/key/value projections and their RMS norms.
pub(crate) struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
}

impl Qkv {
    pub(crate) fn load(w: &Weights, p: &str, names: [&str; 5]) -> Result<Self> {
        let [q, k, v, nq, nk] = names;
        Ok(Self {
            q: w.linear(&format!("{p}.{q}"))?,
            k: w.linear(&format!("{p}.{k}"))?,
            v: w.linear(&format!("{p}.{v}"))?,
            norm_q: w.tensor(&format!("{p}.{nq}.weight"))?,
            norm_k: w.tensor(&format!("{p}.{nk}.weight"))?,
        })
    }

    /// Normalised q, k and v as `(batch, heads, seq, head_dim)`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        heads: usize,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, s, hd) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, s, heads, hd / heads));
        let q = rms_norm(&split(self.q.forward(x)?)?, &self.norm_q, QK_NORM_EPS)?;
        let k = rms_norm(&split(self.k.forward(x)?)?, &self.norm_k, QK_NORM_EPS)?;
        let v = split(self.v.forward(x)?)?;
        Ok((q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?))
    }
}

/// A double-stream block's attention and feed-forwards, which FLUX.1 and FLUX.2 share; the
/// modulation comes from outside (each block's own in FLUX.1, one for all blocks in FLUX.2).
pub(crate) struct DoubleStreams<F> {
    pub(crate) img_qkv: Qkv,
    pub(crate) txt_qkv: Qkv,
    pub(crate) img_out: Linear,
    pub(crate) txt_out: Linear,
    pub(crate) img_ff: F,
    pub(crate) txt_ff: F,
}

impl<F: FeedForward> DoubleStreams<F> {
    /// Joint attention over `[txt, img]`, then each stream's feed-forward. `im` and `tm` are
    /// the streams' six modulation vectors: shift, scale, gate for the attention, then for
    /// the feed-forward.
    pub(crate) fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        im: &[Tensor],
        tm: &[Tensor],
        heads: usize,
        rope: &Rope,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let txt_len = txt.dim(1)?;
        let img_n = modulated_layer_norm(img, &im[0], &im[1], NORM_EPS)?;
        let txt_n = modulated_layer_norm(txt, &tm[0], &tm[1], NORM_EPS)?;
        let (iq, ik, iv) = self.img_qkv.forward(&img_n, heads)?;
        let (tq, tk, tv) = self.txt_qkv.forward(&txt_n, heads)?;
        let scale = 1.0 / (iq.dim(3)? as f64).sqrt();
        let q = apply_rope(&Tensor::cat(&[tq, iq], 2)?, rope)?;
        let k = apply_rope(&Tensor::cat(&[tk, ik], 2)?, rope)?;
        let v = Tensor::cat(&[tv, iv], 2)?;
        let a = merge_heads(&attention(&q, &k, &v, scale, None)?)?;
        let txt_a = a.narrow(1, 0, txt_len)?;
        let img_a = a.narrow(1, txt_len, a.dim(1)? - txt_len)?;

        let img = gated_residual(img, &im[2], &self.img_out.forward(&img_a)?)?;
        let img_n = modulated_layer_norm(&img, &im[3], &im[4], NORM_EPS)?;
        let img = gated_residual(&img, &im[5], &self.img_ff.forward(&img_n)?)?;

        let txt = gated_residual(txt, &tm[2], &self.txt_out.forward(&txt_a)?)?;
        let txt_n = modulated_layer_norm(&txt, &tm[3], &tm[4], NORM_EPS)?;
        let txt = gated_residual(&txt, &tm[5], &self.txt_ff.forward(&txt_n)?)?;
        Ok((img, txt))
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

/// RoPE tables for a sequence (text then image tokens): `(1, 1, seq, head_dim)` in f32.
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for tokens at `positions` (one coordinate per axis), each axis rotating its own
    /// `axes_dim[i]` channels. diffusers computes the frequencies in f64 and applies them in
    /// f32 whatever the model's dtype; so does this.
    pub(crate) fn new<const N: usize>(
        positions: impl Iterator<Item = [f64; N]>,
        axes_dim: &[usize],
        theta: f64,
        dev: &Device,
    ) -> Result<Self> {
        debug_assert_eq!(axes_dim.len(), N);
        let d: usize = axes_dim.iter().sum();
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for pos in positions {
            for (axis, &dim) in axes_dim.iter().enumerate() {
                for i in 0..dim / 2 {
                    let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
                    let angle = pos[axis] * freq;
                    // Interleaved pairs: both members of a pair get the same angle.
                    for _ in 0..2 {
                        cos.push(angle.cos() as f32);
                        sin.push(angle.sin() as f32);
                    }
                }
            }
        }
        let seq = cos.len() / d;
        Ok(Self {
            cos: Tensor::from_vec(cos, (1, 1, seq, d), dev)?,
            sin: Tensor::from_vec(sin, (1, 1, seq, d), dev)?,
        })
    }
}

pub(crate) struct FluxTransformer {
    cfg: TransformerConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    time: Mlp2,
    guidance: Option<Mlp2>,
    text: Mlp2,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl FluxTransformer {
    pub(crate) fn load(
        cfg: TransformerConfig,
        w: &Weights,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let total = cfg.depth + cfg.depth_single;
        let mut double = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let p = format!("transformer_blocks.{i}");
            double.push(DoubleBlock {
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
            });
            progress(i + 1, total);
        }
        let mut single = Vec::with_capacity(cfg.depth_single);
        for i in 0..cfg.depth_single {
            let p = format!("single_transformer_blocks.{i}");
            single.push(SingleBlock {
                modulation: w.linear(&format!("{p}.norm.linear"))?,
                qkv: Qkv::load(w, &p, IMAGE_QKV)?,
                proj_mlp: w.linear(&format!("{p}.proj_mlp"))?,
                proj_out: w.linear(&format!("{p}.proj_out"))?,
            });
            progress(cfg.depth + i + 1, total);
        }
        let tte = "time_text_embed";
        Ok(Self {
            x_embedder: w.linear("x_embedder")?,
            context_embedder: w.linear("context_embedder")?,
            time: Mlp2::load(
                w,
                &format!("{tte}.timestep_embedder"),
                "linear_1",
                "linear_2",
            )?,
            guidance: if cfg.guidance_embeds {
                Some(Mlp2::load(
                    w,
                    &format!("{tte}.guidance_embedder"),
                    "linear_1",
                    "linear_2",
                )?)
            } else {
                None
            },
            text: Mlp2::load(w, &format!("{tte}.text_embedder"), "linear_1", "linear_2")?,
            double,
            single,
            norm_out: w.linear("norm_out.linear")?,
            proj_out: w.linear("proj_out")?,
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
        let dtype = img.dtype();
        let dev = img.device();
        let mut temb =
            self.time
                .forward_silu(&timestep_embedding(timestep, TIME_PROJ_DIM, dev, dtype)?)?;
        if let Some(g_mlp) = &self.guidance {
            let g = guidance.ok_or_else(|| {
                Error::InvalidRequest("this checkpoint needs a guidance value".into())
            })?;
            temb =
                (temb + g_mlp.forward_silu(&timestep_embedding(g, TIME_PROJ_DIM, dev, dtype)?)?)?;
        }
        let temb = (temb + self.text.forward_silu(pooled)?)?;
        let temb_act = temb.silu()?;

        let mut img = self.x_embedder.forward(img)?;
        let mut txt = self.context_embedder.forward(txt)?;
        let heads = self.cfg.num_heads;
        let scale = 1.0 / (self.cfg.head_dim as f64).sqrt();
        let txt_len = txt.dim(1)?;

        for b in &self.double {
            let im = chunks(&b.img_mod.forward(&temb_act)?.unsqueeze(1)?, 6)?;
            let tm = chunks(&b.txt_mod.forward(&temb_act)?.unsqueeze(1)?, 6)?;
            (img, txt) = b.streams.forward(&img, &txt, &im, &tm, heads, rope)?;
        }

        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for b in &self.single {
            let m = chunks(&b.modulation.forward(&temb_act)?.unsqueeze(1)?, 3)?;
            let n = modulated_layer_norm(&x, &m[0], &m[1], NORM_EPS)?;
            let mlp = gelu_of_fresh(b.proj_mlp.forward(&n)?)?;
            let (q, k, v) = b.qkv.forward(&n, heads)?;
            let a = attention(
                &apply_rope(&q, rope)?,
                &apply_rope(&k, rope)?,
                &v,
                scale,
                None,
            )?;
            let y = b
                .proj_out
                .forward(&Tensor::cat(&[merge_heads(&a)?, mlp], 2)?)?;
            x = gated_residual(&x, &m[2], &y)?;
        }
        let img = x.narrow(1, txt_len, x.dim(1)? - txt_len)?;
        // AdaLayerNormContinuous: (scale, shift) in that order.
        let m = chunks(&self.norm_out.forward(&temb_act)?.unsqueeze(1)?, 2)?;
        let img = modulated_layer_norm(&img, &m[1], &m[0], NORM_EPS)?;
        Ok(self.proj_out.forward(&img)?)
    }
}

/// `(batch, heads, seq, d)` to `(batch, seq, heads * d)`.
pub(crate) fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, s, h * d))
}

/// Rotates interleaved pairs of `x (batch, heads, seq, d)`, in f32 (diffusers'
/// `apply_rotary_emb` with `use_real_unbind_dim=-1`).
pub(crate) fn apply_rope(x: &Tensor, rope: &Rope) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let (b, h, s, d) = xf.dims4()?;
    let pairs = xf.reshape((b, h, s, d / 2, 2))?;
    let re = pairs.narrow(D::Minus1, 0, 1)?;
    let im = pairs.narrow(D::Minus1, 1, 1)?;
    let rotated = Tensor::cat(&[&im.neg()?, &re], D::Minus1)?.reshape((b, h, s, d))?;
    (xf.broadcast_mul(&rope.cos)? + rotated.broadcast_mul(&rope.sin)?)?.to_dtype(dtype)
}

/// diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: `[cos, sin]` of
/// `t * 10000^(-i/(dim/2))`, computed in f32, then cast to the compute dtype.
pub(crate) fn timestep_embedding(t: f32, dim: usize, dev: &Device, dtype: DType) -> Result<Tensor> {
    let half = dim / 2;
    let log_period = -(10_000f64.ln() as f32);
    let args: Vec<f32> = (0..half)
        .map(|i| t * (log_period * i as f32 / half as f32).exp())
        .collect();
    let emb: Vec<f32> = args
        .iter()
        .map(|a| a.cos())
        .chain(args.iter().map(|a| a.sin()))
        .collect();
    Ok(Tensor::from_vec(emb, (1, dim), dev)?.to_dtype(dtype)?)
}
