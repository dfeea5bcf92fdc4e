//! FLUX.2's schedule and latent layout: the empirical `mu` and channels-last token packing.

use crate::error::Result;
use candle_core::Tensor;

/// BFL's `compute_empirical_mu` (diffusers' `pipeline_flux2.py`): the time shift's `mu` from
/// the image token count and the step count, fitted by BFL at 10 and 200 steps, in float64.
pub fn empirical_mu(image_seq_len: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let len = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * len + b2;
    }
    let m_200 = a2 * len + b2;
    let m_10 = a1 * len + b1;
    let a = (m_200 - m_10) / 190.0;
    let b = m_200 - 200.0 * a;
    a * steps as f64 + b
}

/// `(b, c, h, w)` to `(b, h*w, c)`: FLUX.2 draws its noise already patchified and packs it
/// channels-last (diffusers' `Flux2Pipeline._pack_latents`).
pub fn pack_channels_last(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(2)?.transpose(1, 2)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empirical_mu_interpolates_in_steps_and_is_linear_past_4300_tokens() {
        // At 10 and 200 steps the fit returns the two lines it was made from.
        let len = 1024;
        let at = |a: f64, b: f64| a * len as f64 + b;
        assert!((empirical_mu(len, 10) - at(8.73809524e-05, 1.89833333)).abs() < 1e-12);
        assert!((empirical_mu(len, 200) - at(0.00016927, 0.45666666)).abs() < 1e-12);
        assert_eq!(empirical_mu(5000, 4), empirical_mu(5000, 50));
    }
}
