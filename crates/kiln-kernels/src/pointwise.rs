//! The memory-bound layers between the matrix products, each one parallel pass (two for the
//! norms' statistics) where candle's composites make several single-purpose passes and
//! allocate a tensor for each: tanh-GELU in place, layer norm fused with FLUX's adaLN
//! modulation, the gated residual `x + gate * y`, and GroupNorm fused with the SiLU after it.
//!
//! Rows are batched: a `(batch, rows, width)` input whose per-batch vectors (shift, scale,
//! gate) are `(batch or 1, width)`.

use crate::simd::{exp, vectorised, LANES};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows handed to one task: enough work to amortise a task, few enough to balance threads.
const ROWS_PER_TASK: usize = 16;

/// The per-batch vector for row `row` of a batch of `rows_per_batch` rows.
fn for_row(v: &[f32], width: usize, row: usize, rows_per_batch: usize) -> &[f32] {
    let batch = if v.len() == width {
        0
    } else {
        row / rows_per_batch
    };
    &v[batch * width..(batch + 1) * width]
}

/// `x = gelu(x)` with PyTorch's tanh approximation ([`gelu_tanh`]).
pub(crate) fn gelu_tanh_in_place(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(|chunk| {
        vectorised(
            #[inline(always)]
            || chunk.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
        )
    });
}

/// PyTorch's tanh-approximated GELU, `x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))`;
/// inlined into vectorised loops (this pass, and the bf16 products' epilogue).
#[inline(always)]
pub(crate) fn gelu_tanh(v: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v);
    // tanh(u) = 1 - 2 / (e^(2u) + 1); exp saturates, so |u| large gives +-1.
    let tanh = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    0.5 * v * (1.0 + tanh)
}

/// Mean and `1 / sqrt(variance + eps)` of a row, the variance from the centred values (as
/// PyTorch's layer norm), summed in [`LANES`] lanes.
#[inline(always)]
fn row_statistics(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row.iter().copied()) / n;
    let var = lane_sum(row.iter().map(|v| (v - mean) * (v - mean))) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn lane_sum(values: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0f32; LANES];
    for (i, v) in values.enumerate() {
        lanes[i % LANES] += v;
    }
    lanes.iter().sum()
}

/// `out = layer_norm(x) * (1 + scale) + shift` over rows of `width`: FLUX's adaLN
/// (`LayerNorm(elementwise_affine=False)`, then the modulation).
pub(crate) fn modulated_layer_norm(
    x: &[f32],
    width: usize,
    rows_per_batch: usize,
    shift: &[f32],
    scale: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(task, (out, x))| {
            vectorised(
                #[inline(always)]
                || {
                    for (i, (o, row)) in out.chunks_mut(width).zip(x.chunks(width)).enumerate() {
                        let r = task * ROWS_PER_TASK + i;
                        let shift = for_row(shift, width, r, rows_per_batch);
                        let scale = for_row(scale, width, r, rows_per_batch);
                        let (mean, inv_std) = row_statistics(row, eps);
                        for (((o, v), s), t) in o.iter_mut().zip(row).zip(scale).zip(shift) {
                            *o = (v - mean) * inv_std * (1.0 + s) + t;
                        }
                    }
                },
            )
        });
}

/// `out = x + gate * y` over rows of `width`, `gate` per batch.
pub(crate) fn gated_residual(
    x: &[f32],
    gate: &[f32],
    y: &[f32],
    width: usize,
    rows_per_batch: usize,
    out: &mut [f32],
) {
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .zip(y.par_chunks(width * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(task, ((out, x), y))| {
            vectorised(
                #[inline(always)]
                || {
                    let rows = out
                        .chunks_mut(width)
                        .zip(x.chunks(width))
                        .zip(y.chunks(width));
                    for (i, ((o, x), y)) in rows.enumerate() {
                        let gate = for_row(gate, width, task * ROWS_PER_TASK + i, rows_per_batch);
                        for (((o, x), y), g) in o.iter_mut().zip(x).zip(y).zip(gate) {
                            *o = x + g * y;
                        }
                    }
                },
            )
        });
}

/// One interleaved pair `x = (re, im)` rotated by its tables' entries: `(re cos[0] - im sin[0],
/// im cos[1] + re sin[1])`, diffusers' rotation.
#[inline(always)]
fn rotate_pair(x: &[f32], cos: &[f32], sin: &[f32]) -> [f32; 2] {
    let (re, im) = (x[0], x[1]);
    [re * cos[0] - im * sin[0], im * cos[1] + re * sin[1]]
}

/// One sequence's part of [`heads`]' input: `batch x seq` rows of `heads * d` values (at
/// `batch_stride` and `row_stride` apart in `data`), and the RMS norm weight (`d` values) its
/// heads are normalised with, if they are.
pub(crate) struct HeadsPart<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) batch_stride: usize,
    pub(crate) row_stride: usize,
    pub(crate) seq: usize,
    pub(crate) norm: Option<&'a [f32]>,
}

