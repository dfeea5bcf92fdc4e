//! bf16 matrix products with f32 accumulation, on the CPU's bf16 instructions: AMX tiles
//! (Sapphire Rapids and later: `tdpbf16ps`, a 16x16x32 product per instruction) or
//! AVX512-BF16 (Zen 4, Cooper Lake: `vdpbf16ps`), chosen at run time. Inputs and outputs are
//! f32: the left matrix is rounded to bf16 (to nearest even) as it is packed, the right one is
//! packed once ([`PackedB`]: a linear layer's weight at load), and every sum is kept in f32.
//!
//! # Layout of the packed operands
//! Both kernels read the same layouts, which are AMX's:
//! - the left matrix `A (m x k)`: for each block of 16 rows, for each block of 32 columns, one
//!   1 KiB tile of 16 rows of 32 (`m` rounded up to a multiple of 32, `k` to one of 32, with
//!   zeros): a row block's tiles follow each other along `k`, so the kernels read memory in
//!   order;
//! - the right matrix `B (k x n)`: for each block of 16 columns, for each block of 32 rows, one
//!   1 KiB tile of 16 rows, each row holding the 16 columns' pairs of consecutive `k`
//!   (`tile[r][2c + p] = B[32 kb + 2r + p][16 nb + c]`: the "VNNI" order). A tile row is also
//!   one AVX-512 register of 16 pairs, which is what `vdpbf16ps` multiplies.
//!
//! # Blocking
//! Both packed operands start on 64-byte boundaries ([`Tiles`]), so a tile row is one cache line.
//! The output is cut into tasks of [`MC`] ([`AMX_MC`] on AMX) rows by [`NC`] columns run in
//! parallel; a task walks `k` in chunks of [`KC`], and each chunk in 32x32 blocks whose four
//! 16x16 accumulators live in tiles (AMX) or registers.
//! Blocks over the output's edge go through a 32x32 scratch.

use crate::gemm::{Matrix, Output};
use crate::pointwise::gelu_tanh;
use crate::simd::vectorised;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Rows of output per parallel task (a multiple of 32).
const MC: usize = 256;
/// The same on AMX, whose tile loads run several times faster from L2 than from L3: a task's
/// rows of A over a chunk of `k` (128 x 4096 bf16, 1 MiB) then stay in a Sapphire Rapids core's
/// 2 MiB L2 beside the column panel of B in use (at 256 rows they filled it). Measured with
/// aligned tiles, alternating builds on one noisy machine: the best runs favoured 128 rows
/// (4096^3 products 1334 against 1041 GFLOP/s; a transformer call 1.17 against 1.46 s), the
/// medians did not differ beyond the noise (BENCHMARKS.md).
const AMX_MC: usize = 128;
/// Columns of output per parallel task (a multiple of 32).
const NC: usize = 256;
/// Blocks of 32 along `k` per chunk (4096 of `k`). Measured on a Sapphire Rapids core pair
/// (2 MiB of L2 each) over FLUX's shapes: the accumulators' loads and stores at each chunk cost
/// more than the chunks' operands falling out of L2 (16 blocks: 760-1130 GFLOP/s; 128 blocks:
/// 930-1450 GFLOP/s).
const KC: usize = 128;
/// bf16 elements of one packed tile (16 rows of 32).
const TILE: usize = 512;

/// Which instructions multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`amx_bf16`, `amx_tile`, and the kernel's permission to use their state).
    Amx,
    /// AVX-512 with the BF16 extension.
    Avx512Bf16,
}

impl Bf16Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "AMX-BF16 tiles",
            Bf16Kernel::Avx512Bf16 => "AVX512-BF16",
        }
    }
}

/// The environment variable that narrows the choice: `avx512-bf16` (skip AMX) or `none` (no
/// bf16 products, as on a CPU without the instructions). For measurements and for operators
/// who want to rule a kernel out; unset, the best one runs.
pub const KERNEL_VARIABLE: &str = "KILN_BF16_KERNEL";

/// The best bf16 kernel this CPU (and kernel) offers, within what [`KERNEL_VARIABLE`] allows,
/// or `None`: then bf16 products are not available on this machine. Decided once per process.
pub fn kernel() -> Option<Bf16Kernel> {
    static KERNEL: OnceLock<Option<Bf16Kernel>> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        let best = detect();
        match std::env::var(KERNEL_VARIABLE).as_deref() {
            Ok("none") => None,
            Ok("avx512-bf16") => has_avx512_bf16().then_some(Bf16Kernel::Avx512Bf16),
            _ => best,
        }
    })
}

/// Every kernel this CPU can run (the best first): tests compare them all.
pub fn available() -> Vec<Bf16Kernel> {
    let mut out = Vec::new();
    if detect() == Some(Bf16Kernel::Amx) {
        out.push(Bf16Kernel::Amx);
    }
    if has_avx512_bf16() {
        out.push(Bf16Kernel::Avx512Bf16);
    }
    out
}

/// The best kernel the CPU has (AMX's permission is asked once; asking again is harmless).
fn detect() -> Option<Bf16Kernel> {
    static AMX: OnceLock<bool> = OnceLock::new();
    if *AMX.get_or_init(amx::usable) {
        Some(Bf16Kernel::Amx)
    } else if has_avx512_bf16() {
        Some(Bf16Kernel::Avx512Bf16)
    } else {
        None
    }
}

/// Whether [`kernel`]'s bf16 products beat this CPU's f32 ones, so that bf16 should be its
/// default precision. AMX: always (about 4x). AVX512-BF16: on AMD (Zen 4 and later run
/// `vdpbf16ps` at the rate of an f32 FMA, with twice its multiply-adds: 391-432 against f32's 207
/// GFLOP/s on the Zen 4 development machine), not on Intel (the Sapphire Rapids core, with AMX
/// ruled out, ran it at half that rate: 162 against 256 GFLOP/s). BENCHMARKS.md has both.
pub fn beats_f32() -> bool {
    match kernel() {
        Some(Bf16Kernel::Amx) => true,
        Some(Bf16Kernel::Avx512Bf16) => is_amd(),
        None => false,
    }
}

