//! Layers shared by the models: linear layers that may be quantized, attention, norms.

pub(crate) mod blocks;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor, D};
use kiln_kernels::ops::{Activation, PackedConv3x3, PackedLinear, Products};
use std::sync::Arc;

/// A linear layer `x W^T + b`, dense, packed in bf16 for the CPU's bf16 products, or
/// block-quantized.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    Dense(candle_nn::Linear),
    /// The weight in bf16 tiles (half the memory of f32), for f32 activations on the CPU.
    PackedBf16(Arc<PackedLinear>),
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

impl Linear {
    pub(crate) fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear::Dense(candle_nn::Linear::new(weight, bias))
    }

    pub(crate) fn quantized(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Linear::Quantized { weight, bias }
    }

    /// A CPU layer whose `(out, in)` weight is packed in bf16 (the f32 `weight` is dropped).
    pub(crate) fn packed_bf16(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        let bias = bias.as_ref().map(f32_values).transpose()?;
        let packed = PackedLinear::new(&f32_values(weight)?, weight.dims2()?, bias);
        Ok(Linear::PackedBf16(Arc::new(packed)))
    }

    /// The precision of this layer's products, which the attention beside it shares.
    pub(crate) fn products(&self) -> Products {
        match self {
            Linear::PackedBf16(_) => Products::Bf16,
            Linear::Dense(_) | Linear::Quantized { .. } => Products::F32,
        }
    }

    /// `gelu_tanh(x W^T + b)`: on bf16-packed weights the GELU is applied to each block of
    /// the product as it is finished, in cache; otherwise [`gelu_of_fresh`] of the output.
    pub(crate) fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::PackedBf16(l) => l.forward_then(x, Activation::GeluTanh),
            _ => gelu_of_fresh(self.forward(x)?),
        }
    }

    /// `[x1 x2 ...] W^T + b` for parts joined along their last dimension: on bf16-packed
    /// weights without joining them (each product adds to the last), where each part but the
    /// last is a whole number of the packed weight's 32-row blocks; otherwise joined first.
    pub(crate) fn forward_joined(&self, parts: &[&Tensor]) -> Result<Tensor> {
        if let Linear::PackedBf16(l) = self {
            let whole = parts.split_last().map_or(&[][..], |(_, whole)| whole);
            if whole
                .iter()
                .all(|p| p.dims().last().is_some_and(|w| w % 32 == 0))
            {
                return l.forward_joined(parts);
            }
        }
        self.forward(&Tensor::cat(parts, D::Minus1)?)
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) if on_cpu_in_f32(x) => {
                kiln_kernels::ops::linear(x, l.weight(), l.bias())
            }
            Linear::Dense(l) => l.forward(x),
            Linear::PackedBf16(l) => l.forward(x),
            Linear::Quantized { weight, bias } => {
                // candle's quantized kernels take f32 activations on every backend; the
                // product is cast back to the compute dtype.
                let dtype = x.dtype();
                let y = weight
                    .forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                    .to_dtype(dtype)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

/// A 2-D convolution: kiln's CPU kernel for stride 1 in f32, candle's otherwise, or a 3x3 one
/// whose products run on the CPU's bf16 instructions.
#[derive(Debug, Clone)]
pub(crate) enum Conv2d {
    Dense(candle_nn::Conv2d),
    /// Stride 1, padding 1, 3x3: Winograd's filters packed in bf16 at load (the f32 weight is
    /// dropped), for f32 activations on the CPU.
    PackedBf16(Arc<PackedConv3x3>),
}

impl Conv2d {
    pub(crate) fn new(weight: Tensor, bias: Tensor, padding: usize, stride: usize) -> Self {
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Conv2d::Dense(candle_nn::Conv2d::new(weight, Some(bias), cfg))
    }

    /// A convolution for the CPU's bf16 products where its shape has a bf16 kernel (3x3,
    /// padding 1, stride 1: every one of a VAE's but its 1x1 shortcuts and strided
    /// downsamplers), else a dense one.
    pub(crate) fn packed_bf16(
        weight: Tensor,
        bias: Tensor,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw, padding, stride) != (3, 3, 1, 1) {
            return Ok(Self::new(weight, bias, padding, stride));
        }
        let packed = PackedConv3x3::new(&f32_values(&weight)?, (cout, cin), f32_values(&bias)?);
        Ok(Conv2d::PackedBf16(Arc::new(packed)))
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let conv = match self {
            Conv2d::Dense(conv) => conv,
            Conv2d::PackedBf16(conv) => return conv.forward(x),
        };
        let cfg = conv.config();
        match conv.bias() {
            Some(b) if cfg.stride == 1 && on_cpu_in_f32(x) => {
                kiln_kernels::ops::conv2d(x, conv.weight(), b, cfg.padding)
            }
            _ => conv.forward(x),
        }
    }
}

