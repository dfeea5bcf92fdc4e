//! candle ops on the CPU kernels: a linear layer with its bias fused into the product,
//! attention a block of queries at a time, stride-1 convolutions by unfolded blocks of rows,
//! and the fused pointwise layers of [`crate::pointwise`]. All take f32 tensors on the CPU;
//! callers keep candle's own ops for other devices and dtypes. A linear layer's weight may be
//! packed in bf16 ([`PackedLinear`]) and attention's products run in bf16 ([`Products`]): the
//! activations stay f32 either way.

use crate::attention::attend;
pub use crate::bf16::Activation;
use crate::bf16::{self, PackedB};
use crate::gemm::{matmul, Matrix};
use crate::pointwise::{self, Groups};
use crate::winograd;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, InplaceOp1, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// The f32 elements of a contiguous tensor's storage.
fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v,
        other => candle_core::bail!("{op}: f32 only, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// [`contiguous`] of a three-input op's inputs.
fn contiguous3<'a>(
    inputs: [(&'a CpuStorage, &Layout); 3],
    op: &str,
) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
    let [a, b, c] = inputs;
    Ok((
        contiguous(a.0, a.1, op)?,
        contiguous(b.0, b.1, op)?,
        contiguous(c.0, c.1, op)?,
    ))
}

/// `x W^T + b` for `x (..., k)` and an `n x k` weight: `product(x)` returns the rows of `x`
/// times the weight, `m x n` for `x`'s `m` rows.
fn linear_rows(
    x: (&CpuStorage, &Layout),
    (n, k): (usize, usize),
    product: impl FnOnce(Matrix) -> Vec<f32>,
) -> Result<(CpuStorage, Shape)> {
    let xs = contiguous(x.0, x.1, "linear")?;
    let dims = x.1.shape().dims();
    if dims.last() != Some(&k) {
        candle_core::bail!("linear: input {:?} for a weight of {n} x {k}", dims);
    }
    let m = xs.len() / k.max(1);
    let y = product(Matrix::row_major(xs, m, k, k));
    assert_eq!(y.len(), m * n, "linear: the product's size");
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("checked above") = n;
    Ok((CpuStorage::F32(y), Shape::from(shape)))
}

/// `y = x W^T + b` for `x (..., in)`, `W (out, in)`, `b (out)`, all f32.
struct LinearOp;

impl LinearOp {
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let ws = contiguous(w.0, w.1, "linear")?;
        let (n, k) = w.1.shape().dims2()?;
        let b = b.map(|(s, l)| contiguous(s, l, "linear")).transpose()?;
        linear_rows(x, (n, k), |x| {
            // The product accumulates onto the bias rows.
            let (mut y, accumulate) = match b {
                Some(b) => (b.repeat(x.rows), true),
                None => (vec![0f32; x.rows * n], false),
            };
            matmul(x, Matrix::transposed(ws, k, n, k), &mut y, n, accumulate);
            y
        })
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "kiln-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "kiln-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

/// `x W^T + b` on the CPU in f32 (`x` made contiguous if it is not).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op3_no_bwd(&weight.contiguous()?, &b.contiguous()?, &LinearOp),
        None => x.apply_op2_no_bwd(&weight.contiguous()?, &LinearOp),
    }
}

/// A linear layer for f32 activations whose weight is packed in bf16: `x W^T + b` with bf16
/// products and f32 sums (needs a CPU with a [`bf16::kernel`]).
#[derive(Debug)]
pub struct PackedLinear {
    /// `W^T (in x out)`.
    weight: PackedB,
    bias: Option<Vec<f32>>,
}

impl PackedLinear {
    /// Packs an `out x in` row-major `weight`, rounding it to bf16; `bias` has `out` values.
    pub fn new(weight: &[f32], (out, inputs): (usize, usize), bias: Option<Vec<f32>>) -> Self {
        assert!(
            bias.as_ref().is_none_or(|b| b.len() == out),
            "bias of {out} values"
        );
        Self {
            weight: PackedB::pack(Matrix::transposed(weight, inputs, out, inputs)),
            bias,
        }
    }

