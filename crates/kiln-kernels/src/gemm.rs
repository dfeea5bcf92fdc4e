//! f32 matrix products `C = A B` or `C += A B` on strided views.
//!
//! Two implementations: OpenBLAS's `cblas_sgemm`, loaded at run time from the system's
//! `libopenblas.so.0` when there is one (Debian: `libopenblas0`), and the gemm crate (what
//! candle itself uses) otherwise. Loading at run time keeps the build free of system libraries
//! while a machine that has OpenBLAS gets its kernels for the CPU at hand: measured on the
//! 2-core AMD EPYC development machines, a 4096^3 product runs at 150-213 GFLOP/s with Debian's
//! OpenBLAS 0.3.21 and its AVX2 (Haswell) kernels, 290-390 with its AVX-512 (Skylake-X)
//! kernels where the CPU has AVX-512 (see [`choose_avx512_kernels`]), 95 with the gemm crate
//! and 140-165 in PyTorch; see BENCHMARKS.md. The gemm crate is built with its AVX-512 kernels
//! (its `x86-v4` feature; it still picks AVX2 ones at run time on CPUs without AVX-512): on the
//! Intel development machine, with nothing installed, they ran a 4096^3 product 2-3 times as
//! fast as its AVX2 ones (median 182 against 54 GFLOP/s over alternating runs).
//!
//! OpenBLAS runs single-threaded: each product is split over rayon's threads here, so the
//! machine's threads are one pool shared with kiln's other kernels. (OpenBLAS's own pool spins
//! in `sched_yield` for a while after each product, which took 6% of a transformer call's
//! CPU time from the layers that ran next.)

use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

/// A read-only strided matrix: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Matrix<'a> {
    /// A row-major matrix with rows `row_stride` apart.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `cols x rows` matrix with rows `stride` apart.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: stride,
        }
    }

    /// The `rows x cols` block whose first element is `(row, col)`.
    fn offset(&self, row: usize, col: usize, rows: usize, cols: usize) -> Matrix<'a> {
        let start = (row * self.row_stride + col * self.col_stride).min(self.data.len());
        Matrix {
            data: &self.data[start..],
            rows,
            cols,
            ..*self
        }
    }

    pub(crate) fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }

    /// How OpenBLAS can read it: (transposed?, leading dimension).
    fn blas_layout(&self) -> Option<(bool, usize)> {
        if self.col_stride == 1 && self.row_stride >= self.cols.max(1) {
            Some((false, self.row_stride))
        } else if self.row_stride == 1 && self.col_stride >= self.rows.max(1) {
            Some((true, self.col_stride))
        } else {
            None
        }
    }
}

/// Which implementation runs a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    OpenBlas,
    Builtin,
}

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

struct OpenBlas {
    sgemm: Sgemm,
    config: String,
    _library: libloading::Library,
}

impl OpenBlas {
    /// `C = A B` (or `C += A B`) with `C` at `c`, rows `ldc` apart, on the calling thread.
    ///
    /// # Safety
    /// `c` must hold `a.rows` rows of `b.cols` elements `ldc` apart; both views must fit their
    /// data and be readable by BLAS ([`Matrix::blas_layout`]); every size must fit a C int.
    unsafe fn product(&self, a: Matrix, b: Matrix, c: *mut f32, ldc: usize, accumulate: bool) {
        let ((ta, lda), (tb, ldb)) = (
            a.blas_layout().expect("checked by the caller"),
            b.blas_layout().expect("checked by the caller"),
        );
        let t = |transposed| if transposed { TRANS } else { NO_TRANS };
        (self.sgemm)(
            ROW_MAJOR,
            t(ta),
            t(tb),
            a.rows as c_int,
            b.cols as c_int,
            a.cols as c_int,
            1.0,
            a.data.as_ptr(),
            lda as c_int,
            b.data.as_ptr(),
            ldb as c_int,
            if accumulate { 1.0 } else { 0.0 },
            c,
            ldc as c_int,
        )
    }
}

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

