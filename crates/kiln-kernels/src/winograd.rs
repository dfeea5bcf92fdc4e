//! 3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3) (Lavin
//! and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015): each 2x2 block of
//! outputs comes from a 4x4 input tile with 16 products per channel pair instead of 36, so the
//! matrix products do 4/9 of the multiply-adds of the direct convolution. The VAE decoder is
//! made of such convolutions (10 of its 10.5 TFLOP at 1024x1024).
//!
//! Per image and block of tile rows:
//! 1. input transform `V = B^T d B` of every 4x4 tile `d` (2 apart, so tiles overlap), laid
//!    out `[cin][16][tiles]`;
//! 2. 16 products `M_xi = U_xi V_xi`, `U = G g G^T` being the filters' transform laid out
//!    `[cout][16][cin]`, so that each `U_xi` and `V_xi` is a strided matrix BLAS reads in place;
//! 3. output transform `Y = A^T M A` plus the bias, written straight into the output planes.
//!
//! The transforms' entries are 0, +-1 and +-1/2, so the rounding error stays within a small
//! multiple of the direct convolution's (checked in the tests against candle's).

use crate::gemm::{matmul, Matrix};
use crate::simd::vectorised;
use rayon::prelude::*;

/// Tile positions per output tile row and column: outputs 2x2, inputs 4x4.
const TILE: usize = 4;
const XI: usize = TILE * TILE;

/// `[cout][16][cin]`: `G g G^T` of every filter, `G = [[1, 0, 0], [1/2, 1/2, 1/2],
/// [1/2, -1/2, 1/2], [0, 0, 1]]`.
pub(crate) fn transform_filters(weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = vec![0f32; cout * XI * cin];
    u.par_chunks_mut(XI * cin)
        .zip(weight.par_chunks(cin * 9))
        .for_each(|(u, filters)| {
            for (ci, g) in filters.chunks(9).enumerate() {
                // G g: rows combined, then (G g) G^T: columns combined the same way.
                let rows = |c: usize| {
                    let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
                    [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d]
                };
                let cols = [rows(0), rows(1), rows(2)];
                for i in 0..TILE {
                    let (a, b, d) = (cols[0][i], cols[1][i], cols[2][i]);
                    let row = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                    for (j, value) in row.into_iter().enumerate() {
                        u[(i * TILE + j) * cin + ci] = value;
                    }
                }
            }
        });
    u
}

/// The shape of one image's convolution.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planes {
    pub cin: usize,
    pub cout: usize,
    pub height: usize,
    pub width: usize,
}

/// Bytes of transformed inputs and products one block holds: enough tiles per product for
/// BLAS to run at full speed, bounded so that memory does not grow with the image.
pub(crate) const BLOCK_BUDGET: usize = 64 << 20;