fn is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 0: the vendor's name, which every x86-64 CPU answers.
        let id = std::arch::x86_64::__cpuid(0);
        let vendor = [id.ebx, id.edx, id.ecx].map(u32::to_le_bytes).concat();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x` rounded to the nearest bf16, ties to even (NaN stays a quiet NaN).
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// Packed bf16 values on 64-byte boundaries, so that each 64-byte row of a tile is one cache
/// line. A tile load whose rows straddle two lines ran at a third of the speed on the Sapphire
/// Rapids development machine (about 20 ns a tile against 5-12 aligned; BENCHMARKS.md), and a
/// `Vec<u16>` is only as aligned as malloc makes it (16 bytes).
struct Tiles {
    ptr: std::ptr::NonNull<u16>,
    len: usize,
}

// SAFETY: `Tiles` owns its allocation, as a `Vec<u16>` would.
unsafe impl Send for Tiles {}
unsafe impl Sync for Tiles {}

impl Tiles {
    const ALIGN: usize = 64;

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1) * 2, Self::ALIGN).expect("tiles' size")
    }

    /// `len` zeros. At this alignment the allocator has no `calloc`: this is an allocation and
    /// a pass writing zeros, as `calloc` of a block malloc reuses was (the packers leave the
    /// padding as it is, so it must start at zero).
    fn zeros(len: usize) -> Self {
        // SAFETY: `alloc_zeroed` initialises every value.
        unsafe { Self::allocate(len, std::alloc::alloc_zeroed) }
    }

    /// `len` values that `init` writes, every one of them: no pass of zeros first (on the
    /// Sapphire Rapids development machine, zeroing each linear layer's packed activations
    /// took 3% of a transformer call, on one thread while the other waited).
    ///
    /// # Safety
    /// `init` initialises all `len` values.
    unsafe fn written_by(len: usize, init: impl FnOnce(&mut [MaybeUninit<u16>])) -> Self {
        // SAFETY: `init` initialises the values (the caller's promise) before any `Deref`.
        let tiles = unsafe { Self::allocate(len, std::alloc::alloc) };
        // SAFETY: `len` values of the allocation, which `MaybeUninit` may hold uninitialised.
        init(unsafe { std::slice::from_raw_parts_mut(tiles.ptr.as_ptr().cast(), len) });
        tiles
    }

    /// # Safety
    /// The values are initialised before `Deref` reads them: by `alloc` or by the caller.
    unsafe fn allocate(len: usize, alloc: unsafe fn(std::alloc::Layout) -> *mut u8) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout's size is not zero.
        let raw = unsafe { alloc(layout) };
        let ptr = std::ptr::NonNull::new(raw.cast::<u16>())
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: allocated in `allocate` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), Self::layout(self.len)) }
    }
}

impl Clone for Tiles {
    fn clone(&self) -> Self {
        let mut copy = Self::zeros(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl std::ops::Deref for Tiles {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        // SAFETY: `len` initialised values, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Tiles {
    fn deref_mut(&mut self) -> &mut [u16] {
        // SAFETY: as in `deref`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// The right operand `B (k x n)` packed in bf16 tiles (module docs: Layout).
#[derive(Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// Blocks of 32 along `k`.
    kb: usize,
    data: Tiles,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB({} x {}, bf16)", self.k, self.n)
    }
}

impl PackedB {
    /// Packs `b`, rounding each element to bf16.
    pub fn pack(b: Matrix) -> Self {
        assert!(b.fits(), "PackedB::pack: the view runs past its data");
        let (k, n) = (b.rows, b.cols);
        let mut packed = Self::zeros(k, n);
        let kb = packed.kb;
        if kb == 0 {
            return packed;
        }
        packed
            .data
            .par_chunks_mut(kb * TILE)
            .enumerate()
            .for_each(|(j, column_block)| {
                let (col, cols) = (j * 16, 16.min(n - j * 16));
                if b.col_stride == 1 {
                    pack_row_pairs(&b, col, cols, column_block);
                    return;
                }
                // Each column is walked down `k` once (a weight's row, contiguous for a
                // linear layer's transpose) and spread over the tiles.
                for c in 0..cols {
                    let start = (col + c) * b.col_stride;
                    for row in 0..k {
                        let (q, r, p) = (row / 32, (row % 32) / 2, row % 2);
                        column_block[q * TILE + r * 32 + 2 * c + p] =
                            to_bf16(b.data[start + row * b.row_stride]);
                    }
                }
            });
        packed
    }

    /// A `k x n` operand of zeros, to be written by [`PackedB::row_pairs`].
    pub(crate) fn zeros(k: usize, n: usize) -> Self {
        let kb = k.div_ceil(32);
        Self {
            k,
            n,
            kb,
            data: Tiles::zeros(n.div_ceil(16) * kb * TILE),
        }
    }

    /// A writer of this operand's rows, two at a time, from several threads.
    pub(crate) fn row_pairs(&mut self) -> RowPairWriter<'_> {
        RowPairWriter {
            data: self.data.as_mut_ptr(),
            k: self.k,
            n: self.n,
            kb: self.kb,
            fast: has_interleave(),
            _packed: std::marker::PhantomData,
        }
    }

    pub fn rows(&self) -> usize {
        self.k
    }

    pub fn cols(&self) -> usize {
        self.n
    }

    /// The tiles of column block `j` from row block `q` on.
    fn tiles(&self, j: usize, q: usize) -> *const u16 {
        self.data[(j * self.kb + q) * TILE..].as_ptr()
    }
}

/// Columns `col..col + cols` (at most 16) of a row-major `b` into their column block's tiles,
/// two rows at a time: a tile row interleaves two consecutive rows' values, so both are read in
/// order (walking each column down `k` would touch a cache line per value).
fn pack_row_pairs(b: &Matrix, col: usize, cols: usize, tiles: &mut [u16]) {
    let row = |i: usize| &b.data[i * b.row_stride + col..][..cols];
    // The last, unpaired row of an odd `k` is paired with zeros.
    let zeros = [0f32; 16];
    for pair in 0..b.rows.div_ceil(2) {
        let out = &mut tiles[(pair / 16) * TILE + (pair % 16) * 32..][..2 * cols];
        let odd = if 2 * pair + 1 < b.rows {
            row(2 * pair + 1)
        } else {
            &zeros[..cols]
        };
        interleave(row(2 * pair), odd, out);
    }
}

/// `out[2c] = bf16(even[c])`, `out[2c + 1] = bf16(odd[c])` for two rows' `n <= 16` values:
/// (part of) one tile row of a packed right operand.
fn interleave(even: &[f32], odd: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if has_interleave() {
        // SAFETY: the CPU has the instructions; `avx512::interleave` checks the lengths.
        return unsafe { avx512::interleave(even, odd, out) };
    }
    for ((o, &e), &d) in out.chunks_exact_mut(2).zip(even).zip(odd) {
        o[0] = to_bf16(e);
        o[1] = to_bf16(d);
    }
}

/// Whether [`avx512::interleave`] runs here.
fn has_interleave() -> bool {
    #[cfg(target_arch = "x86_64")]
    return has_avx512_bf16() && std::arch::is_x86_feature_detected!("avx512bw");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Writes a [`PackedB`]'s rows from several threads at once, two rows at a time: Winograd's
/// input transform writes its bf16 operands through it directly, a channel pair per thread,
/// with no f32 copy in between.
pub(crate) struct RowPairWriter<'a> {
    data: *mut u16,
    k: usize,
    n: usize,
    kb: usize,
    /// Whether AVX512-BF16's conversion (and AVX512-BW's shuffle) interleave the rows.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fast: bool,
    _packed: std::marker::PhantomData<&'a mut PackedB>,
}

// SAFETY: the writer's users write disjoint rows (`RowPairWriter::write`).
unsafe impl Send for RowPairWriter<'_> {}
unsafe impl Sync for RowPairWriter<'_> {}

impl RowPairWriter<'_> {
    /// Columns `col..col + even.len()` of rows `2 pair` (`even`) and `2 pair + 1` (`odd`,
    /// as long; zeros where `k` is odd and this is its last pair).
    ///
    /// # Safety
    /// No other thread writes rows `2 pair` and `2 pair + 1` at these columns meanwhile.
    pub(crate) unsafe fn write(&self, pair: usize, col: usize, even: &[f32], odd: &[f32]) {
        assert!(2 * pair < self.k && col + even.len() <= self.n && odd.len() == even.len());
        #[cfg(target_arch = "x86_64")]
        if self.fast {
            // SAFETY: the CPU has the instructions; the caller's promise is passed on.
            return unsafe { avx512::write_row_pairs(self, pair, col, even, odd) };
        }
        // SAFETY: as above.
        unsafe { self.write_pieces(pair, col, even, odd, interleave) }
    }

    /// [`RowPairWriter::write`] a column block's piece at a time, by `interleave`.
    #[inline(always)]
    unsafe fn write_pieces(
        &self,
        pair: usize,
        col: usize,
        even: &[f32],
        odd: &[f32],
        interleave: impl Fn(&[f32], &[f32], &mut [u16]),
    ) {
        let end = col + even.len();
        let (q, r) = (pair / 16, pair % 16);
        let mut c = col;
        while c < end {
            // Up to the end of column block `c / 16`.
            let stop = ((c / 16 + 1) * 16).min(end);
            let start = ((c / 16) * self.kb + q) * TILE + r * 32 + 2 * (c % 16);
            // SAFETY: within the packed data (the caller checked); this pair's alone.
            let out =
                unsafe { std::slice::from_raw_parts_mut(self.data.add(start), 2 * (stop - c)) };
            interleave(&even[c - col..stop - col], &odd[c - col..stop - col], out);
            c = stop;
        }
    }
}

/// The left operand rounded to bf16 (module docs: Layout).
pub struct PackedA {
    rows: usize,
    cols: usize,
    /// Blocks of 32 along `k`.
    kb: usize,
    data: Tiles,
}

impl PackedA {
    /// Packs `a`, rounding each element to bf16.
    pub fn pack(a: Matrix) -> Self {
        assert!(a.fits(), "bf16 matmul: the left view runs past its data");
        let blocks = (0..a.rows.div_ceil(16)).into_par_iter();
        Self::build((a.rows, a.cols), blocks, |block, tiles, row| {
            for r in 0..16.min(a.rows - block * 16) {
                let start = (block * 16 + r) * a.row_stride;
                if a.col_stride == 1 {
                    convert_row(&a.data[start..start + a.cols], &mut row[..a.cols]);
                } else {
                    for (j, out) in row[..a.cols].iter_mut().enumerate() {
                        *out = to_bf16(a.data[start + j * a.col_stride]);
                    }
                }
                scatter_row(row, tiles, r);
            }
        })
    }

    /// Packs the `rows x cols` row-major `data` (rows `cols` apart), each row first passed to
    /// `prepare`, which may rewrite it: attention's softmax runs here, on rows still in cache,
    /// rather than in a pass of its own.
    pub fn pack_rows_with(
        data: &mut [f32],
        (rows, cols): (usize, usize),
        prepare: impl Fn(&mut [f32]) + Sync,
    ) -> Self {
        assert!(data.len() >= rows * cols, "pack_rows_with: too few values");
        let blocks = data[..rows * cols].par_chunks_mut(16 * cols.max(1));
        Self::build((rows, cols), blocks, |block, tiles, row| {
            for (r, values) in block.chunks_mut(cols).enumerate() {
                prepare(values);
                convert_row(values, &mut row[..cols]);
                scatter_row(row, tiles, r);
            }
        })
    }

    /// A `rows x cols` operand whose 16-row blocks `fill(source, tiles, row)` writes in
    /// parallel, one `source` a block, with `row` a scratch row of the tiles' width; `fill`
    /// writes each of its block's rows whole ([`scatter_row`]). The rows of padding (to a
    /// multiple of 32) are zeroed here, and nothing else is: every value is written once.
    fn build<S: Send>(
        (rows, cols): (usize, usize),
        sources: impl IndexedParallelIterator<Item = S>,
        fill: impl Fn(S, &mut [MaybeUninit<u16>], &mut [u16]) + Sync,
    ) -> Self {
        let kb = cols.div_ceil(32);
        let blocks = rows.div_ceil(32) * 2;
        let init = |data: &mut [MaybeUninit<u16>]| {
            if kb == 0 {
                return;
            }
            let mut tiles: Vec<_> = data.chunks_mut(kb * TILE).collect();
            for r in rows..blocks * 16 {
                for q in 0..kb {
                    tiles[r / 16][q * TILE + (r % 16) * 32..][..32].fill(MaybeUninit::new(0));
                }
            }
            tiles.truncate(rows.div_ceil(16));
            tiles.into_par_iter().zip(sources).for_each_init(
                || vec![0u16; kb * 32],
                |row, (tiles, source)| fill(source, tiles, row),
            );
        };
        // SAFETY: `init` writes the padding rows and `fill` every row of every block before.
        let data = unsafe { Tiles::written_by(blocks * 16 * kb * 32, init) };
        Self {
            rows,
            cols,
            kb,
            data,
        }
    }

    /// The tiles of row block `i` from column block `q` on.
    fn tiles(&self, i: usize, q: usize) -> *const u16 {
        self.data[(i * self.kb + q) * TILE..].as_ptr()
    }
}

/// Row `r` of a 16-row block, in bf16 and padded to the tiles' width, into its tiles.
fn scatter_row(row: &[u16], tiles: &mut [MaybeUninit<u16>], r: usize) {
    for (q, part) in row.chunks(32).enumerate() {
        let out = &mut tiles[q * TILE + r * 32..][..32];
        out.iter_mut()
            .zip(part)
            .for_each(|(o, &v)| *o = MaybeUninit::new(v));
    }
}

/// `out[i] = bf16(x[i])`, 16 at a time with AVX512-BF16 where the CPU has it.
fn convert_row(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU has the instructions.
        return unsafe { avx512::convert(x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = to_bf16(v);
    }
}

/// What is done to each 32x32 block of `C` once its sums are complete, while the block is
/// still in L1: a bias added along the columns, then an activation. The same as a pass over
/// `C` after the product, without reading and writing `C` again from memory (a FLUX MLP's
/// 1536 x 12288 hidden activations are 75 MB), and without filling `C` with the bias rows
/// first for the product to add to.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// One value per column of `C`.
    pub bias: Option<&'a [f32]>,
    pub activation: Activation,
}

/// The function an [`Epilogue`] applies to each value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    #[default]
    Identity,
    /// PyTorch's tanh-approximated GELU.
    GeluTanh,
}

impl Epilogue<'_> {
    fn is_identity(&self) -> bool {
        self.bias.is_none() && self.activation == Activation::Identity
    }

    /// Applies itself to `rows` rows of `cols` values at `c` (rows `ldc` apart), which are
    /// columns `col..col + cols` of `C`.
    ///
    /// # Safety
    /// Those values are within `C` and nobody else's meanwhile.
    unsafe fn apply(&self, c: *mut f32, ldc: usize, (rows, cols): (usize, usize), col: usize) {
        if self.is_identity() {
            return;
        }
        let bias = self.bias.map(|b| &b[col..col + cols]);
        vectorised(
            #[inline(always)]
            || {
                for i in 0..rows {
                    // SAFETY: the caller's promise.
                    let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) };
                    if let Some(bias) = bias {
                        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                    }
                    if self.activation == Activation::GeluTanh {
                        row.iter_mut().for_each(|x| *x = gelu_tanh(*x));
                    }
                }
            },
        )
    }
}

/// `C = A B` (or `C += A B` when `accumulate`) with `C` row-major, rows `ldc` apart, on
/// [`kernel`]. Panics where this CPU has no bf16 kernel: callers check [`kernel`] first.
pub fn matmul(a: Matrix, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    matmul_packed(&PackedA::pack(a), b, c, ldc, accumulate)
}

/// `epilogue(A B)` ([`Epilogue`]) as a new row-major `m x n` matrix, on [`kernel`]. The
/// product writes every value of it once, so it is not zeroed first (a pass over the output on
/// one thread: 3% of a transformer call on the Sapphire Rapids development machine).
pub fn matmul_fresh(a: Matrix, b: &PackedB, epilogue: Epilogue) -> Vec<f32> {
    matmul_fresh_joined(std::slice::from_ref(&a), b, epilogue)
}

/// [`matmul_fresh`] of the matrices `parts` side by side (`[A1 A2 ...] B`, each part's rows
/// against its own rows of `B`) without joining them: each part's product adds to the
/// previous ones', and the last one's finishes with `epilogue`. A FLUX single block's output
/// projection reads its attention and MLP branches so, where joining them copied 94 MB (at
/// 512x512) on one thread. Each part but the last has a multiple of 32 columns.
pub fn matmul_fresh_joined(parts: &[Matrix], b: &PackedB, epilogue: Epilogue) -> Vec<f32> {
    let kernel = kernel().expect("bf16 matmul on a CPU without bf16 instructions");
    let (m, n) = (parts.first().map_or(0, |a| a.rows), b.n);
    assert!(
        parts.iter().all(|a| a.rows == m),
        "joined parts of different rows"
    );
    let k: usize = parts.iter().map(|a| a.cols).sum();
    assert_eq!(k, b.k, "bf16 matmul: inner sizes differ");
    let mut c = Vec::with_capacity(m * n);
    let out = (c.as_mut_ptr(), m * n, n);
    let mut start = 0;
    for (i, a) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        assert!(
            last || a.cols % 32 == 0,
            "a joined part of {} columns",
            a.cols
        );
        let blocks = start..start + a.cols.div_ceil(32);
        let finish = if last { epilogue } else { Epilogue::default() };
        // SAFETY: as in `matmul_fresh`: the first part's product writes every value, and the
        // later ones read them.
        unsafe {
            multiply_raw(
                kernel,
                &PackedA::pack(*a),
                (b, blocks.clone()),
                (out, i > 0),
                finish,
            )
        };
        start = blocks.end;
    }
    // SAFETY: written above (where there are no parts, `m` is 0).
    unsafe { c.set_len(m * n) };
    c
}

/// [`matmul`] or [`matmul_fresh`] on a chosen kernel, which the CPU must have ([`available`]):
/// `C = epilogue(A B)`, or `epilogue(C + A B)` when `accumulate`.
pub fn matmul_with(
    kernel: Bf16Kernel,
    a: Matrix,
    b: &PackedB,
    (c, ldc, accumulate): (&mut [f32], usize, bool),
    epilogue: Epilogue,
) {
    assert!(available().contains(&kernel), "{kernel:?} is not available");
    multiply_packed(kernel, &PackedA::pack(a), b, (c, ldc, accumulate), epilogue);
}

/// `C = A B` (or `C += A B`) for an already packed `A`, on [`kernel`].
pub fn matmul_packed(a: &PackedA, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    let kernel = kernel().expect("bf16 matmul on a CPU without bf16 instructions");
    multiply_packed(kernel, a, b, (c, ldc, accumulate), Epilogue::default())
}

/// `C = epilogue(A B)`, or `epilogue(C + A B)` when `accumulate`.
fn multiply_packed(
    kernel: Bf16Kernel,
    a: &PackedA,
    b: &PackedB,
    (c, ldc, accumulate): (&mut [f32], usize, bool),
    epilogue: Epilogue,
) {
    let c = (c.as_mut_ptr(), c.len(), ldc);
    // SAFETY: `c` is borrowed whole, and initialised.
    unsafe { multiply_raw(kernel, a, (b, 0..b.kb), (c, accumulate), epilogue) }
}

/// [`multiply_packed`] into `C` given as its first value, its length and its row stride, with
/// `A` against the rows of `B` in blocks `kblocks` (of 32).
///
/// # Safety
/// `C` is writable and nobody else's meanwhile; where `accumulate`, initialised.
unsafe fn multiply_raw(
    kernel: Bf16Kernel,
    a: &PackedA,
    (b, kblocks): (&PackedB, std::ops::Range<usize>),
    ((c, len, ldc), accumulate): ((*mut f32, usize, usize), bool),
    epilogue: Epilogue,
) {
    let rows_of_b = (b.k.min(32 * kblocks.end)).saturating_sub(32 * kblocks.start);
    assert_eq!(a.cols, rows_of_b, "bf16 matmul: inner sizes differ");
    let (m, n) = (a.rows, b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && len > (m - 1) * ldc + n - 1, "C too small");
    let bias_fits = epilogue.bias.is_none_or(|b| b.len() == n);
    assert!(bias_fits, "bias of {n} values");
    if a.cols == 0 {
        for i in 0..m {
            // SAFETY: row `i`'s first `n` values are within `C` (checked above).
            unsafe {
                let row = c.add(i * ldc);
                if !accumulate {
                    std::ptr::write_bytes(row, 0, n);
                }
                epilogue.apply(row, ldc, (1, n), 0);
            }
        }
        return;
    }
    let out = Output(c);
    // Smaller tasks where the product is small, so every thread has some (a product of 200
    // rows by 128 columns would otherwise be one task).
    let mut mc = match kernel {
        Bf16Kernel::Amx => AMX_MC,
        Bf16Kernel::Avx512Bf16 => MC,
    };
    while m.div_ceil(mc) * n.div_ceil(NC) < 4 * rayon::current_num_threads() && mc > 32 {
        mc /= 2;
    }
    let tasks: Vec<(usize, usize)> = (0..m.div_ceil(mc))
        .flat_map(|i| (0..n.div_ceil(NC)).map(move |j| (i * mc, j * NC)))
        .collect();
    tasks.into_par_iter().for_each(|(row, col)| {
        let task = Task {
            a,
            b,
            out,
            ldc,
            m,
            n,
            accumulate,
            epilogue,
            kblocks: kblocks.clone(),
            rows: row..(row + mc).min(m),
            cols: col..(col + NC).min(n),
        };
        // SAFETY: the kernel is available; the task's block is within C and its own.
        unsafe { task.run(kernel) }
    });
}

/// One task: a block of C's rows and columns over all of `k`.
struct Task<'a> {
    a: &'a PackedA,
    b: &'a PackedB,
    out: Output,
    ldc: usize,
    m: usize,
    n: usize,
    accumulate: bool,
    epilogue: Epilogue<'a>,
    /// The blocks of `B`'s rows that `A`'s columns meet.
    kblocks: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

/// Where a 32x32 block's accumulators come from and go.
struct Block {
    /// The two row blocks' tiles from the chunk's first column block.
    a: [*const u16; 2],
    /// The two column blocks' tiles from the chunk's first row block.
    b: [*const u16; 2],
    /// Blocks of 32 along `k` in this chunk.
    kblocks: usize,
    /// The output (32 rows, `ldc` floats apart) and whether to add to what it holds.
    c: *mut f32,
    ldc: usize,
    load: bool,
}

impl Task<'_> {
    /// # Safety
    /// `kernel` must be available, and the task's block of C within the output.
    unsafe fn run(&self, kernel: Bf16Kernel) {
        if kernel == Bf16Kernel::Amx {
            amx::configure();
        }
        let mut scratch = [0f32; 32 * 32];
        let first = self.kblocks.start;
        for q in self.kblocks.clone().step_by(KC) {
            let kblocks = KC.min(self.kblocks.end - q);
            let load = self.accumulate || q > first;
            for col in self.cols.clone().step_by(32) {
                for row in self.rows.clone().step_by(32) {
                    let inside = row + 32 <= self.m && col + 32 <= self.n;
                    let c = self.out.at(row * self.ldc + col);
                    // At the right edge the second column block may not exist: any tiles
                    // will do there, the columns they make are not copied out.
                    let second = (col / 16 + 1).min(self.n.div_ceil(16) - 1);
                    let block = Block {
                        a: [
                            self.a.tiles(row / 16, q - first),
                            self.a.tiles(row / 16 + 1, q - first),
                        ],
                        b: [self.b.tiles(col / 16, q), self.b.tiles(second, q)],
                        kblocks,
                        c,
                        ldc: self.ldc,
                        load,
                    };
                    if inside {
                        multiply(kernel, &block);
                    } else {
                        self.edge_block(kernel, block, (row, col), &mut scratch);
                    }
                    if q + kblocks == self.kblocks.end {
                        let size = ((self.m - row).min(32), (self.n - col).min(32));
                        self.epilogue.apply(c, self.ldc, size, col);
                    }
                }
            }
        }
        if kernel == Bf16Kernel::Amx {
            amx::release();
        }
    }

    /// A block over C's edge, through `scratch`.
    unsafe fn edge_block(
        &self,
        kernel: Bf16Kernel,
        block: Block,
        (row, col): (usize, usize),
        scratch: &mut [f32; 32 * 32],
    ) {
        let (rows, cols) = ((self.m - row).min(32), (self.n - col).min(32));
        scratch.fill(0.0);
        for i in 0..rows {
            let src = block.c.add(i * self.ldc);
            if block.load {
                std::ptr::copy_nonoverlapping(src, scratch[i * 32..].as_mut_ptr(), cols);
            }
        }
        let through = Block {
            c: scratch.as_mut_ptr(),
            ldc: 32,
            load: true,
            ..block
        };
        multiply(kernel, &through);
        for i in 0..rows {
            std::ptr::copy_nonoverlapping(
                scratch[i * 32..].as_ptr(),
                block.c.add(i * self.ldc),
                cols,
            );
        }
    }
}

unsafe fn multiply(kernel: Bf16Kernel, block: &Block) {
    match kernel {
        Bf16Kernel::Amx => amx::block(block),
        Bf16Kernel::Avx512Bf16 => avx512::block(block),
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    //! AMX through inline assembly (Rust's AMX intrinsics are not stable): tiles 0-3 hold the
    //! four 16x16 f32 accumulators, 4-5 the two A tiles, 6-7 the two B tiles.
    use super::Block;
    use std::arch::asm;

    /// Whether the CPU has AMX-BF16 and the OS lets this process use the tile state (Linux
    /// asks each process to request it: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`,
    /// which also fails where the kernel is older than 5.16).
    pub(super) fn usable() -> bool {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
        if !(amx_bf16 && amx_tile) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a system call with integer arguments; it changes only this process's
        // permission to use the AMX state.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        granted == 0
    }

    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Palette 1, eight tiles of 16 rows of 64 bytes.
    const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Config(c)
    };

    /// Loads the tile configuration on this thread.
    pub(super) unsafe fn configure() {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    }

    /// Releases the tile state, so the thread's context switches stay cheap.
    pub(super) unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// One 32x32 block: four accumulators over the chunk's `k`.
    pub(super) unsafe fn block(b: &Block) {
        let stride_c = b.ldc * 4;
        let c1 = b.c.add(16 * b.ldc);
        if b.load {
            asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c0} + {s}*1 + 64]",
                "tileloadd tmm2, [{c1} + {s}*1]",
                "tileloadd tmm3, [{c1} + {s}*1 + 64]",
                c0 = in(reg) b.c, c1 = in(reg) c1, s = in(reg) stride_c,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem),
            );
        }
        for q in 0..b.kblocks {
            let at = |p: *const u16| p.add(q * super::TILE);
            // Each tile is loaded just before its first product, so loads overlap the
            // products already issued (measured: 15% over four loads, then four products).
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) at(b.a[0]), a1 = in(reg) at(b.a[1]),
                b0 = in(reg) at(b.b[0]), b1 = in(reg) at(b.b[1]),
                s = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c0} + {s}*1 + 64], tmm1",
            "tilestored [{c1} + {s}*1], tmm2",
            "tilestored [{c1} + {s}*1 + 64], tmm3",
            c0 = in(reg) b.c, c1 = in(reg) c1, s = in(reg) stride_c,
            options(nostack),
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX512-BF16: a tile row of B is one register of 16 column pairs; each A pair is
    //! broadcast and multiplied into it by `vdpbf16ps`, eight rows at a time.
    use super::Block;
    use std::arch::x86_64::*;

    /// Rows per pass: 8 rows x 2 column blocks = 16 accumulator registers.
    const ROWS: usize = 8;

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn block(b: &Block) {
        for r0 in (0..32).step_by(ROWS) {
            rows(b, r0);
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rows(b: &Block, r0: usize) {
        let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
        for (i, row) in acc.iter_mut().enumerate() {
            if b.load {
                let c = b.c.add((r0 + i) * b.ldc);
                *row = [_mm512_loadu_ps(c), _mm512_loadu_ps(c.add(16))];
            }
        }
        for q in 0..b.kblocks {
            for pair in 0..16 {
                let tile_row = q * super::TILE + pair * 32;
                let w0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.b[0].add(tile_row).cast()));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.b[1].add(tile_row).cast()));
                for (i, row) in acc.iter_mut().enumerate() {
                    let r = r0 + i;
                    let a = b.a[r / 16].add(q * super::TILE + (r % 16) * 32 + 2 * pair);
                    let x: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(a.cast::<i32>().read_unaligned()));
                    row[0] = _mm512_dpbf16_ps(row[0], x, w0);
                    row[1] = _mm512_dpbf16_ps(row[1], x, w1);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let c = b.c.add((r0 + i) * b.ldc);
            _mm512_storeu_ps(c, row[0]);
            _mm512_storeu_ps(c.add(16), row[1]);
        }
    }

    /// [`super::RowPairWriter::write`] compiled with the instructions `interleave` needs, so
    /// that it inlines into the loop over column blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn write_row_pairs(
        w: &super::RowPairWriter,
        pair: usize,
        col: usize,
        even: &[f32],
        odd: &[f32],
    ) {
        // SAFETY: the caller's promise; `interleave` is inlined here, with its features.
        unsafe { w.write_pieces(pair, col, even, odd, |e, o, out| interleave(e, o, out)) }
    }

    /// `out[2c] = bf16(even[c])`, `out[2c + 1] = bf16(odd[c])` for the rows' `n <= 16` values:
    /// (part of) one tile row of a packed right operand, by one two-register conversion and one
    /// word shuffle.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    pub(super) unsafe fn interleave(even: &[f32], odd: &[f32], out: &mut [u16]) {
        let n = even.len();
        assert!(n <= 16 && odd.len() == n && out.len() == 2 * n);
        // Lane c of the pair's conversion holds even[c], lane 16 + c odd[c].
        const ORDER: [u16; 32] = {
            let mut order = [0u16; 32];
            let mut c = 0;
            while c < 16 {
                order[2 * c] = c as u16;
                order[2 * c + 1] = 16 + c as u16;
                c += 1;
            }
            order
        };
        let mask = ((1u32 << n) - 1) as __mmask16;
        let e = _mm512_maskz_loadu_ps(mask, even.as_ptr());
        let o = _mm512_maskz_loadu_ps(mask, odd.as_ptr());
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(o, e));
        let pairs = _mm512_permutexvar_epi16(_mm512_loadu_si512(ORDER.as_ptr().cast()), both);
        let out_mask = ((1u64 << (2 * n)) - 1) as __mmask32;
        _mm512_mask_storeu_epi16(out.as_mut_ptr().cast(), out_mask, pairs);
    }

    /// f32 to bf16, round to nearest even, 16 at a time.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn convert(x: &[f32], out: &mut [u16]) {
        let n = x.len().min(out.len());
        let whole = n / 16 * 16;
        for i in (0..whole).step_by(16) {
            let v: __m256bh = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i)));
            _mm256_storeu_si256(
                out.as_mut_ptr().add(i).cast(),
                std::mem::transmute::<__m256bh, __m256i>(v),
            );
        }
        for i in whole..n {
            out[i] = super::to_bf16(x[i]);
        }
    }
}