/// A weight's values in f32, flattened: what kiln's packers read.
fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Whether kiln's own CPU kernels take this tensor.
fn on_cpu_in_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Bytes of f32 attention scores computed at once: larger problems go a few heads at a time,
/// and where one head's scores alone exceed it, a block of query rows at a time (a 1024x1024
/// FLUX image has 4608 tokens: 2 GB of scores for 24 heads). So no device ever holds the full
/// score matrix: memory grows with the tokens, not their square, on CUDA as on the CPU.
pub(crate) const SCORES_BUDGET: usize = 256 << 20;

/// Softmax attention over `(batch, heads, seq, head_dim)` tensors, with an optional additive
/// bias (`(1 or batch, heads, seq, seq)` or broadcastable) on the scores. The softmax runs in
/// f32, as PyTorch's kernels do for bf16. Without a bias, f32 on the CPU runs kiln's kernel
/// (a block of queries at a time, `kiln_kernels::ops::attention`), whose result is a view of
/// `(batch, seq, heads, head_dim)` memory, so merging the heads afterwards copies nothing.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    attention_in(Products::F32, q, k, v, scale, bias)
}

/// [`attention`] with kiln's CPU kernel's products in `products`' precision: a transformer's
/// attention runs in its projections' ([`Linear::products`]).
pub(crate) fn attention_in(
    products: Products,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if bias.is_none() && on_cpu_in_f32(q) {
        return kiln_kernels::ops::attention(q, k, v, scale, products)?.transpose(1, 2);
    }
    attention_within(q, k, v, scale, bias, SCORES_BUDGET)
}

/// [`attention`] computing at most `budget` bytes of scores at once: heads in groups, and
/// query rows in blocks where one head is over the budget.
fn attention_within(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
    budget: usize,
) -> Result<Tensor> {
    let (b, h, sq, _) = q.dims4()?;
    let row_bytes = (b * k.dim(2)? * 4).max(1);
    let rows = (budget / row_bytes).clamp(1, sq);
    let heads_at_once = (budget / (row_bytes * sq)).clamp(1, h);
    if heads_at_once == h {
        return attention_all((q, k, v), scale, bias);
    }
    let mut outs = Vec::with_capacity(h.div_ceil(heads_at_once));
    for start in (0..h).step_by(heads_at_once) {
        let n = heads_at_once.min(h - start);
        let head_bias = narrow_bias(bias, 1, h, start, n)?;
        let (q, k, v) = (
            q.narrow(1, start, n)?,
            k.narrow(1, start, n)?,
            v.narrow(1, start, n)?,
        );
        let mut blocks = Vec::with_capacity(sq.div_ceil(rows));
        for row in (0..sq).step_by(rows) {
            let m = rows.min(sq - row);
            let row_bias = narrow_bias(head_bias.as_ref(), 2, sq, row, m)?;
            blocks.push(attention_all(
                (&q.narrow(2, row, m)?, &k, &v),
                scale,
                row_bias.as_ref(),
            )?);
        }
        outs.push(Tensor::cat(&blocks, 2)?);
    }
    Tensor::cat(&outs, 1)
}

/// The part of a (broadcastable) bias for `n` of the `full` entries of dimension `dim` from
/// `start`: cut where the bias has that dimension in full, kept where it broadcasts.
fn narrow_bias(
    bias: Option<&Tensor>,
    dim: usize,
    full: usize,
    start: usize,
    n: usize,
) -> Result<Option<Tensor>> {
    match bias {
        Some(b) if b.dim(dim)? == full && full > 1 => Ok(Some(b.narrow(dim, start, n)?)),
        other => Ok(other.cloned()),
    }
}