fn openblas() -> Option<&'static OpenBlas> {
    static OPENBLAS: OnceLock<Option<OpenBlas>> = OnceLock::new();
    OPENBLAS
        .get_or_init(|| {
            choose_avx512_kernels();
            ["libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"]
                .iter()
                .find_map(|name| {
                    // SAFETY: OpenBLAS's initialisers only set up its thread pool and CPU dispatch;
                    // the two symbols are used with their documented C signatures.
                    unsafe {
                        let library = libloading::Library::new(*name).ok()?;
                        let sgemm = *library.get::<Sgemm>(b"cblas_sgemm\0").ok()?;
                        // One thread per call: kiln splits each product over rayon's threads
                        // itself (see `split_product`), so OpenBLAS's own pool would only spin.
                        if let Ok(set_threads) = library
                            .get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0")
                        {
                            set_threads(1);
                        }
                        let text = |symbol: &[u8]| {
                            library
                                .get::<unsafe extern "C" fn() -> *const c_char>(symbol)
                                .ok()
                                .map(|f| CStr::from_ptr(f()).to_string_lossy().trim().to_string())
                                .unwrap_or_default()
                        };
                        let config = text(b"openblas_get_config\0");
                        let core = text(b"openblas_get_corename\0");
                        Some(OpenBlas {
                            sgemm,
                            config: format!("OpenBLAS ({name}: {config}; {core} kernels)"),
                            _library: library,
                        })
                    }
                })
        })
        .as_ref()
}

/// The environment variable with which a run-time-dispatching OpenBLAS build (Debian's) is
/// told which CPU's kernels to use instead of detecting it.
const OPENBLAS_CORETYPE: &str = "OPENBLAS_CORETYPE";

/// Asks OpenBLAS for its AVX-512 kernels (Skylake-X's) when the CPU has the AVX-512 subsets
/// they use and the user has not chosen a core type (a set `OPENBLAS_CORETYPE` is kept: the
/// development machines' environment sets `Haswell`, for instance).
///
/// Why: OpenBLAS picks kernels by CPU model, and a release older than the CPU does not know
/// the model's vector width. Debian 12's OpenBLAS 0.3.21 runs its AVX2 (Haswell) kernels on
/// the AVX-512 AMD EPYC development machine; with the Skylake-X kernels a 4096^3 product took
/// 0.36-0.39 s instead of 0.68-0.71 s (BENCHMARKS.md). OpenBLAS reads the variable when it
/// is loaded, so this runs just before; binaries load it at startup, before other threads
/// exist ([`backend`]).
fn choose_avx512_kernels() {
    if cpu_has_avx512() && std::env::var_os(OPENBLAS_CORETYPE).is_none() {
        std::env::set_var(OPENBLAS_CORETYPE, "SKYLAKEX");
    }
}

/// Whether the CPU has the AVX-512 subsets OpenBLAS's Skylake-X kernels use.
fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f")
            && has!("avx512cd")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The implementation [`matmul`] uses for whole-machine products. The first call loads
/// OpenBLAS; binaries make it at startup, before starting other threads.
pub fn backend() -> Backend {
    if openblas().is_some() {
        Backend::OpenBlas
    } else {
        Backend::Builtin
    }
}

/// A line for logs: which implementation runs the matrix products.
pub fn describe() -> String {
    match openblas() {
        Some(o) => o.config.clone(),
        None => "the gemm crate (no libopenblas.so.0 on this machine)".into(),
    }
}

/// `C = A B`, or `C += A B` when `accumulate`, with `C` row-major `a.rows x b.cols`, rows
/// `ldc` apart, using [`backend`] and every thread of rayon's pool.
pub fn matmul(a: Matrix, b: Matrix, c: &mut [f32], ldc: usize, accumulate: bool) {
    matmul_with(backend(), a, b, c, ldc, accumulate)
}