/// Elsewhere neither kernel exists ([`kernel`] is `None`, so nothing here is called).
#[cfg(not(target_arch = "x86_64"))]
mod amx {
    pub(super) fn usable() -> bool {
        false
    }
    pub(super) unsafe fn configure() {}
    pub(super) unsafe fn release() {}
    pub(super) unsafe fn block(_: &super::Block) {
        unreachable!("no AMX off x86-64")
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(super) unsafe fn block(_: &super::Block) {
        unreachable!("no AVX-512 off x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::values;

    /// The vendor read by `cpuid` is the one Linux reports, so the default precision follows
    /// the CPU the machine has.
    #[test]
    fn the_vendor_is_the_one_linux_reports() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let vendor = info
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim());
        assert_eq!(is_amd(), vendor == Some("AuthenticAMD"), "{vendor:?}");
        if kernel() == Some(Bf16Kernel::Avx512Bf16) {
            assert_eq!(beats_f32(), is_amd());
        }
    }

    /// `A B` in f64 from the bf16-rounded inputs: what a bf16 product with exact
    /// accumulation gives.
    fn reference(a: Matrix, b: Matrix) -> Vec<f64> {
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let mut out = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols)
                    .map(|p| {
                        r(a.data[i * a.row_stride + p * a.col_stride])
                            * r(b.data[p * b.row_stride + j * b.col_stride])
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to the even 1 + 2^-6.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        let mut out = vec![0u16; 37];
        let x = values(37, 5, 1.0);
        convert_row(&x, &mut out);
        assert!(out.iter().zip(&x).all(|(&o, &v)| o == to_bf16(v)));
    }

    /// Packing a row-major `B` two rows at a time lays out the same tiles as walking the
    /// columns of its transposed copy, odd `k` and partial column blocks included.
    #[test]
    fn row_major_and_transposed_views_pack_alike() {
        for (k, n) in [(1, 1), (3, 17), (64, 32), (77, 50), (33, 16)] {
            let b = values(k * n, 3, 1.0);
            let mut bt = vec![0f32; n * k];
            for (i, row) in b.chunks(n).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    bt[j * k + i] = v;
                }
            }
            let plain = PackedB::pack(Matrix::row_major(&b, k, n, n));
            let walked = PackedB::pack(Matrix::transposed(&bt, k, n, k));
            assert_eq!(
                (plain.k, plain.n, plain.kb),
                (walked.k, walked.n, walked.kb)
            );
            assert!(*plain.data == *walked.data, "k {k}, n {n}");
        }
    }