    /// `x W^T + b` for f32 `x (..., in)` on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, Activation::Identity)
    }

    /// `activation(x W^T + b)`, the bias and the activation applied to each block of the
    /// output as the product finishes it ([`bf16::Epilogue`]).
    pub fn forward_then(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let op = PackedLinearOp {
            layer: self,
            activation,
        };
        on_bf16_kernel(x, &op, "bf16 linear")
    }

    /// `[x1 x2 ...] W^T + b` for parts `(..., in_i)` whose widths add up to `in`, without
    /// joining them ([`bf16::matmul_fresh_joined`]); each part but the last has a multiple of
    /// 32 values in a row (the packed weight's blocks).
    pub fn forward_joined(&self, parts: &[&Tensor]) -> Result<Tensor> {
        if bf16::kernel().is_none() {
            candle_core::bail!("bf16 linear: this CPU has no bf16 instructions");
        }
        let parts: Vec<Tensor> = parts
            .iter()
            .map(|p| p.contiguous())
            .collect::<Result<_>>()?;
        let Some(first) = parts.first() else {
            candle_core::bail!("bf16 linear: no parts");
        };
        let dims = first.dims().to_vec();
        let guards: Vec<_> = parts.iter().map(|p| p.storage_and_layout()).collect();
        let mut views = Vec::with_capacity(parts.len());
        for (i, (storage, layout)) in guards.iter().enumerate() {
            let d = layout.shape().dims();
            let (Some((&width, lead)), Some((_, first_lead))) = (d.split_last(), dims.split_last())
            else {
                candle_core::bail!("bf16 linear: a part without dimensions");
            };
            let last = i + 1 == guards.len();
            if lead != first_lead || (!last && width % 32 != 0) {
                candle_core::bail!("bf16 linear: joined parts {:?} and {:?}", dims, d);
            }
            let count = layout.shape().elem_count();
            let data = contiguous_len(storage, layout, count, "bf16 linear")?;
            views.push(Matrix::row_major(data, count / width.max(1), width, width));
        }
        let (n, k) = (self.weight.cols(), self.weight.rows());
        if views.iter().map(|v| v.cols).sum::<usize>() != k {
            candle_core::bail!("bf16 linear: parts of {:?} for a weight of {n} x {k}", dims);
        }
        let epilogue = bf16::Epilogue {
            bias: self.bias.as_deref(),
            activation: Activation::Identity,
        };
        let y = bf16::matmul_fresh_joined(&views, &self.weight, epilogue);
        let mut shape = dims;
        *shape.last_mut().expect("a tensor with dimensions") = n;
        Tensor::from_vec(y, shape, first.device())
    }
}

/// A [`PackedLinear`] and what follows it, as one op.
struct PackedLinearOp<'a> {
    layer: &'a PackedLinear,
    activation: Activation,
}

impl CustomOp1 for PackedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "kiln-linear-bf16"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let weight = &self.layer.weight;
        let (n, k) = (weight.cols(), weight.rows());
        let epilogue = bf16::Epilogue {
            bias: self.layer.bias.as_deref(),
            activation: self.activation,
        };
        // The bias is the epilogue's: the product starts from nothing rather than bias rows.
        linear_rows((s, l), (n, k), |x| bf16::matmul_fresh(x, weight, epilogue))
    }
}

/// `op` applied to `x` made contiguous, or an error naming `name` where this CPU has no bf16
/// kernel (the configuration check refuses bf16 there first; this guards direct callers).
fn on_bf16_kernel(x: &Tensor, op: &impl CustomOp1, name: &str) -> Result<Tensor> {
    if bf16::kernel().is_none() {
        candle_core::bail!("{name}: this CPU has no bf16 instructions");
    }
    x.contiguous()?.apply_op1_no_bwd(op)
}

/// The precision of a CPU op's matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// f32 throughout.
    F32,
    /// bf16 operands, f32 sums ([`bf16`]); inputs and outputs stay f32.
    Bf16,
}

struct AttentionOp {
    scale: f32,
    products: Products,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "kiln-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = contiguous3([(s1, l1), (s2, l2), (s3, l3)], "attention")?;
        let (b, h, sq, d) = l1.shape().dims4()?;
        let (bk, hk, sk, dk) = l2.shape().dims4()?;
        if (bk, hk, dk) != (b, h, d) || l3.shape().dims4()? != (b, h, sk, d) {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let out = attend(q, k, v, [b, h, sq, sk, d], self.scale, self.products);
        Ok((CpuStorage::F32(out), Shape::from((b, sq, h, d))))
    }
}

