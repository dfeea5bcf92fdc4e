//! The transformer building blocks FLUX.1 and FLUX.2 share: the double-stream block's
//! attention and feed-forwards (the modulation comes from each family), query/key/value
//! projections with RMS norms, rotary position tables, the timestep embedding.

use crate::error::{Error, Result};
use crate::layers::{
    attention_in, chunks, gated_residual, modulated_layer_norm, on_cpu_in_f32, rms_norm, Linear,
};
use crate::options::LoadProgress;
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor, D};
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
pub(crate) const TIME_PROJ_DIM: usize = 256;
/// The text stream's projections and norms in a double block.
pub(crate) const TEXT_QKV: [&str; 5] = [
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.norm_added_q",
    "attn.norm_added_k",
];

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
    pub(crate) l1: Linear,
    pub(crate) l2: Linear,
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

    /// The three projections of `x`, each `(batch, seq, heads * head_dim)`.
    fn project(&self, x: &Tensor) -> candle_core::Result<[Tensor; 3]> {
        Ok([self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?])
    }

    /// q and k normalised and rotated, and v, as `(batch, heads, seq, head_dim)`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        n_heads: usize,
        rope: &Rope,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        joint_qkv(&[(self, x)], n_heads, rope)
    }
}

/// q and k normalised and rotated, and v, as `(batch, heads, Σ seq, head_dim)`, over token
/// streams joined in order, each with its own projections and norms (a double block's text and
/// image).
fn joint_qkv(
    streams: &[(&Qkv, &Tensor)],
    n_heads: usize,
    rope: &Rope,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let projected = streams
        .iter()
        .map(|(s, x)| s.project(x))
        .collect::<candle_core::Result<Vec<_>>>()?;
    // Projection `i` of every stream, with the norm of its heads (none for v).
    let parts = |i: usize| -> Vec<(&Tensor, Option<&Tensor>)> {
        let norms = streams
            .iter()
            .map(|(s, _)| [Some(&s.norm_q), Some(&s.norm_k), None][i]);
        projected.iter().map(|p| &p[i]).zip(norms).collect()
    };
    Ok((
        heads(&parts(0), n_heads, Some(rope))?,
        heads(&parts(1), n_heads, Some(rope))?,
        heads(&parts(2), n_heads, None)?,
    ))
}

/// Attention's `(batch, heads, Σ seq, head_dim)` queries, keys or values from the projections
/// `(batch, seq, heads * head_dim)` of one or more token sequences, joined in order: each
/// part's heads RMS-normalised with its weight where it has one, then rotated by `rope` where
/// given. On the CPU in f32 one parallel pass (`kiln_kernels::ops::heads`).
pub(crate) fn heads(
    parts: &[(&Tensor, Option<&Tensor>)],
    n_heads: usize,
    rope: Option<&Rope>,
) -> candle_core::Result<Tensor> {
    if parts.iter().all(|(x, _)| on_cpu_in_f32(x)) {
        let tables = rope.map(|r| (&r.cos, &r.sin));
        return kiln_kernels::ops::heads(parts, n_heads, QK_NORM_EPS, tables);
    }
    let mut joined = Vec::with_capacity(parts.len());
    for (x, norm) in parts {
        let (b, s, width) = x.dims3()?;
        let x = x.contiguous()?.reshape((b, s, n_heads, width / n_heads))?;
        let x = match norm {
            Some(w) => rms_norm(&x, w, QK_NORM_EPS)?,
            None => x,
        };
        joined.push(x.transpose(1, 2)?);
    }
    let x = Tensor::cat(&joined, 2)?;
    match rope {
        Some(rope) => apply_rope(&x, rope),
        None => Ok(x),
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
        n_heads: usize,
        rope: &Rope,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let txt_len = txt.dim(1)?;
        let img_n = modulated_layer_norm(img, &im[0], &im[1], NORM_EPS)?;
        let txt_n = modulated_layer_norm(txt, &tm[0], &tm[1], NORM_EPS)?;
        let streams = [(&self.txt_qkv, &txt_n), (&self.img_qkv, &img_n)];
        let (q, k, v) = joint_qkv(&streams, n_heads, rope)?;
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        let a = merge_heads(&attention_in(
            self.img_out.products(),
            &q,
            &k,
            &v,
            scale,
            None,
        )?)?;
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

/// `(batch, heads, seq, d)` to `(batch, seq, heads * d)`.
pub(crate) fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, s, h * d))
}

