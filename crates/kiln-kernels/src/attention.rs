//! Softmax attention a head per thread, a block of queries at a time: the scores of a block of
//! queries against every key are one matrix product, their softmax is computed row by row in
//! place, and one more product writes the block's output into the head's own buffer; the heads'
//! buffers are then interleaved into the `(batch, seq, heads, head_dim)` result. Memory is
//! therefore linear in the tokens (a 1024x1024 FLUX image's 4608 tokens would need 2 GB of f32
//! scores for its 24 heads at once; here at most [`SCORES_BUDGET`] over all threads), and both
//! products run on the fastest matrix kernel the machine has. (A fused FlashAttention-style loop
//! over small tiles was measured first: its small per-tile products ran at well under half the
//! speed of these.) Heads run in parallel rather than each product over the machine: on the AMX
//! development machine (2 cores) that took a 1024x1024 bf16 transformer call from 2.98-3.01 to
//! 2.60-2.77 s, with no synchronisation between the phases of a block and each head's operands
//! in its core's caches (BENCHMARKS.md).
//!
//! The products run in f32 or in bf16 with f32 sums ([`Products`]: the scores' probabilities
//! and the keys and values rounded to bf16, as PyTorch's bf16 attention has them); the softmax
//! is f32 either way and vectorises (AVX-512 or AVX2, chosen at run time).

use crate::bf16::{self, PackedA, PackedB};
use crate::gemm::{matmul, Matrix};
use crate::ops::Products;
use crate::simd::{exp, vectorised, LANES};
use rayon::prelude::*;

/// Bytes of scores at once over all threads (each thread's block of queries gets its share).
const SCORES_BUDGET: usize = 32 << 20;
/// Bytes of scores per thread in bf16, smaller: a thread rereads its block's scores (softmax and
/// packing) while they are in its core's L2. Measured with heads in parallel (2 threads, AMX):
/// 1 MiB against 4 MiB, 2.51-2.64 against 2.66-2.76 s for a 1024x1024 transformer call.
const BF16_SCORES_BUDGET: usize = 1 << 20;

/// `softmax(q k^T * scale) v` for contiguous `q (b, h, sq, d)`, `k, v (b, h, sk, d)`; the
/// result is `(b, sq, h, d)`.
pub(crate) fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [b, h, sq, sk, d]: [usize; 5],
    scale: f32,
    products: Products,
) -> Vec<f32> {
    let share = SCORES_BUDGET / rayon::current_num_threads().max(1);
    let budget = match products {
        Products::F32 => share,
        Products::Bf16 => BF16_SCORES_BUDGET.min(share),
    };
    let block = (budget / (4 * sk.max(1))).clamp(1, sq.max(1));
    // Heads in parallel, each on one thread (its products' own tasks run there too while the
    // other threads have heads of their own), each into a `(sq, d)` buffer of its own.
    let per_head: Vec<Vec<f32>> = (0..b * h)
        .into_par_iter()
        .map_init(
            || vec![0f32; block * sk],
            |scores, head| {
                let kh = &k[head * sk * d..(head + 1) * sk * d];
                let vh = &v[head * sk * d..(head + 1) * sk * d];
                let keys = Operand::new(products, Matrix::transposed(kh, d, sk, d));
                let values = Operand::new(products, Matrix::row_major(vh, sk, d, d));
                let mut out = vec![0f32; sq * d];
                for q0 in (0..sq).step_by(block) {
                    let rows = block.min(sq - q0);
                    let qh = &q[(head * sq + q0) * d..(head * sq + q0 + rows) * d];
                    let scores = &mut scores[..rows * sk];
                    keys.multiply(Matrix::row_major(qh, rows, d, d), scores, sk);
                    let o = &mut out[q0 * d..(q0 + rows) * d];
                    values.weigh(scores, (rows, sk), scale, o, d);
                }
                out
            },
        )
        .collect();
    // Row (bi, s) of the result holds every head's row s side by side.
    let mut out = vec![0f32; b * sq * h * d];
    out.par_chunks_mut(h * d.max(1))
        .enumerate()
        .for_each(|(row, o)| {
            let (bi, s) = (row / sq.max(1), row % sq.max(1));
            for (hi, o) in o.chunks_mut(d.max(1)).enumerate() {
                o.copy_from_slice(&per_head[bi * h + hi][s * d..(s + 1) * d]);
            }
        });
    out
}

/// The right operand of one of attention's products, in its precision.
enum Operand<'a> {
    F32(Matrix<'a>),
    Bf16(PackedB),
}