/// Attention's `(batch, heads, seq, d)` operand from its parts' projections, joined along the
/// sequence in order: each head's `d` values RMS-normalised (`x / sqrt(mean(x^2) + eps) * w`,
/// as the composite computes it) where its part has a norm, then rotated in interleaved pairs
/// ([`rotate_pair`]) where `rope` gives tables of `seq x d`. Every value of `out` is written.
pub(crate) fn heads(
    parts: &[HeadsPart],
    (batch, heads, d): (usize, usize, usize),
    eps: f32,
    rope: Option<(&[f32], &[f32])>,
    out: &mut [MaybeUninit<f32>],
) {
    let total: usize = parts.iter().map(|p| p.seq).sum();
    assert_eq!(out.len(), batch * heads * total * d, "heads: output size");
    out.par_chunks_mut(d * ROWS_PER_TASK)
        .enumerate()
        .for_each_init(
            || vec![0f32; d],
            |row, (task, out)| {
                vectorised(
                    #[inline(always)]
                    || {
                        for (i, o) in out.chunks_mut(d).enumerate() {
                            let r = task * ROWS_PER_TASK + i;
                            let (b, h, t) = (r / (heads * total), r / total % heads, r % total);
                            head_row(parts, (b, h, t, d), eps, row);
                            match rope {
                                Some((cos, sin)) => {
                                    let (cos, sin) = (&cos[t * d..][..d], &sin[t * d..][..d]);
                                    let pairs = o.chunks_mut(2).zip(row.chunks(2));
                                    for ((o, x), (c, s)) in
                                        pairs.zip(cos.chunks(2).zip(sin.chunks(2)))
                                    {
                                        let [re, im] = rotate_pair(x, c, s);
                                        o[0] = MaybeUninit::new(re);
                                        o[1] = MaybeUninit::new(im);
                                    }
                                }
                                None => o.iter_mut().zip(&*row).for_each(|(o, &v)| {
                                    *o = MaybeUninit::new(v);
                                }),
                            }
                        }
                    },
                )
            },
        );
}

/// Head `h` of token `t` (of the joined sequence) in batch `b`, normalised where its part says,
/// into `row`.
#[inline(always)]
fn head_row(
    parts: &[HeadsPart],
    (b, h, t, d): (usize, usize, usize, usize),
    eps: f32,
    row: &mut [f32],
) {
    // The part holding token `t`, and `t` within it.
    let (mut t, mut rest) = (t, parts.iter());
    let part = loop {
        let part = rest.next().expect("a token of some part");
        if t < part.seq {
            break part;
        }
        t -= part.seq;
    };
    let x = &part.data[b * part.batch_stride + t * part.row_stride + h * d..][..d];
    match part.norm {
        Some(w) => {
            let rms = (lane_sum(x.iter().map(|v| v * v)) / d as f32 + eps).sqrt();
            row.iter_mut()
                .zip(x)
                .zip(w)
                .for_each(|((o, v), w)| *o = v / rms * w);
        }
        None => row.copy_from_slice(x),
    }
}

/// The shape of a GroupNorm over `(images, channels, pixels)`: `groups` of channels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Groups {
    pub channels: usize,
    pub pixels: usize,
    pub groups: usize,
}