/// [`matmul`] with a chosen implementation ([`Backend::OpenBlas`] falls back to the builtin
/// one when OpenBLAS is absent or cannot read a view's strides).
pub fn matmul_with(
    backend: Backend,
    a: Matrix,
    b: Matrix,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert!(a.fits() && b.fits(), "a view reaches past its data");
    assert!(
        ldc >= n && (m == 0 || (m - 1) * ldc + n <= c.len()),
        "the output is too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    if backend == Backend::OpenBlas {
        let small = |x: usize| c_int::try_from(x).is_ok();
        if let (Some(blas), Some(_), Some(_)) = (openblas(), a.blas_layout(), b.blas_layout()) {
            if [
                m,
                n,
                k,
                a.row_stride,
                a.col_stride,
                b.row_stride,
                b.col_stride,
                ldc,
            ]
            .into_iter()
            .all(small)
            {
                let output = Output(c.as_mut_ptr());
                split_product(m, n, k, |rows, cols| {
                    let a = a.offset(rows.start, 0, rows.len(), k);
                    let b = b.offset(0, cols.start, k, cols.len());
                    // SAFETY: the views and the output were checked to hold every element read
                    // or written and the sizes fit a C int; the parts write disjoint blocks.
                    unsafe {
                        blas.product(
                            a,
                            b,
                            output.at(rows.start * ldc + cols.start),
                            ldc,
                            accumulate,
                        )
                    }
                });
                return;
            }
        }
    }
    let parallelism = match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    };
    // SAFETY: as above; gemm reads `c` only when accumulating.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The output pointer of a product whose parts run on several threads, each writing its own
/// block of `C` (here and in [`crate::bf16`]).
#[derive(Clone, Copy)]
pub(crate) struct Output(pub(crate) *mut f32);

// SAFETY: the parts of a product write disjoint blocks of `C`.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: offsets stay within the checked output.
        unsafe { self.0.add(offset) }
    }
}

/// Products below this many multiply-adds run on the calling thread alone.
const SPLIT_MIN_WORK: usize = 1 << 21;
/// Parts are whole multiples of this many rows or columns (a microkernel's width).
const SPLIT_ALIGN: usize = 16;

