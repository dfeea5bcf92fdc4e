//! Reference images as FLUX.2 conditions on them (editing): each prepared as diffusers'
//! `Flux2Pipeline` prepares it, encoded by the VAE to packed normalised tokens that follow the
//! noisy ones, each at its own time coordinate.

use crate::error::{Error, Result};
use crate::pipeline::Runtime;
use crate::vae::flux2::Flux2Vae;
use candle_core::{DType, Device, Tensor};
use kiln_core::engine::RgbImage;
use kiln_core::image_file::{fit_to_area, resize_lanczos};

/// Larger reference images are scaled down to this many pixels (diffusers: 1024 * 1024).
pub use kiln_core::image_file::REFERENCE_MAX_PIXELS;

/// Reference images as the transformer takes them.
pub(super) struct References {
    /// All images' packed normalised tokens, in order; `None` for no image.
    pub(super) tokens: Option<Tensor>,
    /// Each image's token grid (rows, columns).
    pub(super) grids: Vec<(usize, usize)>,
}

/// A `width x height` reference image's size after scaling down to [`REFERENCE_MAX_PIXELS`] of
/// area (aspect ratio kept, sides floored, as diffusers' `_resize_to_target_area`), and after
/// cutting each side down to a multiple of `multiple`; `None` where a side is then empty.
fn prepared_reference_size(
    width: u32,
    height: u32,
    multiple: u32,
) -> Option<((u32, u32), (u32, u32))> {
    let fit = fit_to_area(width, height, REFERENCE_MAX_PIXELS);
    let cut = (fit.0 / multiple * multiple, fit.1 / multiple * multiple);
    (cut.0 > 0 && cut.1 > 0).then_some((fit, cut))
}

/// The `index`th reference image's sizes as diffusers prepares it: scaled down to
/// [`REFERENCE_MAX_PIXELS`] of area when larger (aspect ratio kept, sides floored), then each
/// side cut down to a multiple of `multiple`. (diffusers resamples to that last size where
/// kiln centre-crops: the two differ by at most 15 pixels a side.)
pub(super) fn reference_sizes(
    index: usize,
    img: &RgbImage,
    multiple: u32,
) -> Result<((u32, u32), (u32, u32))> {
    prepared_reference_size(img.width, img.height, multiple).ok_or_else(|| {
        Error::InvalidRequest(format!(
            "reference image {} is {}x{}: each side needs at least {multiple} pixels after scaling to at most {REFERENCE_MAX_PIXELS} pixels",
            index + 1,
            img.width,
            img.height
        ))
    })
}

/// `img` resampled to `(width, height)` with a Lanczos filter (PIL's LANCZOS, as diffusers).
fn resize(img: &RgbImage, size: (u32, u32)) -> Result<RgbImage> {
    let buffer =
        image::RgbImage::from_raw(img.width, img.height, img.pixels.clone()).ok_or_else(|| {
            Error::InvalidRequest("a reference image's pixels do not match its size".into())
        })?;
    Ok(resize_lanczos(&buffer, size))
}

/// Reference images as packed normalised tokens, concatenated, and each one's token grid;
/// where preparing an image changes its size, the notes say so.
pub(super) fn encode(
    vae: &Flux2Vae,
    rt: &Runtime,
    images: &[RgbImage],
    notes: &mut Vec<String>,
) -> Result<References> {
    let f = vae.config().scale_factor() as u32;
    let mut tokens = Vec::with_capacity(images.len());
    let mut grids = Vec::with_capacity(images.len());
    for (i, img) in images.iter().enumerate() {
        let (w, h, pixels) = prepare(i, img, 2 * f, notes)?;
        tokens.push(vae.encode(&rt.put(&pixels)?)?);
        grids.push(((h / f / 2) as usize, (w / f / 2) as usize));
    }
    let tokens = if tokens.is_empty() {
        None
    } else {
        Some(Tensor::cat(&tokens, 1)?)
    };
    Ok(References { tokens, grids })
}

/// The `index`th image scaled and centre-cropped as [`reference_sizes`] says, as the VAE's
/// input `(1, 3, h, w)` in [-1, 1] (f32 on the CPU), with its width and height.
fn prepare(
    index: usize,
    img: &RgbImage,
    multiple: u32,
    notes: &mut Vec<String>,
) -> Result<(u32, u32, Tensor)> {
    let (area_fit, (w, h)) = reference_sizes(index, img, multiple)?;
    let resized;
    let img = if area_fit != (img.width, img.height) {
        notes.push(format!(
            "reference image {} resized from {}x{} to {}x{} (at most {REFERENCE_MAX_PIXELS} pixels)",
            index + 1,
            img.width,
            img.height,
            area_fit.0,
            area_fit.1
        ));
        resized = resize(img, area_fit)?;
        &resized
    } else {
        img
    };
    if (w, h) != (img.width, img.height) {
        notes.push(format!(
            "reference image {} centre-cropped from {}x{} to {w}x{h}",
            index + 1,
            img.width,
            img.height
        ));
    }
    let full = Tensor::from_vec(
        img.pixels.clone(),
        (img.height as usize, img.width as usize, 3),
        &Device::Cpu,
    )?;
    let crop = full
        .narrow(0, ((img.height - h) / 2) as usize, h as usize)?
        .narrow(1, ((img.width - w) / 2) as usize, w as usize)?;
    // diffusers' image processor: [0, 255] -> [0, 1] in f32 -> [-1, 1].
    let x = ((crop.to_dtype(DType::F32)? / 255.0)? * 2.0)?
        .affine(1.0, -1.0)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?;
    Ok((w, h, x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_scaled_to_a_megapixel_then_cut_to_the_size_multiple() {
        // A 12 MP photo: about 1 MP with its aspect ratio, then multiples of 16.
        assert_eq!(
            prepared_reference_size(4000, 3000, 16),
            Some(((1182, 886), (1168, 880)))
        );
        assert_eq!(
            prepared_reference_size(1500, 1000, 16),
            Some(((1254, 836), (1248, 832)))
        );
        // Up to a megapixel only the cut applies.
        assert_eq!(
            prepared_reference_size(1024, 1024, 16),
            Some(((1024, 1024), (1024, 1024)))
        );
        assert_eq!(
            prepared_reference_size(70, 50, 16),
            Some(((70, 50), (64, 48)))
        );
        assert_eq!(prepared_reference_size(10, 500, 16), None);
        assert_eq!(prepared_reference_size(20000, 10, 16), None);
    }

    #[test]
    fn resizing_keeps_a_flat_image_flat() {
        let flat = RgbImage {
            width: 40,
            height: 30,
            pixels: [10, 200, 90].repeat(40 * 30),
        };
        let out = resize(&flat, (20, 15)).unwrap();
        assert_eq!((out.width, out.height), (20, 15));
        assert!(out.pixels.chunks(3).all(|p| p == [10, 200, 90]));
    }
}
