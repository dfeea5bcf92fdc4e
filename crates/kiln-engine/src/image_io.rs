//! Pixels out: decoder output to 8-bit RGB, latents to a preview.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use kiln_core::engine::RgbImage;

/// `(1, 3, H, W)` in [-1, 1] to 8-bit RGB as diffusers' image processor does it: `x / 2 + 0.5`
/// clamped in the tensor's dtype, then `round(255 x)` in f32.
pub(crate) fn to_rgb(x: &Tensor) -> Result<RgbImage> {
    let (_, c, h, w) = x.dims4()?;
    debug_assert_eq!(c, 3);
    let x = ((x / 2.0)? + 0.5)?.clamp(0.0, 1.0)?.to_dtype(DType::F32)?;
    let hwc = (x.squeeze(0)?.permute((1, 2, 0))? * 255.0)?
        .round()?
        .to_device(&Device::Cpu)?;
    let pixels = hwc
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as u8)
        .collect();
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    })
}

/// FLUX.1 latent channels to RGB, per latent pixel (ComfyUI's `latent_formats.Flux`).
const FLUX1_PREVIEW_FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
/// FLUX.2's 32 un-patchified latent channels to RGB (ComfyUI's `latent_formats.Flux2`).
const FLUX2_PREVIEW_FACTORS: [[f32; 3]; 32] = [
    [0.0058, 0.0113, 0.0073],
    [0.0495, 0.0443, 0.0836],
    [-0.0099, 0.0096, 0.0644],
    [0.2144, 0.3009, 0.3652],
    [0.0166, -0.0039, -0.0054],
    [0.0157, 0.0103, -0.0160],
    [-0.0398, 0.0902, -0.0235],
    [-0.0052, 0.0095, 0.0109],
    [-0.3527, -0.2712, -0.1666],
    [-0.0301, -0.0356, -0.0180],
    [-0.0107, 0.0078, 0.0013],
    [0.0746, 0.0090, -0.0941],
    [0.0156, 0.0169, 0.0070],
    [-0.0034, -0.0040, -0.0114],
    [0.0032, 0.0181, 0.0080],
    [-0.0939, -0.0008, 0.0186],
    [0.0018, 0.0043, 0.0104],
    [0.0284, 0.0056, -0.0127],
    [-0.0024, -0.0022, -0.0030],
    [0.1207, -0.0026, 0.0065],
    [0.0128, 0.0101, 0.0142],
    [0.0137, -0.0072, -0.0007],
    [0.0095, 0.0092, -0.0059],
    [0.0000, -0.0077, -0.0049],
    [-0.0465, -0.0204, -0.0312],
    [0.0095, 0.0012, -0.0066],
    [0.0290, -0.0034, 0.0025],
    [0.0220, 0.0169, -0.0048],
    [-0.0332, -0.0457, -0.0468],
    [-0.0085, 0.0389, 0.0609],
    [-0.0076, 0.0003, -0.0043],
    [-0.0111, -0.0460, -0.0614],
];
/// The same bias serves both.
const PREVIEW_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// A cheap preview, one pixel per latent pixel, of latents in the VAE's own space: FLUX.1's
/// `(1, 16, h, w)` or FLUX.2's un-patchified `(1, 32, h, w)`; `None` for other channel counts.
pub(crate) fn preview(latents: &Tensor) -> Result<Option<RgbImage>> {
    let (_, c, h, w) = latents.dims4()?;
    let dev = latents.device();
    let factors = match c {
        16 => Tensor::new(&FLUX1_PREVIEW_FACTORS, dev)?,
        32 => Tensor::new(&FLUX2_PREVIEW_FACTORS, dev)?,
        _ => return Ok(None),
    };
    let bias = Tensor::new(&PREVIEW_BIAS, dev)?;
    let pixels = latents
        .to_dtype(DType::F32)?
        .reshape((c, h * w))?
        .t()?
        .matmul(&factors)?
        .broadcast_add(&bias)?;
    let rgb = (((pixels + 1.0)? / 2.0)?.clamp(0.0, 1.0)? * 255.0)?
        .round()?
        .to_device(&Device::Cpu)?;
    let pixels = rgb
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as u8)
        .collect();
    Ok(Some(RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_of_zero_latents_is_the_bias_colour() {
        for channels in [16, 32] {
            let z = Tensor::zeros((1, channels, 2, 3), DType::F32, &Device::Cpu).unwrap();
            let p = preview(&z).unwrap().unwrap();
            assert_eq!((p.width, p.height), (3, 2));
            let want: Vec<u8> = PREVIEW_BIAS
                .iter()
                .map(|b| (((b + 1.0) / 2.0) * 255.0).round() as u8)
                .collect();
            assert_eq!(&p.pixels[..3], want.as_slice());
        }
    }

    #[test]
    fn flux2_preview_applies_its_own_factors() {
        // One latent pixel with only channel 3 set: RGB = factors[3] + bias.
        let mut v = vec![0f32; 32];
        v[3] = 1.0;
        let z = Tensor::from_vec(v, (1, 32, 1, 1), &Device::Cpu).unwrap();
        let p = preview(&z).unwrap().unwrap();
        let want: Vec<u8> = (0..3)
            .map(|i| {
                let x = FLUX2_PREVIEW_FACTORS[3][i] + PREVIEW_BIAS[i];
                (((x + 1.0) / 2.0) * 255.0).round() as u8
            })
            .collect();
        assert_eq!(p.pixels, want);
    }
}
