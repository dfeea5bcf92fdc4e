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
const PREVIEW_FACTORS: [[f32; 3]; 16] = [
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
const PREVIEW_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// A cheap preview, one pixel per latent pixel, of diffusion-space latents `(1, 16, h, w)`;
/// `None` for latents with another channel count.
pub(crate) fn preview(latents: &Tensor) -> Result<Option<RgbImage>> {
    let (_, c, h, w) = latents.dims4()?;
    if c != PREVIEW_FACTORS.len() {
        return Ok(None);
    }
    let dev = latents.device();
    let factors = Tensor::new(&PREVIEW_FACTORS, dev)?;
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
        let z = Tensor::zeros((1, 16, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let p = preview(&z).unwrap().unwrap();
        assert_eq!((p.width, p.height), (3, 2));
        let want: Vec<u8> = PREVIEW_BIAS
            .iter()
            .map(|b| (((b + 1.0) / 2.0) * 255.0).round() as u8)
            .collect();
        assert_eq!(&p.pixels[..3], want.as_slice());
    }
}