impl<'a> Operand<'a> {
    fn new(products: Products, b: Matrix<'a>) -> Self {
        match products {
            Products::F32 => Operand::F32(b),
            Products::Bf16 => Operand::Bf16(PackedB::pack(b)),
        }
    }

    /// `c = a * self`, rows of `c` `ldc` apart.
    fn multiply(&self, a: Matrix, c: &mut [f32], ldc: usize) {
        match self {
            Operand::F32(b) => matmul(a, *b, c, ldc, false),
            Operand::Bf16(b) => bf16::matmul(a, b, c, ldc, false),
        }
    }

    /// `c = softmax(scores * scale) * self` (the values). In bf16 each row's softmax runs as
    /// the probabilities are packed, while the row is in cache.
    fn weigh(
        &self,
        scores: &mut [f32],
        (rows, sk): (usize, usize),
        scale: f32,
        c: &mut [f32],
        ldc: usize,
    ) {
        match self {
            Operand::F32(b) => {
                scores[..rows * sk]
                    .par_chunks_mut(sk)
                    .for_each(|row| softmax(row, scale));
                matmul(Matrix::row_major(scores, rows, sk, sk), *b, c, ldc, false)
            }
            Operand::Bf16(b) => {
                let p = PackedA::pack_rows_with(scores, (rows, sk), |row| softmax(row, scale));
                bf16::matmul_packed(&p, b, c, ldc, false)
            }
        }
    }
}

/// `row = softmax(row * scale)`, in place.
fn softmax(row: &mut [f32], scale: f32) {
    vectorised(
        #[inline(always)]
        || {
            let max = lane_max(row) * scale;
            let mut lanes = [0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for chunk in &mut chunks {
                for (x, l) in chunk.iter_mut().zip(&mut lanes) {
                    *x = exp(*x * scale - max);
                    *l += *x;
                }
            }
            let mut sum: f32 = lanes.iter().sum();
            for x in chunks.into_remainder() {
                *x = exp(*x * scale - max);
                sum += *x;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        },
    )
}

#[inline(always)]
fn lane_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (x, l) in chunk.iter().zip(&mut lanes) {
            *l = if *x > *l { *x } else { *l };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{max_abs_diff, values};

    /// The textbook computation in f64.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        [b, h, sq, sk, d]: [usize; 5],
        scale: f32,
    ) -> Vec<f32> {
        let mut out = vec![0f32; b * sq * h * d];
        for bh in 0..b * h {
            for i in 0..sq {
                let qi = &q[(bh * sq + i) * d..][..d];
                let scores: Vec<f64> = (0..sk)
                    .map(|j| {
                        qi.iter()
                            .zip(&k[(bh * sk + j) * d..][..d])
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let total: f64 = w.iter().sum();
                for c in 0..d {
                    let o: f64 = (0..sk)
                        .map(|j| w[j] * v[(bh * sk + j) * d + c] as f64)
                        .sum::<f64>()
                        / total;
                    out[((bh / h * sq + i) * h + bh % h) * d + c] = o as f32;
                }
            }
        }
        out
    }

    #[test]
    fn blocks_match_the_definition() {
        // Sizes with a single block and, with the long keys, two (64 queries, then 6).
        for (dims, spread) in [
            ([2, 3, 150, 300, 16], 4.0),
            ([1, 2, 70, 131_072, 4], 12.0),
            ([1, 1, 7, 5, 8], 1.0),
        ] {
            let [b, h, sq, sk, d] = dims;
            let q = values(b * h * sq * d, 1, spread);
            let k = values(b * h * sk * d, 2, spread);
            let v = values(b * h * sk * d, 3, 2.0);
            let scale = 1.0 / (d as f32).sqrt();
            let want = reference(&q, &k, &v, dims, scale);
            let got = attend(&q, &k, &v, dims, scale, Products::F32);
            let err = max_abs_diff(&got, &want);
            assert!(err < 2e-5, "{dims:?}: {err}");
            if bf16::kernel().is_none() {
                eprintln!("SKIPPED: bf16 attention (this CPU has no bf16 instructions)");
                continue;
            }
            // bf16 operands: the exact attention of the rounded queries, keys and values, but
            // for the probabilities' own rounding (2^-9 of each, on values within 1).
            let round = |x: &[f32]| -> Vec<f32> {
                x.iter()
                    .map(|&x| bf16::from_bf16(bf16::to_bf16(x)))
                    .collect()
            };
            let want = reference(&round(&q), &round(&k), &round(&v), dims, scale);
            let got = attend(&q, &k, &v, dims, scale, Products::Bf16);
            let err = max_abs_diff(&got, &want);
            assert!(err < 5e-3, "bf16 {dims:?}: {err}");
        }
    }
}
