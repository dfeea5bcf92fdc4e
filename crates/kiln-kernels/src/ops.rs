//! candle ops on the CPU kernels: a linear layer with its bias fused into the product, and
//! attention that never holds more than a tile of scores. Both take f32 tensors on the CPU;
//! callers keep candle's own ops for other devices and dtypes.

use crate::attention::attend;
use crate::gemm::{matmul, Matrix, Threads};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

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

/// `y = x W^T + b` for `x (..., in)`, `W (out, in)`, `b (out)`.
struct LinearOp;

impl LinearOp {
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous(x.0, x.1, "linear")?;
        let ws = contiguous(w.0, w.1, "linear")?;
        let (n, k) = w.1.shape().dims2()?;
        let dims = x.1.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear: input {:?} for a weight of {n} x {k}", dims);
        }
        let m = xs.len() / k;
        let mut y = vec![0f32; m * n];
        let accumulate = match b {
            Some((bs, bl)) => {
                let bias = contiguous(bs, bl, "linear")?;
                y.chunks_mut(n).for_each(|row| row.copy_from_slice(bias));
                true
            }
            None => false,
        };
        matmul(
            Matrix::row_major(xs, m, k, k),
            Matrix::transposed(ws, k, n, k),
            &mut y,
            n,
            accumulate,
            Threads::All,
        );
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = n;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
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

struct AttentionOp {
    scale: f32,
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
        let (q, k, v) = (
            contiguous(s1, l1, "attention")?,
            contiguous(s2, l2, "attention")?,
            contiguous(s3, l3, "attention")?,
        );
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
        let out = attend(q, k, v, [b, h, sq, sk, d], self.scale);
        Ok((CpuStorage::F32(out), Shape::from((b, sq, h, d))))
    }
}

/// `softmax(q k^T * scale) v` for `(batch, heads, seq, head_dim)` f32 tensors on the CPU,
/// returned as `(batch, seq, heads, head_dim)`: the heads already side by side, as the output
/// projection wants them.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &AttentionOp {
            scale: scale as f32,
        },
    )
}