/// One image's 3x3 convolution with padding 1: `out (cout, h, w)` from `x (cin, h, w)`, the
/// filters transformed by [`transform_filters`], and `bias (cout)`.
pub(crate) fn conv3x3(
    x: &[f32],
    filters: &[f32],
    bias: &[f32],
    shape: Planes,
    block_budget: usize,
    out: &mut [f32],
) {
    let Planes {
        cin,
        cout,
        height,
        width,
    } = shape;
    let (tile_rows, tile_cols) = (height.div_ceil(2), width.div_ceil(2));
    let rows_per_block = (block_budget / (4 * XI * (cin + cout) * tile_cols)).clamp(1, tile_rows);
    let capacity = rows_per_block * tile_cols;
    let mut transformed = vec![0f32; cin * XI * capacity];
    let mut products = vec![0f32; cout * XI * capacity];
    let plane = height * width;
    for row0 in (0..tile_rows).step_by(rows_per_block) {
        let block_rows = rows_per_block.min(tile_rows - row0);
        let tiles = block_rows * tile_cols;
        // 1. V, [cin][16][tiles].
        transformed[..cin * XI * tiles]
            .par_chunks_mut(XI * tiles)
            .zip(x.par_chunks(plane))
            .for_each(|(v, channel)| {
                let mut v: Vec<&mut [f32]> = v.chunks_mut(tiles).collect();
                // Four input rows, zero-padded by one on the left and enough on the right.
                let padded = 2 * tile_cols + 2;
                let mut rows = vec![0f32; TILE * padded];
                let mut combined = vec![0f32; TILE * padded];
                for r in 0..block_rows {
                    let first = (2 * (row0 + r)) as isize - 1;
                    for (i, row) in rows.chunks_mut(padded).enumerate() {
                        let y = first + i as isize;
                        row.fill(0.0);
                        if (0..height as isize).contains(&y) {
                            let y = y as usize;
                            row[1..=width].copy_from_slice(&channel[y * width..(y + 1) * width]);
                        }
                    }
                    let t0 = r * tile_cols;
                    vectorised(
                        #[inline(always)]
                        || {
                            // B^T d, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
                            // [0, 1, 0, -1]], along the rows at every column at once ...
                            let (r0, rest) = rows.split_at(padded);
                            let (r1, rest) = rest.split_at(padded);
                            let (r2, r3) = rest.split_at(padded);
                            let mut c = combined.chunks_mut(padded);
                            let (c0, c1, c2, c3) = (
                                c.next().unwrap(),
                                c.next().unwrap(),
                                c.next().unwrap(),
                                c.next().unwrap(),
                            );
                            for k in 0..padded {
                                c0[k] = r0[k] - r2[k];
                                c1[k] = r1[k] + r2[k];
                                c2[k] = r2[k] - r1[k];
                                c3[k] = r1[k] - r3[k];
                            }
                            // ... then (B^T d) B along the columns of each tile.
                            for (i, c) in combined.chunks(padded).enumerate() {
                                if let [v0, v1, v2, v3] = &mut v[i * TILE..(i + 1) * TILE] {
                                    let out = v0[t0..t0 + tile_cols]
                                        .iter_mut()
                                        .zip(&mut v1[t0..t0 + tile_cols])
                                        .zip(&mut v2[t0..t0 + tile_cols])
                                        .zip(&mut v3[t0..t0 + tile_cols]);
                                    for (tx, (((o0, o1), o2), o3)) in out.enumerate() {
                                        let (a, b, e, d) = (
                                            c[2 * tx],
                                            c[2 * tx + 1],
                                            c[2 * tx + 2],
                                            c[2 * tx + 3],
                                        );
                                        *o0 = a - e;
                                        *o1 = b + e;
                                        *o2 = e - b;
                                        *o3 = b - d;
                                    }
                                }
                            }
                        },
                    );
                }
            });
        // 2. M_xi = U_xi V_xi, [cout][16][tiles].
        for xi in 0..XI {
            matmul(
                Matrix::row_major(&filters[xi * cin..], cout, cin, XI * cin),
                Matrix::row_major(&transformed[xi * tiles..], cin, tiles, XI * tiles),
                &mut products[xi * tiles..],
                XI * tiles,
                false,
            );
        }
        // 3. Y = A^T M A + bias, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], into each output
        // plane's rows of this block.
        let products = &products[..cout * XI * tiles];
        out.par_chunks_mut(plane)
            .zip(products.par_chunks(XI * tiles))
            .zip(bias.par_iter())
            .for_each(|((y, m), &b)| {
                let m: Vec<&[f32]> = m.chunks(tiles).collect();
                let mut pair = vec![0f32; 2 * 2 * tile_cols];
                for r in 0..block_rows {
                    let t0 = r * tile_cols;
                    let at = |i: usize, j: usize| &m[i * TILE + j][t0..t0 + tile_cols];
                    vectorised(
                        #[inline(always)]
                        || {
                            let (top, bottom) = pair.split_at_mut(2 * tile_cols);
                            for tx in 0..tile_cols {
                                // A^T M along the rows, then (A^T M) A along the columns.
                                let s = |j: usize| {
                                    let (m0, m1, m2, m3) =
                                        (at(0, j)[tx], at(1, j)[tx], at(2, j)[tx], at(3, j)[tx]);
                                    (m0 + m1 + m2, m1 - m2 - m3)
                                };
                                let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
                                top[2 * tx] = s0.0 + s1.0 + s2.0 + b;
                                top[2 * tx + 1] = s1.0 - s2.0 - s3.0 + b;
                                bottom[2 * tx] = s0.1 + s1.1 + s2.1 + b;
                                bottom[2 * tx + 1] = s1.1 - s2.1 - s3.1 + b;
                            }
                        },
                    );
                    for (i, row) in pair.chunks(2 * tile_cols).enumerate() {
                        let oy = 2 * (row0 + r) + i;
                        if oy < height {
                            y[oy * width..(oy + 1) * width].copy_from_slice(&row[..width]);
                        }
                    }
                }
            });
    }
}
