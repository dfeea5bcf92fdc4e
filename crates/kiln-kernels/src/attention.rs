//! Softmax attention by tiles with an online softmax (the FlashAttention recurrence): each
//! task takes [`QUERY_TILE`] queries of one head through every key in tiles of [`KEY_TILE`],
//! keeping per query the running maximum score, the running sum of exponentials and the
//! running weighted sum of values, rescaled whenever the maximum grows. Scores never exist for
//! more than one tile per thread, so memory is linear in the tokens (a 1024x1024 FLUX image's
//! 4608 tokens would need 2 GB of f32 scores for its 24 heads at once).
//!
//! Everything is f32; the exponential is a polynomial accurate to about 2 ulp, written so that
//! the compiler vectorises it (AVX-512 where the CPU has it, chosen at run time).

use crate::gemm::{matmul, Matrix, Threads};
use rayon::prelude::*;

const QUERY_TILE: usize = 64;
const KEY_TILE: usize = 256;
/// Lanes of the manual reductions: one AVX-512 register of f32.
const LANES: usize = 16;

/// The output rows a task writes: disjoint between tasks (one head's rows of one query tile).
#[derive(Clone, Copy)]
struct Output(*mut f32);
// SAFETY: tasks write disjoint elements of the output, which outlives the parallel loop.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// # Safety
    /// `start..start + len` lies in the output, and no other task touches it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// `softmax(q k^T * scale) v` for contiguous `q (b, h, sq, d)`, `k, v (b, h, sk, d)`; the
/// result is `(b, sq, h, d)`.
pub(crate) fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [b, h, sq, sk, d]: [usize; 5],
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; b * sq * h * d];
    let tiles = sq.div_ceil(QUERY_TILE);
    let output = Output(out.as_mut_ptr());
    let scratch = || Scratch {
        scores: vec![0.0; QUERY_TILE * KEY_TILE],
        acc: vec![0.0; QUERY_TILE * d],
        max: vec![0.0; QUERY_TILE],
        sum: vec![0.0; QUERY_TILE],
    };
    (0..b * h * tiles)
        .into_par_iter()
        .for_each_init(scratch, |s, task| {
            let (head, tile) = (task / tiles, task % tiles);
            let q0 = tile * QUERY_TILE;
            let rows = QUERY_TILE.min(sq - q0);
            let qh = &q[(head * sq + q0) * d..(head * sq + q0 + rows) * d];
            let kh = &k[head * sk * d..(head + 1) * sk * d];
            let vh = &v[head * sk * d..(head + 1) * sk * d];
            s.max[..rows].fill(f32::NEG_INFINITY);
            s.sum[..rows].fill(0.0);
            s.acc[..rows * d].fill(0.0);
            for k0 in (0..sk).step_by(KEY_TILE) {
                let cols = KEY_TILE.min(sk - k0);
                let scores = &mut s.scores[..rows * cols];
                matmul(
                    Matrix::row_major(qh, rows, d, d),
                    Matrix::transposed(&kh[k0 * d..(k0 + cols) * d], d, cols, d),
                    scores,
                    cols,
                    false,
                    Threads::One,
                );
                softmax_step(
                    scores,
                    cols,
                    scale,
                    &mut s.max[..rows],
                    &mut s.sum[..rows],
                    &mut s.acc[..rows * d],
                );
                matmul(
                    Matrix::row_major(scores, rows, cols, cols),
                    Matrix::row_major(&vh[k0 * d..(k0 + cols) * d], cols, d, d),
                    &mut s.acc[..rows * d],
                    d,
                    true,
                    Threads::One,
                );
            }
            let (bi, hi) = (head / h, head % h);
            for i in 0..rows {
                let inv = 1.0 / s.sum[i];
                let start = ((bi * sq + q0 + i) * h + hi) * d;
                // SAFETY: row (bi, q0 + i, hi) of the output belongs to this task alone.
                let dst = unsafe { output.row(start, d) };
                for (o, a) in dst.iter_mut().zip(&s.acc[i * d..(i + 1) * d]) {
                    *o = a * inv;
                }
            }
        });
    out
}

/// One key tile of the online softmax: turns raw scores into `exp(score * scale - max)`
/// against the new running maximum, and rescales the running sums and outputs to it.
fn softmax_step(
    scores: &mut [f32],
    cols: usize,
    scale: f32,
    max: &mut [f32],
    sum: &mut [f32],
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { softmax_step_avx512(scores, cols, scale, max, sum, acc) };
    }
    softmax_step_body(scores, cols, scale, max, sum, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn softmax_step_avx512(
    scores: &mut [f32],
    cols: usize,
    scale: f32,
    max: &mut [f32],
    sum: &mut [f32],
    acc: &mut [f32],
) {
    softmax_step_body(scores, cols, scale, max, sum, acc)
}

#[inline(always)]
fn softmax_step_body(
    scores: &mut [f32],
    cols: usize,
    scale: f32,
    max: &mut [f32],
    sum: &mut [f32],
    acc: &mut [f32],
) {
    let d = acc.len() / max.len();
    for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
        let new_max = max[i].max(lane_max(row) * scale);
        let correction = exp(max[i] - new_max);
        let mut lanes = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (x, l) in chunk.iter_mut().zip(&mut lanes) {
                *x = exp(*x * scale - new_max);
                *l += *x;
            }
        }
        let mut tile_sum: f32 = lanes.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp(*x * scale - new_max);
            tile_sum += *x;
        }
        sum[i] = sum[i] * correction + tile_sum;
        max[i] = new_max;
        if correction != 1.0 {
            acc[i * d..(i + 1) * d]
                .iter_mut()
                .for_each(|a| *a *= correction);
        }
    }
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

/// `e^x` for f32 (Cephes' `expf`): `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6
/// polynomial for `e^r`, and `2^n` built in the exponent bits. Below -87 it returns
/// `e^-87` (~1.6e-38) rather than a denormal or 0, which no softmax weight notices; `-inf`
/// (an empty running maximum) gives 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    if x == f32::NEG_INFINITY {
        return 0.0;
    }
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64, spread: f32) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread
            })
            .collect()
    }

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
    fn tiles_and_online_softmax_match_the_definition() {
        // Sizes that leave partial tiles on both axes, and scores large enough that the
        // running maximum moves between key tiles.
        for (dims, spread) in [
            ([2, 3, 150, 300, 16], 4.0),
            ([1, 2, 64, 513, 32], 12.0),
            ([1, 1, 7, 5, 8], 1.0),
        ] {
            let [b, h, sq, sk, d] = dims;
            let q = values(b * h * sq * d, 1, spread);
            let k = values(b * h * sk * d, 2, spread);
            let v = values(b * h * sk * d, 3, 2.0);
            let scale = 1.0 / (d as f32).sqrt();
            let got = attend(&q, &k, &v, dims, scale);
            let want = reference(&q, &k, &v, dims, scale);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 2e-5, "{dims:?}: {err}");
        }
    }

    #[test]
    fn exp_is_accurate_where_softmax_uses_it() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - want).abs() / want);
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }
}
