//! Inputs and comparisons shared by the kernels' tests.

/// `n` deterministic values spread uniformly over `[-spread / 2, spread / 2)` (a 64-bit
/// linear congruential generator; the tests need no statistics beyond that).
pub(crate) fn values(n: usize, seed: u64, spread: f32) -> Vec<f32> {
    const MUL: u64 = 6364136223846793005;
    const INC: u64 = 1442695040888963407;
    let mut x = seed.wrapping_mul(MUL).wrapping_add(INC);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(MUL).wrapping_add(INC);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread
        })
        .collect()
}

/// The largest absolute difference between two equally long sequences.
pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