/// Rotates interleaved pairs of `x (batch, heads, seq, d)`, in f32 (diffusers'
/// `apply_rotary_emb` with `use_real_unbind_dim=-1`).
/// On the CPU in f32 [`heads`] rotates in its own pass instead.
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

/// The timestep embedding, plus the guidance embedding where the model has one: each a
/// sinusoidal embedding of `dim` channels through its two-layer SiLU MLP, summed.
pub(crate) struct TimeEmbed {
    time: Mlp2,
    guidance: Option<Mlp2>,
    dim: usize,
}

impl TimeEmbed {
    /// `{prefix}.timestep_embedder` and, where `with_guidance`, `{prefix}.guidance_embedder`.
    pub(crate) fn load(w: &Weights, prefix: &str, with_guidance: bool, dim: usize) -> Result<Self> {
        let mlp = |name: &str| Mlp2::load(w, &format!("{prefix}.{name}"), "linear_1", "linear_2");
        Ok(Self {
            time: mlp("timestep_embedder")?,
            guidance: if with_guidance {
                Some(mlp("guidance_embedder")?)
            } else {
                None
            },
            dim,
        })
    }

    /// The summed embeddings in `dtype` on `dev`; a model with a guidance embedding needs a
    /// guidance value.
    pub(crate) fn forward(
        &self,
        timestep: f32,
        guidance: Option<f32>,
        dev: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let embed = |mlp: &Mlp2, v: f32| -> Result<Tensor> {
            Ok(mlp.forward_silu(&timestep_embedding(v, self.dim, dev, dtype)?)?)
        };
        let temb = embed(&self.time, timestep)?;
        match (&self.guidance, guidance) {
            (None, _) => Ok(temb),
            (Some(g_mlp), Some(g)) => Ok((temb + embed(g_mlp, g)?)?),
            (Some(_), None) => Err(Error::InvalidRequest(
                "this checkpoint needs a guidance value".into(),
            )),
        }
    }
}

/// `n` modulation vectors `(batch, 1, hidden)` from the activated conditioning embedding.
pub(crate) fn modulation(l: &Linear, temb_act: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    Ok(chunks(&l.forward(temb_act)?.unsqueeze(1)?, n)?)
}

/// A single-stream block's end: attention of `q`, `k` (normalised and rotated: [`heads`]) with
/// `v`, its heads merged and joined to the block's MLP branch, projected by `out`, added to `x`
/// through `gate`.
pub(crate) fn single_stream_residual(
    x: &Tensor,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    mlp: Tensor,
    out: &Linear,
    gate: &Tensor,
) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    let a = attention_in(out.products(), q, k, v, scale, None)?;
    let y = out.forward_joined(&[&merge_heads(&a)?, &mlp])?;
    Ok(gated_residual(x, gate, &y)?)
}

/// The output layer: the image tokens of the joint sequence `x` (after `txt_len` text
/// tokens), normalised with AdaLayerNormContinuous's (scale, shift) in that order, projected.
pub(crate) struct FinalLayer {
    norm: Linear,
    proj: Linear,
}

impl FinalLayer {
    pub(crate) fn load(w: &Weights) -> Result<Self> {
        Ok(Self {
            norm: w.linear("norm_out.linear")?,
            proj: w.linear("proj_out")?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, txt_len: usize, temb_act: &Tensor) -> Result<Tensor> {
        let img = x.narrow(1, txt_len, x.dim(1)? - txt_len)?;
        let m = modulation(&self.norm, temb_act, 2)?;
        let img = modulated_layer_norm(&img, &m[1], &m[0], NORM_EPS)?;
        Ok(self.proj.forward(&img)?)
    }
}

/// Loads `count` transformer blocks with `load(i)`, reporting block `offset + i + 1` of
/// `total` after each.
pub(crate) fn load_blocks<B>(
    count: usize,
    (offset, total): (usize, usize),
    progress: &mut dyn FnMut(LoadProgress),
    mut load: impl FnMut(usize) -> Result<B>,
) -> Result<Vec<B>> {
    let mut blocks = Vec::with_capacity(count);
    for i in 0..count {
        blocks.push(load(i)?);
        progress(LoadProgress {
            component: "transformer",
            done: offset + i + 1,
            total,
        });
    }
    Ok(blocks)
}
