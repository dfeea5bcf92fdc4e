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
//! For bf16 products ([`Filters::Bf16`]) step 1 writes each `V_xi` straight into the packed
//! bf16 layout the bf16 kernels read, and step 2 runs on them; the transforms stay f32.
//!
//! The transforms' entries are 0, +-1 and +-1/2, so the rounding error stays within a small
//! multiple of the direct convolution's (checked in the tests against candle's).

use crate::bf16::{matmul_packed, PackedA, PackedB};
use crate::gemm::{matmul, Matrix};
use crate::simd::vectorised;
use rayon::prelude::*;

/// Tile positions per output tile row and column: outputs 2x2, inputs 4x4.
const TILE: usize = 4;
const XI: usize = TILE * TILE;

/// `[cout][16][cin]`: `G g G^T` of every filter, `G = [[1, 0, 0], [1/2, 1/2, 1/2],
/// [1/2, -1/2, 1/2], [0, 0, 1]]`.
fn transform_filters(weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
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

/// A layer's filters transformed, in the precision its products run in.
pub(crate) enum Filters {
    /// `U` laid out `[cout][16][cin]` in f32.
    F32(Vec<f32>),
    /// `U_xi (cout x cin)` for each of the 16 `xi`, rounded to bf16 and packed once, for the
    /// CPU's bf16 products: the transformed inputs are rounded as they are packed, and every
    /// sum, like the transforms, stays f32.
    Bf16(Vec<PackedA>),
}

impl Filters {
    /// `weight (cout, cin, 3, 3)` transformed for f32 products.
    pub(crate) fn f32(weight: &[f32], cout: usize, cin: usize) -> Self {
        Filters::F32(transform_filters(weight, cout, cin))
    }

    /// `weight (cout, cin, 3, 3)` transformed (in f32) and packed for bf16 products.
    pub(crate) fn bf16(weight: &[f32], cout: usize, cin: usize) -> Self {
        let u = transform_filters(weight, cout, cin);
        Filters::Bf16(
            (0..XI)
                .map(|xi| PackedA::pack(filter_matrix(&u, xi, cout, cin)))
                .collect(),
        )
    }
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

/// `U_xi (cout x cin)`, a strided view of the transformed filters `u` (`[cout][16][cin]`).
fn filter_matrix(u: &[f32], xi: usize, cout: usize, cin: usize) -> Matrix<'_> {
    Matrix::row_major(&u[xi * cin..], cout, cin, XI * cin)
}

/// One block of tile rows of one image.
#[derive(Clone, Copy, Debug)]
struct Block {
    shape: Planes,
    /// The first tile row.
    row0: usize,
    rows: usize,
    /// Tiles per row.
    cols: usize,
}

impl Block {
    fn tiles(&self) -> usize {
        self.rows * self.cols
    }
}

/// One image's 3x3 convolution with padding 1: `out (cout, h, w)` from `x (cin, h, w)`, the
/// filters transformed by [`Filters`], and `bias (cout)`.
pub(crate) fn conv3x3(
    x: &[f32],
    filters: &Filters,
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
    let mut transformed = match filters {
        Filters::F32(_) => vec![0f32; cin * XI * capacity],
        Filters::Bf16(_) => Vec::new(),
    };
    let mut products = vec![0f32; cout * XI * capacity];
    let mut packed = Vec::new();
    for row0 in (0..tile_rows).step_by(rows_per_block) {
        let block = Block {
            shape,
            row0,
            rows: rows_per_block.min(tile_rows - row0),
            cols: tile_cols,
        };
        let tiles = block.tiles();
        // 2. M_xi = U_xi V_xi, [cout][16][tiles].
        let m = &mut products[..cout * XI * tiles];
        match filters {
            Filters::F32(u) => {
                let v = &mut transformed[..cin * XI * tiles];
                transform_inputs(x, block, v);
                for xi in 0..XI {
                    matmul(
                        filter_matrix(u, xi, cout, cin),
                        Matrix::row_major(&v[xi * tiles..], cin, tiles, XI * tiles),
                        &mut m[xi * tiles..],
                        XI * tiles,
                        false,
                    );
                }
            }
            Filters::Bf16(u) => {
                transform_inputs_packed(x, block, &mut packed);
                for (xi, v) in packed.iter().enumerate() {
                    matmul_packed(&u[xi], v, &mut m[xi * tiles..], XI * tiles, false);
                }
            }
        }
        transform_outputs(m, bias, block, out);
    }
}

/// Step 1: `V = B^T d B` of every tile of the block, `[cin][16][tiles]`.
fn transform_inputs(x: &[f32], block: Block, transformed: &mut [f32]) {
    let Planes { height, width, .. } = block.shape;
    let (tiles, cols) = (block.tiles(), block.cols);
    transformed
        .par_chunks_mut(XI * tiles)
        .zip(x.par_chunks(height * width))
        .for_each(|(v, channel)| {
            let mut v: Vec<&mut [f32]> = v.chunks_mut(tiles).collect();
            let mut scratch = TileRows::new(block);
            for r in 0..block.rows {
                let mut row: Vec<&mut [f32]> = v
                    .iter_mut()
                    .map(|v| &mut v[r * cols..(r + 1) * cols])
                    .collect();
                scratch.transform(channel, block.row0 + r, &mut row);
            }
        });
}

/// Step 1 for bf16 products: `V_xi (cin x tiles)` for each `xi`, rounded to bf16 and packed as
/// the transform runs, a pair of channels per task (a packed tile row interleaves two).
///
/// `packed` holds the previous block's operands: of the same size, they are overwritten in
/// place (every value but the zero padding is written), which spares the kernel clearing fresh
/// pages for each block.
fn transform_inputs_packed(x: &[f32], block: Block, packed: &mut Vec<PackedB>) {
    let Planes {
        cin, height, width, ..
    } = block.shape;
    let (tiles, cols) = (block.tiles(), block.cols);
    if packed
        .first()
        .is_none_or(|p| (p.rows(), p.cols()) != (cin, tiles))
    {
        *packed = (0..XI).map(|_| PackedB::zeros(cin, tiles)).collect();
    }
    let writers: Vec<_> = packed.iter_mut().map(PackedB::row_pairs).collect();
    let plane = height * width;
    (0..cin.div_ceil(2)).into_par_iter().for_each(|pair| {
        let mut scratch = TileRows::new(block);
        // Both channels' 16 rows of `cols` values; the second stays zero past an odd `cin`.
        let mut values = vec![0f32; 2 * XI * cols];
        let (even, odd) = values.split_at_mut(XI * cols);
        for r in 0..block.rows {
            for (ci, v) in [(2 * pair, &mut *even), (2 * pair + 1, &mut *odd)] {
                if ci < cin {
                    let mut row: Vec<&mut [f32]> = v.chunks_mut(cols).collect();
                    scratch.transform(&x[ci * plane..(ci + 1) * plane], block.row0 + r, &mut row);
                }
            }
            for (xi, writer) in writers.iter().enumerate() {
                let part = xi * cols..(xi + 1) * cols;
                // SAFETY: this task alone writes this channel pair's rows.
                unsafe { writer.write(pair, r * cols, &even[part.clone()], &odd[part]) };
            }
        }
    });
}

/// One channel's input rows around a tile row, zero-padded, and their combinations.
struct TileRows {
    shape: Planes,
    cols: usize,
    /// Four input rows, zero-padded by one on the left and enough on the right.
    rows: Vec<f32>,
    combined: Vec<f32>,
}

impl TileRows {
    fn new(block: Block) -> Self {
        let padded = 2 * block.cols + 2;
        Self {
            shape: block.shape,
            cols: block.cols,
            rows: vec![0f32; TILE * padded],
            combined: vec![0f32; TILE * padded],
        }
    }

    /// `V = B^T d B` of `channel`'s tiles in tile row `row`: `v[xi][tx]`.
    fn transform(&mut self, channel: &[f32], row: usize, v: &mut [&mut [f32]]) {
        let Planes { height, width, .. } = self.shape;
        let (cols, padded) = (self.cols, 2 * self.cols + 2);
        let first = (2 * row) as isize - 1;
        for (i, line) in self.rows.chunks_mut(padded).enumerate() {
            let y = first + i as isize;
            line.fill(0.0);
            if (0..height as isize).contains(&y) {
                let y = y as usize;
                line[1..=width].copy_from_slice(&channel[y * width..(y + 1) * width]);
            }
        }
        let (rows, combined) = (&self.rows, &mut self.combined);
        vectorised(
            #[inline(always)]
            || {
                combine_rows(rows, combined, padded);
                // ... then (B^T d) B along the columns of each tile.
                for (i, c) in combined.chunks(padded).enumerate() {
                    if let [v0, v1, v2, v3] = &mut v[i * TILE..(i + 1) * TILE] {
                        let out = v0[..cols]
                            .iter_mut()
                            .zip(&mut v1[..cols])
                            .zip(&mut v2[..cols])
                            .zip(&mut v3[..cols]);
                        for (tx, (((o0, o1), o2), o3)) in out.enumerate() {
                            let (a, b, e, d) =
                                (c[2 * tx], c[2 * tx + 1], c[2 * tx + 2], c[2 * tx + 3]);
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
}

/// `B^T d`, `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`, along the four
/// input rows at every column at once.
#[inline(always)]
fn combine_rows(rows: &[f32], combined: &mut [f32], padded: usize) {
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
}

/// Step 3: `Y = A^T M A + bias`, `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`, into each output plane's
/// rows of this block.
fn transform_outputs(products: &[f32], bias: &[f32], block: Block, out: &mut [f32]) {
    let Planes { height, width, .. } = block.shape;
    let (tiles, cols) = (block.tiles(), block.cols);
    out.par_chunks_mut(height * width)
        .zip(products.par_chunks(XI * tiles))
        .zip(bias.par_iter())
        .for_each(|((y, m), &b)| {
            // The two output rows of a tile row, and A^T M's two rows of each tile column.
            let mut pair = vec![0f32; 2 * 2 * cols];
            let mut sums = vec![0f32; 2 * TILE * cols];
            for r in 0..block.rows {
                let m: [&[f32]; XI] = std::array::from_fn(|k| &m[k * tiles + r * cols..][..cols]);
                vectorised(
                    #[inline(always)]
                    || inverse_tile_row(m, b, &mut sums, &mut pair),
                );
                for (i, row) in pair.chunks(2 * cols).enumerate() {
                    let oy = 2 * (block.row0 + r) + i;
                    if oy < height {
                        y[oy * width..(oy + 1) * width].copy_from_slice(&row[..width]);
                    }
                }
            }
        });
}

/// `A^T M A + b` of one tile row's `M` (`m[xi][tx]`) into its two output rows (`pair`), with
/// `A^T M` in `sums`: plain loops over the row, which vectorise.
#[inline(always)]
fn inverse_tile_row(m: [&[f32]; XI], b: f32, sums: &mut [f32], pair: &mut [f32]) {
    let cols = pair.len() / 4;
    let (top_sums, bottom_sums) = sums.split_at_mut(TILE * cols);
    // A^T M along each tile column j: (m0j + m1j + m2j, m1j - m2j - m3j).
    for j in 0..TILE {
        let (m0, m1, m2, m3) = (
            &m[j][..cols],
            &m[TILE + j][..cols],
            &m[2 * TILE + j][..cols],
            &m[3 * TILE + j][..cols],
        );
        let top = &mut top_sums[j * cols..(j + 1) * cols];
        let bottom = &mut bottom_sums[j * cols..(j + 1) * cols];
        for tx in 0..cols {
            top[tx] = m0[tx] + m1[tx] + m2[tx];
            bottom[tx] = m1[tx] - m2[tx] - m3[tx];
        }
    }
    // ... then (A^T M) A along each row.
    let (top, bottom) = pair.split_at_mut(2 * cols);
    for (s, out) in [(&*top_sums, top), (&*bottom_sums, bottom)] {
        let (s0, s1, s2, s3) = (
            &s[..cols],
            &s[cols..2 * cols],
            &s[2 * cols..3 * cols],
            &s[3 * cols..4 * cols],
        );
        for (tx, o) in out.chunks_exact_mut(2).enumerate() {
            o[0] = s0[tx] + s1[tx] + s2[tx] + b;
            o[1] = s1[tx] - s2[tx] - s3[tx] + b;
        }
    }
}