/// Runs `part(rows, cols)` for one block of `C` per rayon thread, the larger of `C`'s two
/// dimensions split in contiguous, aligned ranges. Each part repacks the operand it shares
/// with the others, which costs `1 / (other dimension)` of its work: nothing at layer sizes.
fn split_product(
    m: usize,
    n: usize,
    k: usize,
    part: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    let threads = rayon::current_num_threads();
    let along = m.max(n);
    let size = along.div_ceil(threads).next_multiple_of(SPLIT_ALIGN);
    if threads == 1 || m * n * k < SPLIT_MIN_WORK || size >= along {
        part(0..m, 0..n);
        return;
    }
    let parts: Vec<std::ops::Range<usize>> = (0..along)
        .step_by(size)
        .map(|start| start..(start + size).min(along))
        .collect();
    rayon::scope(|scope| {
        for range in parts {
            let part = &part;
            scope.spawn(move |_| {
                if m >= n {
                    part(range, 0..n)
                } else {
                    part(0..m, range)
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{max_abs_diff, values};

    fn naive(a: Matrix, b: Matrix) -> Vec<f32> {
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|p| {
                        a.data[i * a.row_stride + p * a.col_stride] as f64
                            * b.data[p * b.row_stride + j * b.col_stride] as f64
                    })
                    .sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn every_backend_and_layout_matches_the_definition() {
        let (m, k, n) = (37, 53, 29);
        let a_rows = values(m * k, 1, 2.0); // m x k row-major
        let a_cols = values(k * m, 2, 2.0); // its transpose stored: k x m row-major
        let b_rows = values(k * n, 3, 2.0);
        let b_cols = values(n * k, 4, 2.0);
        let views_a = [
            Matrix::row_major(&a_rows, m, k, k),
            Matrix::transposed(&a_cols, m, k, m),
        ];
        let views_b = [
            Matrix::row_major(&b_rows, k, n, n),
            Matrix::transposed(&b_cols, k, n, k),
        ];
        for backend in [Backend::OpenBlas, Backend::Builtin] {
            for a in views_a {
                for b in views_b {
                    let expected = naive(a, b);
                    let mut c = vec![0.5; m * n];
                    matmul_with(backend, a, b, &mut c, n, false);
                    let err = max_abs_diff(&c, &expected);
                    assert!(err < 1e-4, "{backend:?}: {err}");
                    matmul_with(backend, a, b, &mut c, n, true);
                    let doubled: Vec<f32> = expected.iter().map(|y| 2.0 * y).collect();
                    let err = max_abs_diff(&c, &doubled);
                    assert!(err < 1e-4, "{backend:?} accumulating: {err}");
                }
            }
        }
    }

    /// `.ci/run` installs Debian's libopenblas0 and sets REQUIRE_OPENBLAS, so CI tests both
    /// implementations; elsewhere, without it, the builtin one alone was tested, and this says so.
    #[test]
    fn openblas_is_found_where_installed() {
        match openblas() {
            Some(o) => assert!(o.config.starts_with("OpenBLAS"), "{}", o.config),
            None if std::env::var_os("REQUIRE_OPENBLAS").is_some() => panic!("REQUIRE_OPENBLAS is set but no libopenblas.so.0 loads"),
            None => eprintln!("SKIPPED: no libopenblas.so.0 on this machine; only the builtin products were tested"),
        }
    }

    /// Set in the environment of a child run of [`avx512_kernels_unless_a_core_type_is_set`].
    const CHILD: &str = "KILN_KERNELS_TEST_OPENBLAS_CHILD";

    /// OpenBLAS reads `OPENBLAS_CORETYPE` once, when it is loaded, so each case runs this test
    /// binary again as a child with the environment the case needs. The child reports the
    /// kernels it loaded and the error of a product that blocks and packs like a large one.
    #[test]
    fn avx512_kernels_unless_a_core_type_is_set() {
        if std::env::var_os(CHILD).is_some() {
            let (m, k, n) = (301, 257, 283);
            let a = values(m * k, 5, 2.0);
            let b = values(k * n, 6, 2.0);
            let (a, b) = (
                Matrix::row_major(&a, m, k, k),
                Matrix::row_major(&b, k, n, n),
            );
            let mut c = vec![0.0; m * n];
            matmul_with(Backend::OpenBlas, a, b, &mut c, n, false);
            println!("kernels: {}", describe());
            println!("error: {}", max_abs_diff(&c, &naive(a, b)));
            return;
        }
        if openblas().is_none() {
            // openblas_is_found_where_installed fails where REQUIRE_OPENBLAS is set.
            eprintln!("SKIPPED: no libopenblas.so.0 on this machine");
            return;
        }
        let child = |core_type: Option<&str>| {
            let mut command = std::process::Command::new(std::env::current_exe().unwrap());
            command
                .args([
                    "gemm::tests::avx512_kernels_unless_a_core_type_is_set",
                    "--exact",
                    "--nocapture",
                ])
                .env(CHILD, "1");
            match core_type {
                Some(c) => command.env(OPENBLAS_CORETYPE, c),
                None => command.env_remove(OPENBLAS_CORETYPE),
            };
            let out = command.output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "{stdout}");
            let line = |prefix: &str| {
                stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(prefix))
                    .unwrap_or_else(|| panic!("no {prefix:?} in {stdout}"))
                    .to_string()
            };
            let error: f32 = line("error: ").parse().unwrap();
            assert!(error < 1e-3, "{core_type:?}: error {error}");
            line("kernels: ")
        };
        // A chosen core type is kept; Haswell's kernels need AVX2 and FMA to run.
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let chosen = child(Some("Haswell"));
            assert!(chosen.ends_with("Haswell kernels)"), "{chosen}");
        }
        let detected = child(None);
        if cpu_has_avx512() {
            assert!(detected.ends_with("SkylakeX kernels)"), "{detected}");
        } else {
            eprintln!("no AVX-512 on this CPU: OpenBLAS detected {detected}");
        }
    }
}