    /// Every packed operand, of any size, starts on a cache line, as do its tiles; clones too.
    #[test]
    fn packed_tiles_start_on_cache_lines() {
        for (rows, cols) in [(1, 1), (3, 70), (40, 33), (300, 129)] {
            let x = values(rows * cols, 5, 1.0);
            let a = PackedA::pack(Matrix::row_major(&x, rows, cols, cols));
            let b = PackedB::pack(Matrix::row_major(&x, rows, cols, cols));
            let copy = b.clone();
            for p in [a.data.as_ptr(), b.data.as_ptr(), copy.data.as_ptr()] {
                assert_eq!(p as usize % 64, 0, "{rows} x {cols}");
            }
            assert!(*copy.data == *b.data);
            assert_eq!(b.data.len() % TILE, 0);
        }
    }

    /// Rows written a pair at a time, in pieces that cross column blocks, make the same tiles
    /// as packing the whole matrix, by the AVX-512 interleave (where the CPU has it) and by the
    /// portable one.
    #[test]
    fn row_pairs_written_in_pieces_pack_alike() {
        let (k, n) = (37, 45);
        let b = values(k * n, 4, 1.0);
        let packed = PackedB::pack(Matrix::row_major(&b, k, n, n));
        for fast in [has_interleave(), false] {
            let mut written = PackedB::zeros(k, n);
            let mut writer = written.row_pairs();
            writer.fast = fast;
            write_in_pieces(&writer, &b, (k, n));
            assert!(*written.data == *packed.data, "fast: {fast}");
        }
    }