/// `softmax(q k^T * scale) v` for `(batch, heads, seq, head_dim)` f32 tensors on the CPU,
/// returned as `(batch, seq, heads, head_dim)`: the heads already side by side, as the output
/// projection wants them. Both products in `products`' precision; the softmax in f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    products: Products,
) -> Result<Tensor> {
    if products == Products::Bf16 && bf16::kernel().is_none() {
        candle_core::bail!("bf16 attention: this CPU has no bf16 instructions");
    }
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &AttentionOp {
            scale: scale as f32,
            products,
        },
    )
}

/// Bytes of the unfolded input (im2col) a convolution builds at once.
const UNFOLD_BUDGET: usize = 32 << 20;

/// A stride-1 convolution of `x (n, cin, h, w)` by `weight (cout, cin, kh, kw)` with zero
/// padding `padding` and a bias `(cout)`.
struct Conv2dOp {
    padding: usize,
    algorithm: ConvAlgorithm,
}

/// How a convolution is computed; each with the bytes of intermediate values one block of
/// output rows may hold.
#[derive(Clone, Copy, Debug)]
enum ConvAlgorithm {
    /// Unfold the input (im2col), then one product per block: any kernel size and padding.
    Unfold { budget: usize },
    /// Winograd's F(2x2, 3x3): 3x3 kernels with padding 1 only.
    Winograd { budget: usize },
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "kiln-conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, bias) = contiguous3([(s1, l1), (s2, l2), (s3, l3)], "conv2d")?;
        let (n, cin, h, wd) = l1.shape().dims4()?;
        let (cout, wcin, kh, kw) = l2.shape().dims4()?;
        let p = self.padding;
        if wcin != cin || bias.len() != cout || h + 2 * p < kh || wd + 2 * p < kw {
            candle_core::bail!(
                "conv2d: input {:?}, weight {:?}, bias {}",
                l1.shape(),
                l2.shape(),
                bias.len()
            );
        }
        let unfold_budget = match self.algorithm {
            ConvAlgorithm::Unfold { budget } => budget,
            ConvAlgorithm::Winograd { budget } => {
                if (kh, kw, p) != (3, 3, 1) {
                    candle_core::bail!("conv2d: Winograd F(2x2, 3x3) takes 3x3 kernels, padding 1");
                }
                let filters = winograd::Filters::f32(w, cout, cin);
                return Ok(winograd_images(x, &filters, bias, (n, cin, h, wd), budget));
            }
        };
        let (ho, wo) = (h + 2 * p + 1 - kh, wd + 2 * p + 1 - kw);
        let plane = ho * wo;
        let k_size = cin * kh * kw;
        // The products accumulate onto each output plane filled with its channel's bias.
        let mut out: Vec<f32> = (0..n * cout)
            .flat_map(|i| std::iter::repeat_n(bias[i % cout], plane))
            .collect();
        let weights = Matrix::row_major(w, cout, k_size, k_size);
        let pointwise = kh * kw == 1 && p == 0;
        let rows_per_block = (unfold_budget / (4 * k_size * wo)).clamp(1, ho);
        let mut unfolded = if pointwise {
            Vec::new()
        } else {
            vec![0f32; k_size * rows_per_block * wo]
        };
        for (img, dst) in x.chunks(cin * h * wd).zip(out.chunks_mut(cout * plane)) {
            if pointwise {
                // A 1x1 convolution is the weight times the input planes.
                matmul(
                    weights,
                    Matrix::row_major(img, cin, plane, plane),
                    dst,
                    plane,
                    true,
                );
                continue;
            }
            for y0 in (0..ho).step_by(rows_per_block) {
                let rows = rows_per_block.min(ho - y0);
                let pixels = rows * wo;
                let cols = &mut unfolded[..k_size * pixels];
                // Row (ci, ky, kx) of the unfolded block holds input channel ci shifted by
                // (ky - p, kx - p) at every output pixel of the block, zero outside the image.
                cols.par_chunks_mut(pixels)
                    .enumerate()
                    .for_each(|(r, line)| {
                        let (ci, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
                        let channel = &img[ci * h * wd..(ci + 1) * h * wd];
                        for (yy, seg) in line.chunks_mut(wo).enumerate() {
                            let iy = (y0 + yy + ky) as isize - p as isize;
                            if iy < 0 || iy >= h as isize {
                                seg.fill(0.0);
                                continue;
                            }
                            let src = &channel[iy as usize * wd..(iy as usize + 1) * wd];
                            // Output column xx reads input column xx + kx - p.
                            let lo = p.saturating_sub(kx).min(wo);
                            let hi = (wd + p).saturating_sub(kx).min(wo).max(lo);
                            seg[..lo].fill(0.0);
                            seg[lo..hi].copy_from_slice(&src[lo + kx - p..hi + kx - p]);
                            seg[hi..].fill(0.0);
                        }
                    });
                let start = y0 * wo;
                let end = start + (cout - 1) * plane + pixels;
                matmul(
                    weights,
                    Matrix::row_major(cols, k_size, pixels, pixels),
                    &mut dst[start..end],
                    plane,
                    true,
                );
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, cout, ho, wo))))
    }
}