/// `out = silu?(group_norm(x) * weight + bias)` for `x (images, channels, pixels)`: each
/// group's statistics in f64 over its channels' planes, then one pass per channel plane.
pub(crate) fn group_norm(
    x: &[f32],
    shape: Groups,
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    silu: bool,
    out: &mut [f32],
) {
    let Groups {
        channels,
        pixels,
        groups,
    } = shape;
    let group_len = channels / groups * pixels;
    let statistics: Vec<(f32, f32)> = x
        .par_chunks(group_len)
        .map(|group| {
            // Parallel partial sums (a group of a 1024x1024 decode holds 4M values).
            let (sum, squares) = group
                .par_chunks(1 << 16)
                .map(|part| {
                    part.iter().fold((0f64, 0f64), |(s, q), &v| {
                        (s + v as f64, q + v as f64 * v as f64)
                    })
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            let n = group.len() as f64;
            let mean = sum / n;
            let var = (squares / n - mean * mean).max(0.0);
            (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
        })
        .collect();
    out.par_chunks_mut(pixels)
        .zip(x.par_chunks(pixels))
        .enumerate()
        .for_each(|(plane, (out, x))| {
            let channel = plane % channels;
            let (mean, inv_std) = statistics[plane / (channels / groups)];
            let a = inv_std * weight[channel];
            let b = bias[channel] - mean * a;
            vectorised(
                #[inline(always)]
                || {
                    for (o, v) in out.iter_mut().zip(x) {
                        let y = v * a + b;
                        *o = if silu { y / (1.0 + exp(-y)) } else { y };
                    }
                },
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{max_abs_diff, values};

    #[test]
    fn gelu_matches_its_definition() {
        let x = values(70_000, 7, 16.0);
        let mut got = x.clone();
        gelu_tanh_in_place(&mut got);
        let want: Vec<f32> = x
            .iter()
            .map(|&v| {
                let v = v as f64;
                let u = (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v);
                (0.5 * v * (1.0 + u.tanh())) as f32
            })
            .collect();
        assert!(max_abs_diff(&got, &want) < 1e-6);
    }

    #[test]
    fn modulated_layer_norm_and_gate_match_their_definitions() {
        let (batch, rows, width) = (2, 37, 40);
        let x = values(batch * rows * width, 1, 6.0);
        let shift = values(batch * width, 2, 1.0);
        let scale = values(batch * width, 3, 1.0);
        let mut got = vec![0f32; x.len()];
        modulated_layer_norm(&x, width, rows, &shift, &scale, 1e-6, &mut got);
        let mut gated = vec![0f32; x.len()];
        gated_residual(&x, &scale, &got, width, rows, &mut gated);
        for (r, row) in x.chunks(width).enumerate() {
            let b = r / rows;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
            for (j, &v) in row.iter().enumerate() {
                let normed = (v as f64 - mean) / (var + 1e-6).sqrt();
                let want =
                    normed * (1.0 + scale[b * width + j] as f64) + shift[b * width + j] as f64;
                let got = got[r * width + j] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "row {r} column {j}: {got} against {want}"
                );
                let gate_want = v as f64 + scale[b * width + j] as f64 * got;
                assert!((gated[r * width + j] as f64 - gate_want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn group_norm_matches_its_definition() {
        let shape = Groups {
            channels: 6,
            pixels: 50,
            groups: 3,
        };
        let x: Vec<f32> = values(2 * 6 * 50, 4, 8.0).iter().map(|v| v + 3.0).collect();
        let weight = values(6, 5, 2.0);
        let bias = values(6, 6, 2.0);
        for silu in [false, true] {
            let mut got = vec![0f32; x.len()];
            group_norm(&x, shape, &weight, &bias, 1e-6, silu, &mut got);
            for (g, group) in x.chunks(2 * 50).enumerate() {
                let mean = group.iter().map(|&v| v as f64).sum::<f64>() / 100.0;
                let var = group
                    .iter()
                    .map(|&v| (v as f64 - mean).powi(2))
                    .sum::<f64>()
                    / 100.0;
                for (i, &v) in group.iter().enumerate() {
                    let c = (g % 3) * 2 + i / 50;
                    let y =
                        (v as f64 - mean) / (var + 1e-6).sqrt() * weight[c] as f64 + bias[c] as f64;
                    let want = if silu { y / (1.0 + (-y).exp()) } else { y };
                    let got = got[g * 100 + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{silu} {g} {i}: {got} against {want}"
                    );
                }
            }
        }
    }
}