    fn write_in_pieces(writer: &RowPairWriter, b: &[f32], (k, n): (usize, usize)) {
        let zeros = vec![0f32; n];
        for pair in 0..k.div_ceil(2) {
            let row = |i: usize| {
                if i < k {
                    &b[i * n..(i + 1) * n]
                } else {
                    &zeros[..]
                }
            };
            for (start, end) in [(0, 7), (7, 40), (40, 45)] {
                // SAFETY: one thread writes.
                unsafe {
                    writer.write(
                        pair,
                        start,
                        &row(2 * pair)[start..end],
                        &row(2 * pair + 1)[start..end],
                    )
                };
            }
        }
    }

    /// Every kernel this CPU has, on sizes with and without edges, on plain and transposed
    /// views, with and without accumulation: equal to the bf16 inputs' exact product to f32
    /// summation error.
    #[test]
    fn every_kernel_matches_the_exact_product_of_the_rounded_inputs() {
        let kernels = available();
        if kernels.is_empty() {
            eprintln!("SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16");
            return;
        }
        for (m, k, n) in [
            (1, 3, 5),
            (32, 32, 32),
            (45, 70, 33),
            (300, 600, 290),
            (64, 1100, 16),
        ] {
            let a = values(m * k, 1, 1.0);
            let bt = values(n * k, 2, 1.0);
            let (av, bv) = (
                Matrix::row_major(&a, m, k, k),
                Matrix::transposed(&bt, k, n, k),
            );
            let want = reference(av, bv);
            let packed = PackedB::pack(bv);
            for &kernel in &kernels {
                for accumulate in [false, true] {
                    let ldc = n + 3;
                    let mut c = vec![1.5f32; m * ldc];
                    let epilogue = Epilogue::default();
                    matmul_with(kernel, av, &packed, (&mut c, ldc, accumulate), epilogue);
                    for i in 0..m {
                        for j in 0..n {
                            let expect = want[i * n + j] + if accumulate { 1.5 } else { 0.0 };
                            let got = c[i * ldc + j] as f64;
                            assert!(
                                (got - expect).abs() <= 1e-5 * (1.0 + k as f64).sqrt() * 4.0,
                                "{kernel:?} {m}x{k}x{n} acc={accumulate} ({i},{j}): {got} vs {expect}"
                            );
                        }
                        assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&x| x == 1.5));
                    }
                }
            }
        }
    }

    /// The epilogue's bias and GELU on every kernel, at sizes with edges and with `k` longer
    /// than a chunk: bit for bit what the same steps give applied after the product; and
    /// [`matmul_fresh`]'s unzeroed output the same as one written over NaNs.
    #[test]
    fn epilogues_equal_the_same_steps_after_the_product() {
        let kernels = available();
        if kernels.is_empty() {
            eprintln!("SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16");
            return;
        }
        for (m, k, n) in [(1, 3, 5), (45, 70, 33), (70, 4200, 40), (64, 0, 16)] {
            let a = values(m * k, 4, 1.0);
            let bt = values(n * k, 5, 1.0);
            let bias = values(n, 6, 3.0);
            let (av, bv) = (
                Matrix::row_major(&a, m, k, k),
                Matrix::transposed(&bt, k, n, k),
            );
            let packed = PackedB::pack(bv);
            let ldc = n + 2;
            for &kernel in &kernels {
                let mut plain = vec![0.5f32; m * ldc];
                matmul_with(
                    kernel,
                    av,
                    &packed,
                    (&mut plain, ldc, true),
                    Epilogue::default(),
                );
                for activation in [Activation::Identity, Activation::GeluTanh] {
                    let epilogue = Epilogue {
                        bias: Some(&bias),
                        activation,
                    };
                    let mut fused = vec![0.5f32; m * ldc];
                    matmul_with(kernel, av, &packed, (&mut fused, ldc, true), epilogue);
                    if Some(kernel) == super::kernel() {
                        // A fresh output, never zeroed, holds the same as one written over.
                        let mut over = vec![f32::NAN; m * n];
                        matmul_with(kernel, av, &packed, (&mut over, n, false), epilogue);
                        let fresh = matmul_fresh(av, &packed, epilogue);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&fresh), bits(&over), "{m}x{k}x{n} fresh");
                    }
                    for (i, (got, sum)) in fused.iter().zip(&plain).enumerate() {
                        let (col, padding) = (i % ldc, i % ldc >= n);
                        let want = match (padding, activation) {
                            (true, _) => 0.5,
                            (false, Activation::Identity) => sum + bias[col],
                            (false, Activation::GeluTanh) => gelu_tanh(sum + bias[col]),
                        };
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{kernel:?} {m}x{k}x{n} {activation:?} at {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Parts side by side multiply as their join does, bit for bit (the partial sums stored and
    /// reloaded between parts are exact), with a part longer than a chunk of `k` and an epilogue.
    #[test]
    fn joined_parts_multiply_as_their_join() {
        if kernel().is_none() {
            eprintln!("SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16");
            return;
        }
        let (m, n, widths) = (45, 40, [64, 4224, 37]);
        let k: usize = widths.iter().sum();
        let joined = values(m * k, 7, 1.0);
        let parts: Vec<Vec<f32>> = (0..widths.len())
            .map(|p| {
                let start: usize = widths[..p].iter().sum();
                let rows = joined.chunks(k).map(|r| &r[start..start + widths[p]]);
                rows.flatten().copied().collect()
            })
            .collect();
        let views: Vec<Matrix> = parts
            .iter()
            .zip(widths)
            .map(|(p, w)| Matrix::row_major(p, m, w, w))
            .collect();
        let bt = values(n * k, 8, 1.0);
        let packed = PackedB::pack(Matrix::transposed(&bt, k, n, k));
        let bias = values(n, 9, 1.0);
        let epilogue = Epilogue {
            bias: Some(&bias),
            activation: Activation::GeluTanh,
        };
        let want = matmul_fresh(Matrix::row_major(&joined, m, k, k), &packed, epilogue);
        let got = matmul_fresh_joined(&views, &packed, epilogue);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
    }
}