/// [`attention`] of all of `q`'s heads at once.
fn attention_all(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let mut scores =
        (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
    if let Some(b) = bias {
        scores = scores.broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(&v.contiguous()?)
}

/// Root-mean-square norm over the last dimension, statistics in f32 (T5LayerNorm, diffusers'
/// RMSNorm).
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)
}

/// Layer norm over the last dimension, statistics in f32; `affine` is (weight, bias).
pub(crate) fn layer_norm(
    x: &Tensor,
    affine: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?;
    match affine {
        Some((w, b)) => normed.broadcast_mul(w)?.broadcast_add(b),
        None => Ok(normed),
    }
}

/// FLUX's adaLN: `layer_norm(x) * (1 + scale) + shift`, the norm without affine parameters;
/// one fused pass on the CPU in f32.
pub(crate) fn modulated_layer_norm(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if on_cpu_in_f32(x) {
        return kiln_kernels::ops::modulated_layer_norm(x, shift, scale, eps);
    }
    layer_norm(x, None, eps)?
        .broadcast_mul(&(scale + 1.0)?)?
        .broadcast_add(shift)
}

/// `x + gate * y`, a gated residual connection; one fused pass on the CPU in f32.
pub(crate) fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    if on_cpu_in_f32(x) {
        return kiln_kernels::ops::gated_residual(x, gate, y);
    }
    x + gate.broadcast_mul(y)?
}

/// tanh-approximated GELU of a layer's fresh output. On the CPU in f32 it is computed in
/// place, so `x` must not share its storage with a tensor that is still used.
pub(crate) fn gelu_of_fresh(x: Tensor) -> Result<Tensor> {
    if on_cpu_in_f32(&x) && x.is_contiguous() {
        kiln_kernels::ops::gelu_tanh_in_place(&x)?;
        return Ok(x);
    }
    x.gelu()
}

/// GroupNorm with a per-channel affine over `(images, channels, ...)`, optionally followed by
/// the SiLU that nearly always comes next in a VAE; one fused pass on the CPU in f32.
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    composite: candle_nn::GroupNorm,
}

impl GroupNorm {
    pub(crate) fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.elem_count();
        let composite =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            composite,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// `silu(group_norm(x))`.
    pub(crate) fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if on_cpu_in_f32(x) {
            return kiln_kernels::ops::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            );
        }
        let y = self.composite.forward(x)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

/// Splits the last dimension into `n` equal chunks (adaLN modulation vectors).
pub(crate) fn chunks(x: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let size = x.dim(D::Minus1)? / n;
    (0..n)
        .map(|i| x.narrow(D::Minus1, i * size, size))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn attention_in_head_chunks_equals_all_at_once() {
        let dev = &Device::Cpu;
        // 2 heads of 6000 x 6000 f32 scores (144 MB each) exceed the budget: one head at a time.
        let (h, s, d) = (2, 6000, 4);
        let q = Tensor::randn(0f32, 1.0, (1, h, s, d), dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, h, s, d), dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, h, s, d), dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, (1, h, s, 1), dev).unwrap();
        let chunked = attention(&q, &k, &v, 0.5, Some(&bias)).unwrap();
        let whole = attention_all((&q, &k, &v), 0.5, Some(&bias)).unwrap();
        assert_eq!(max_abs_diff(&chunked, &whole), 0.0);
    }

    /// Where one head's scores exceed the budget, query rows go in blocks, each with its own
    /// rows of the bias; the result is the same as all at once.
    #[test]
    fn attention_in_row_blocks_equals_all_at_once() {
        let dev = &Device::Cpu;
        let (h, s, d) = (3, 50, 8);
        let q = Tensor::randn(0f32, 1.0, (2, h, s, d), dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, h, s, d), dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, h, s, d), dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, (2, h, s, s), dev).unwrap();
        // 7 rows of one head's scores: 2 x 7 x 50 x 4 bytes.
        let blocked = attention_within(&q, &k, &v, 0.3, Some(&bias), 2 * 7 * 50 * 4).unwrap();
        let whole = attention_all((&q, &k, &v), 0.3, Some(&bias)).unwrap();
        let diff = max_abs_diff(&blocked, &whole);
        assert!(diff < 1e-6, "{diff}");
    }
}