/// Winograd's 3x3 convolution (padding 1) of each of the `n` images of `x (n, cin, h, w)`.
fn winograd_images(
    x: &[f32],
    filters: &winograd::Filters,
    bias: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    budget: usize,
) -> (CpuStorage, Shape) {
    let cout = bias.len();
    let shape = winograd::Planes {
        cin,
        cout,
        height: h,
        width: w,
    };
    let mut out = vec![0f32; n * cout * h * w];
    for (img, dst) in x.chunks(cin * h * w).zip(out.chunks_mut(cout * h * w)) {
        winograd::conv3x3(img, filters, bias, shape, budget, dst);
    }
    (CpuStorage::F32(out), Shape::from((n, cout, h, w)))
}

/// A 3x3 convolution with stride 1 and padding 1 (a VAE's) whose products run on the CPU's
/// bf16 instructions: Winograd's F(2x2, 3x3) with the transformed filters rounded to bf16 and
/// packed once, at load; inputs, transforms, sums and outputs stay f32.
pub struct PackedConv3x3 {
    filters: winograd::Filters,
    cin: usize,
    bias: Vec<f32>,
}

impl std::fmt::Debug for PackedConv3x3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedConv3x3({} -> {}, bf16)",
            self.cin,
            self.bias.len()
        )
    }
}

impl PackedConv3x3 {
    /// From a row-major `weight (cout, cin, 3, 3)` and `bias (cout)`.
    pub fn new(weight: &[f32], (cout, cin): (usize, usize), bias: Vec<f32>) -> Self {
        assert_eq!(weight.len(), cout * cin * 9, "a (cout, cin, 3, 3) weight");
        assert_eq!(bias.len(), cout, "bias of {cout} values");
        Self {
            filters: winograd::Filters::bf16(weight, cout, cin),
            cin,
            bias,
        }
    }

    /// The convolution of f32 `x (n, cin, h, w)` on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        on_bf16_kernel(x, self, "bf16 conv2d")
    }
}

impl CustomOp1 for PackedConv3x3 {
    fn name(&self) -> &'static str {
        "kiln-conv3x3-bf16"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        if dims.1 != self.cin {
            candle_core::bail!("conv2d: input {:?}, {self:?}", l.shape());
        }
        let x = contiguous(s, l, "bf16 conv2d")?;
        let budget = winograd::BLOCK_BUDGET;
        Ok(winograd_images(x, &self.filters, &self.bias, dims, budget))
    }
}

/// A stride-1 2-D convolution with zero padding on the CPU in f32. 3x3 kernels with padding 1
/// (a VAE's) go by Winograd's F(2x2, 3x3), with 4/9 of the multiply-adds; others by unfolding
/// a block of output rows at a time (at most 32 MB) and one whole-machine product per block,
/// written straight into the output planes.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: usize) -> Result<Tensor> {
    let algorithm = match (weight.dims(), padding) {
        ([_, _, 3, 3], 1) => ConvAlgorithm::Winograd {
            budget: winograd::BLOCK_BUDGET,
        },
        _ => ConvAlgorithm::Unfold {
            budget: UNFOLD_BUDGET,
        },
    };
    x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &Conv2dOp { padding, algorithm },
    )
}

struct GeluOp;

impl InplaceOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "kiln-gelu-tanh"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (start, end) = match layout.contiguous_offsets() {
            Some(range) => range,
            None => candle_core::bail!("gelu: the input must be contiguous"),
        };
        match storage {
            CpuStorage::F32(v) => pointwise::gelu_tanh_in_place(&mut v[start..end]),
            other => candle_core::bail!("gelu: f32 only, got {:?}", other.dtype()),
        }
        Ok(())
    }
}

