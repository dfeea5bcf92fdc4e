//! Loops the compiler vectorises with the widest vectors the CPU has: AVX-512 (16 lanes) or
//! AVX2 with FMA (8 lanes), chosen at run time so that the build stays portable; and the
//! exponential they need.

/// Lanes of the manual reductions (independent partial sums the compiler keeps in vector
/// registers): one AVX-512 register of f32, two AVX2 ones.
pub(crate) const LANES: usize = 16;

/// Runs `f` compiled for AVX-512 or for AVX2 and FMA when the CPU has them, as it is otherwise.
/// The closure is inlined into the chosen instance, so its loops vectorise with those
/// instructions (and `floor` becomes one instruction rather than a call into libm). Callers
/// mark the closure `#[inline(always)]`: without it LLVM left the larger ones (the softmax,
/// the norms) out of line, compiled for the baseline CPU, SSE code calling libm's `floorf`.
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("fma") {
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx512(f) };
        }
        if has!("avx2") && has!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: as above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `e^x` for f32 (Cephes' `expf`): `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6
/// polynomial for `e^r`, and `2^n` built in the exponent bits. Below -87 it returns
/// `e^-87` (~1.6e-38) rather than a denormal or 0, which no softmax weight notices.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * pow2(n)
}

/// `2^n` for an integral `n` in `-126..=127`, built in the exponent bits. Not `n as i32`:
/// Rust's saturating float-to-int cast kept LLVM from vectorising the loops around it (they ran
/// one value at a time, 3.5 ns a GELU on an AVX-512 core). Adding `1.5 * 2^23` puts the integer
/// `n + 127` in the low mantissa bits, where an integer subtraction reads it.
#[inline(always)]
fn pow2(n: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let biased = (n + (127.0 + MAGIC))
        .to_bits()
        .wrapping_sub(MAGIC.to_bits());
    f32::from_bits(biased << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_its_range() {
        let mut worst = 0f64;
        for i in 0..=350_000 {
            let x = -87.0 + 175.0 * i as f32 / 350_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - want).abs() / want);
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(exp(0.0), 1.0);
    }
}