/// tanh-approximated GELU of a contiguous f32 CPU tensor, in place: every tensor sharing its
/// storage sees the change, so call it on a tensor the caller alone holds (a layer's fresh
/// output).
pub fn gelu_tanh_in_place(x: &Tensor) -> Result<()> {
    x.inplace_op1(&GeluOp)
}

/// `(width, rows per batch)` of a `(batch, ..., width)` input whose per-batch vectors hold
/// `vector_len` values (one vector for all batches, or one per batch).
fn batched_rows(l: &Layout, vector_len: usize, op: &str) -> Result<(usize, usize)> {
    let dims = l.shape().dims();
    let (batch, width) = match dims {
        [batch, .., width] if dims.len() >= 2 => (*batch, *width),
        _ => candle_core::bail!("{op}: input {dims:?} has no batch and width"),
    };
    if vector_len != width && vector_len != batch * width {
        candle_core::bail!("{op}: {vector_len} modulation values for input {dims:?}");
    }
    Ok((width, l.shape().elem_count() / width / batch.max(1)))
}

/// `layer_norm(x) * (1 + scale) + shift` over the last dimension.
struct ModulatedLayerNormOp {
    eps: f32,
}

impl CustomOp3 for ModulatedLayerNormOp {
    fn name(&self) -> &'static str {
        "kiln-modulated-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "modulated layer norm";
        let (x, shift, scale) = contiguous3([(s1, l1), (s2, l2), (s3, l3)], op)?;
        let (width, rows) = batched_rows(l1, shift.len(), op)?;
        if scale.len() != shift.len() {
            candle_core::bail!(
                "{op}: {} shift and {} scale values",
                shift.len(),
                scale.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        pointwise::modulated_layer_norm(x, width, rows, shift, scale, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// FLUX's adaLN on the CPU in f32: `layer_norm(x) * (1 + scale) + shift` over the last
/// dimension of `x (batch, ..., width)`, without the norm's own affine parameters; `shift`
/// and `scale` hold one `width` vector, or one per batch.
pub fn modulated_layer_norm(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &shift.contiguous()?,
        &scale.contiguous()?,
        &ModulatedLayerNormOp { eps: eps as f32 },
    )
}

struct GatedResidualOp;

impl CustomOp3 for GatedResidualOp {
    fn name(&self) -> &'static str {
        "kiln-gated-residual"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "gated residual";
        let (x, gate, y) = contiguous3([(s1, l1), (s2, l2), (s3, l3)], op)?;
        if l3.shape() != l1.shape() {
            candle_core::bail!("{op}: x {:?} and y {:?}", l1.shape(), l3.shape());
        }
        let (width, rows) = batched_rows(l1, gate.len(), op)?;
        let mut out = vec![0f32; x.len()];
        pointwise::gated_residual(x, gate, y, width, rows, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x + gate * y` on the CPU in f32 for `x, y (batch, ..., width)` and a `gate` of one
/// `width` vector or one per batch: the gated residual of FLUX's blocks.
pub fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(&gate.contiguous()?, &y.contiguous()?, &GatedResidualOp)
}

/// Attention's queries, keys or values `(batch, heads, Σ seq, head_dim)` from the projections
/// of one or more token sequences, joined in order: each part `(batch, seq, heads * head_dim)`
/// with its last dimension contiguous (a linear layer's output, or columns of one), paired with
/// the RMS norm weight of its heads where they are normalised; then RoPE where `rope` gives
/// `cos` and `sin` tables of the joined sequence (`(..., seq, head_dim)`), in interleaved pairs
/// (diffusers' `apply_rotary_emb` with `use_real_unbind_dim=-1`). f32 on the CPU. One parallel pass, where the composite (split, norm, transpose, concatenation,
/// RoPE) copied and rewrote the operand several times, mostly on one thread.
pub fn heads(
    parts: &[(&Tensor, Option<&Tensor>)],
    heads: usize,
    eps: f64,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let first = parts
        .first()
        .map(|p| p.0)
        .ok_or_else(|| candle_core::Error::Msg("heads: no parts".into()))?;
    let (batch, _, width) = first.dims3()?;
    if heads == 0 || width % heads != 0 {
        candle_core::bail!("heads: {width} values are not {heads} heads");
    }
    let d = width / heads;
    let norms: Vec<Option<Tensor>> = parts
        .iter()
        .map(|(_, w)| w.map(|w| w.contiguous()).transpose())
        .collect::<Result<_>>()?;
    let tables = match rope {
        Some((c, s)) => Some((c.contiguous()?, s.contiguous()?)),
        None => None,
    };
    let guards: Vec<_> = parts.iter().map(|(x, _)| x.storage_and_layout()).collect();
    let norm_guards: Vec<_> = norms
        .iter()
        .map(|w| w.as_ref().map(|w| w.storage_and_layout()))
        .collect();
    let table_guards = tables
        .as_ref()
        .map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
    let mut views = Vec::with_capacity(parts.len());
    for ((storage, layout), norm) in guards.iter().zip(&norm_guards) {
        let (b, seq, w) = layout.shape().dims3()?;
        let [batch_stride, row_stride, unit] = layout.stride()[..] else {
            unreachable!()
        };
        if (b, w, unit) != (batch, width, 1) {
            candle_core::bail!(
                "heads: a part of {:?} beside {:?}",
                layout.shape(),
                first.shape()
            );
        }
        let norm = match norm {
            Some((s, l)) => Some(contiguous_len(s, l, d, "heads: norm weight")?),
            None => None,
        };
        // A part may be strided (columns of a wider projection): its values from its start.
        let CpuStorage::F32(data) = cpu_storage(storage, "heads")? else {
            candle_core::bail!("heads: f32 only");
        };
        let data = &data[layout.start_offset()..];
        views.push(pointwise::HeadsPart {
            data,
            batch_stride,
            row_stride,
            seq,
            norm,
        });
    }
    let total: usize = views.iter().map(|p| p.seq).sum();
    let rope = match &table_guards {
        Some(((cs, cl), (ss, sl))) => Some((
            contiguous_len(cs, cl, total * d, "heads: cos")?,
            contiguous_len(ss, sl, total * d, "heads: sin")?,
        )),
        None => None,
    };
    let len = batch * heads * total * d;
    let mut out = Vec::with_capacity(len);
    pointwise::heads(
        &views,
        (batch, heads, d),
        eps as f32,
        rope,
        &mut out.spare_capacity_mut()[..len],
    );
    // SAFETY: `pointwise::heads` wrote all `len` values.
    unsafe { out.set_len(len) };
    Tensor::from_vec(out, (batch, heads, total, d), first.device())
}

/// A tensor's storage on the CPU (ops outside candle's `CustomOp`s read it directly).
fn cpu_storage<'a>(storage: &'a candle_core::Storage, what: &str) -> Result<&'a CpuStorage> {
    match storage {
        candle_core::Storage::Cpu(s) => Ok(s),
        _ => candle_core::bail!("{what}: on the CPU only"),
    }
}

/// [`contiguous`] of a CPU tensor's storage, which must hold `len` values.
fn contiguous_len<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    len: usize,
    what: &str,
) -> Result<&'a [f32]> {
    let values = contiguous(cpu_storage(storage, what)?, layout, what)?;
    if values.len() != len {
        candle_core::bail!("{what}: {:?}, {len} values wanted", layout.shape());
    }
    Ok(values)
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "kiln-group-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "group norm";
        let (x, weight, bias) = contiguous3([(s1, l1), (s2, l2), (s3, l3)], op)?;
        let dims = l1.shape().dims();
        let channels = dims.get(1).copied().unwrap_or(0);
        if dims.len() < 3
            || channels % self.groups.max(1) != 0
            || weight.len() != channels
            || bias.len() != channels
        {
            candle_core::bail!(
                "{op}: input {dims:?}, {} groups, {} weights, {} biases",
                self.groups,
                weight.len(),
                bias.len()
            );
        }
        let shape = Groups {
            channels,
            pixels: dims[2..].iter().product(),
            groups: self.groups,
        };
        let mut out = vec![0f32; x.len()];
        pointwise::group_norm(x, shape, weight, bias, self.eps, self.silu, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GroupNorm of `x (images, channels, ...)` in `groups` groups with a per-channel affine, and
/// SiLU after it when `silu`, on the CPU in f32.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &GroupNormOp { groups, eps, silu },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{max_abs_diff, values};
    use candle_core::Device;

    #[test]
    fn conv2d_matches_candles() {
        let dev = &Device::Cpu;
        for (cin, cout, h, w, k, p) in [
            (3, 5, 9, 7, 3, 1),
            (4, 2, 6, 6, 1, 0),
            (2, 3, 5, 8, 3, 0),
            (6, 4, 4, 5, 3, 2),
            (5, 7, 8, 11, 3, 1),
            (4, 3, 1, 1, 3, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, dev).unwrap();
            // Two output rows per unfolded block: several blocks, the last one partial.
            let k_size = cin * k * k;
            let op = Conv2dOp {
                padding: p,
                algorithm: ConvAlgorithm::Unfold {
                    budget: 4 * k_size * (w + 2 * p + 1 - k) * 2,
                },
            };
            let got = x.apply_op3_no_bwd(&wt, &b, &op).unwrap();
            let whole = x
                .apply_op3_no_bwd(
                    &wt,
                    &b,
                    &Conv2dOp {
                        padding: p,
                        algorithm: ConvAlgorithm::Unfold {
                            budget: UNFOLD_BUDGET,
                        },
                    },
                )
                .unwrap();
            let want = x
                .conv2d(&wt, p, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let elements = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = max_abs_diff(&elements(&got), &elements(&want));
            assert!(err < 1e-4, "{cin} {cout} {h} {w} {k} {p}: {err}");
            // Blocks are the same sums as the whole image, but a BLAS picks its kernels by
            // the product's shape, so it may add a block's terms in another order (OpenBLAS
            // 0.3.21 does: 2e-6 here). Both orders lie within the forward error bound of a
            // (k + 1)-term sum (the bias is a term), (k + 1) u (|b| + sum |w| |x|), of the exact
            // value, so they differ by at most twice that at each output.
            let magnitudes = x
                .abs()
                .unwrap()
                .conv2d(&wt.abs().unwrap(), p, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.abs().unwrap().reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let unit_roundoff = f32::EPSILON / 2.0;
            let rounding = 2.0 * (k_size + 1) as f32 * unit_roundoff;
            for ((blocked, whole), size) in elements(&got)
                .into_iter()
                .zip(elements(&whole))
                .zip(elements(&magnitudes))
            {
                let bound = rounding * size;
                assert!(
                    (blocked - whole).abs() <= bound,
                    "blocks change the result: {blocked} against {whole} (bound {bound})"
                );
            }
            if (k, p) == (3, 1) {
                // One tile row per block: several blocks, the last one partial when h is odd.
                let tile_cols = w.div_ceil(2);
                let op = Conv2dOp {
                    padding: p,
                    algorithm: ConvAlgorithm::Winograd {
                        budget: 4 * 16 * (cin + cout) * tile_cols,
                    },
                };
                let fast = x.apply_op3_no_bwd(&wt, &b, &op).unwrap();
                // The transforms' sums of up to 16 terms and halvings add to the direct
                // sum's rounding: within a small multiple of its bound.
                for ((fast, exact), size) in elements(&fast)
                    .into_iter()
                    .zip(elements(&want))
                    .zip(elements(&magnitudes))
                {
                    let bound = 8.0 * rounding * size;
                    assert!(
                        (fast - exact).abs() <= bound,
                        "Winograd: {fast} against {exact} (bound {bound})"
                    );
                }
            }
        }
    }

    /// The bf16 Winograd convolution against candle's f32 one: the transformed filters and
    /// inputs are rounded to bf16 (relative error 2^-9 each), and the transforms' sums widen
    /// that by a small factor, so every output lies within a small multiple of bf16's rounding
    /// of `|b| + sum |w| |x|`; odd sizes, channels over one 32-wide tile, and the same result
    /// in several blocks as in one.
    #[test]
    fn bf16_winograd_stays_within_bf16_rounding_of_the_direct_convolution() {
        if bf16::kernel().is_none() {
            eprintln!("SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16");
            return;
        }
        let dev = &Device::Cpu;
        let elements = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut worst = 0f32;
        for (cin, cout, h, w) in [(3, 5, 9, 7), (40, 33, 13, 18), (64, 70, 1, 1)] {
            // Fixed inputs: the worst case is a property of the data, so random ones would
            // make a flaky bound (over 25 random draws the worst ranged 2.6-5.5).
            let t = |n: usize, seed: u64, shape: &[usize]| {
                Tensor::from_vec(values(n, seed, 2.0), shape, dev).unwrap()
            };
            let x = t(2 * cin * h * w, 7, &[2, cin, h, w]);
            let wt = t(cout * cin * 9, 8, &[cout, cin, 3, 3]);
            let b = t(cout, 9, &[cout]);
            let conv = PackedConv3x3::new(&elements(&wt), (cout, cin), elements(&b));
            let got = conv.forward(&x).unwrap();
            // Two tile rows per block (9 and 13 rows make 5 and 7 tile rows, so the last
            // block holds one): each tile's sums are the same, in the same order, as in one.
            let budget = 2 * 4 * 16 * (cin + cout) * w.div_ceil(2);
            let (blocked, _) = winograd_images(
                &elements(&x),
                &conv.filters,
                &conv.bias,
                (2, cin, h, w),
                budget,
            );
            assert!(matches!(&blocked, CpuStorage::F32(v) if *v == elements(&got)));
            let direct = |x: &Tensor, wt: &Tensor, b: &Tensor| {
                x.conv2d(wt, 1, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
                    .unwrap()
            };
            let want = direct(&x, &wt, &b);
            assert_eq!(got.dims(), want.dims());
            let magnitudes = direct(&x.abs().unwrap(), &wt.abs().unwrap(), &b.abs().unwrap());
            let unit_roundoff = 2f32.powi(-9);
            for ((got, want), size) in elements(&got)
                .into_iter()
                .zip(elements(&want))
                .zip(elements(&magnitudes))
            {
                let ratio = (got - want).abs() / (unit_roundoff * size);
                worst = worst.max(ratio);
                assert!(ratio <= 8.0, "{cin} {cout} {h} {w}: {got} against {want}");
            }
        }
        eprintln!("worst error: {worst} x bf16's rounding of the magnitudes");
    }

    /// `heads` against the composite it replaces (reshape, RMS norm, transpose, concatenation,
    /// RoPE), with a contiguous part and one that is columns of a wider projection, with and
    /// without norms and tables, over two batches.
    #[test]
    fn heads_equal_the_composite() {
        let dev = &Device::Cpu;
        let (b, h, d, eps) = (2, 3, 8, 1e-6);
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, dev).unwrap();
        let text = t(values(b * 5 * h * d, 1, 2.0), &[b, 5, h * d]);
        let wide = t(values(b * 7 * 3 * h * d, 2, 2.0), &[b, 7, 3 * h * d]);
        let image = wide.narrow(2, h * d, h * d).unwrap();
        let (wt, wi) = (t(values(d, 3, 1.0), &[d]), t(values(d, 4, 1.0), &[d]));
        let (cos, sin) = (
            t(values(12 * d, 5, 1.0), &[1, 1, 12, d]),
            t(values(12 * d, 6, 1.0), &[1, 1, 12, d]),
        );
        let composite = |x: &Tensor, w: Option<&Tensor>| {
            let (_, s, _) = x.dims3().unwrap();
            let x = x.contiguous().unwrap().reshape((b, s, h, d)).unwrap();
            let x = match w {
                Some(w) => {
                    let rms = (x.sqr().unwrap().mean_keepdim(3).unwrap() + eps)
                        .unwrap()
                        .sqrt()
                        .unwrap();
                    x.broadcast_div(&rms).unwrap().broadcast_mul(w).unwrap()
                }
                None => x,
            };
            x.transpose(1, 2).unwrap()
        };
        for norms in [false, true] {
            let (nt, ni) = if norms {
                (Some(&wt), Some(&wi))
            } else {
                (None, None)
            };
            let joined = Tensor::cat(&[composite(&text, nt), composite(&image, ni)], 2).unwrap();
            // diffusers' rotation of interleaved pairs: (re, im) -> (re c - im s, im c + re s).
            let pairs = joined.reshape((b, h, 12, d / 2, 2)).unwrap();
            let (re, im) = (
                pairs.narrow(4, 0, 1).unwrap(),
                pairs.narrow(4, 1, 1).unwrap(),
            );
            let turned = Tensor::cat(&[&im.neg().unwrap(), &re], 4).unwrap();
            let turned = turned.reshape((b, h, 12, d)).unwrap();
            let rotated = (joined.broadcast_mul(&cos).unwrap()
                + turned.broadcast_mul(&sin).unwrap())
            .unwrap();
            for (tables, want) in [(None, &joined), (Some((&cos, &sin)), &rotated)] {
                let got = heads(&[(&text, nt), (&image, ni)], h, eps, tables).unwrap();
                assert_eq!(got.dims(), &[b, h, 12, d]);
                let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let err = max_abs_diff(&flat(&got), &flat(want));
                assert!(
                    err < 1e-5,
                    "norms {norms}, rope {}: {err}",
                    tables.is_some()
                );
            }
        }
    }
}
