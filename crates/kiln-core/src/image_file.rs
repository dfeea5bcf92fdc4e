//! Encoding a generated image as the requested file format. Every layer that writes an image
//! file (the worker, `kiln generate`, the engine's own CLI) uses this one function.

use crate::engine::RgbImage;
use crate::params::OutputFormat;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

/// JPEG quality: visually lossless for generated images at about a tenth of PNG's size.
const JPEG_QUALITY: u8 = 92;

#[derive(Debug, thiserror::Error)]
#[error("encoding {format:?}: {source}")]
pub struct EncodeError {
    format: OutputFormat,
    source: image::ImageError,
}

pub fn encode_image(img: &RgbImage, format: OutputFormat) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    let result =
        match format {
            OutputFormat::Jpeg => JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
                .write_image(&img.pixels, img.width, img.height, ExtendedColorType::Rgb8),
            OutputFormat::Png => PngEncoder::new(&mut out).write_image(
                &img.pixels,
                img.width,
                img.height,
                ExtendedColorType::Rgb8,
            ),
        };
    result
        .map(|()| out)
        .map_err(|source| EncodeError { format, source })
}

/// Reference images are scaled down to this many pixels of area before a model encodes them
/// (diffusers' FLUX.2 pipelines: 1024 * 1024). The worker scales them right after decoding,
/// the engine again when given a larger one: the same rule and filter, so either finds the
/// other's work done.
pub const REFERENCE_MAX_PIXELS: u64 = 1024 * 1024;

/// `(width, height)` scaled down to at most `max_pixels` of area, aspect ratio kept, sides
/// floored (diffusers' `_resize_to_target_area`); unchanged when already within. A side may
/// floor to 0 for an extreme aspect ratio: callers decide what that means.
pub fn fit_to_area(width: u32, height: u32, max_pixels: u64) -> (u32, u32) {
    let area = u64::from(width) * u64::from(height);
    if area <= max_pixels {
        return (width, height);
    }
    let scale = (max_pixels as f64 / area as f64).sqrt();
    let side = |s: u32| (f64::from(s) * scale) as u32;
    (side(width), side(height))
}

/// `image` resampled to `(width, height)` with a Lanczos filter (PIL's LANCZOS, as diffusers
/// resizes reference images).
pub fn resize_lanczos(image: &image::RgbImage, (width, height): (u32, u32)) -> RgbImage {
    let out = image::imageops::resize(image, width, height, image::imageops::FilterType::Lanczos3);
    RgbImage {
        width,
        height,
        pixels: out.into_raw(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_decode_back_to_the_same_size() {
        let img = RgbImage {
            width: 48,
            height: 32,
            pixels: (0..48 * 32 * 3).map(|i| (i % 251) as u8).collect(),
        };
        for format in [OutputFormat::Jpeg, OutputFormat::Png] {
            let bytes = encode_image(&img, format).unwrap();
            let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(decoded.dimensions(), (48, 32));
            if format == OutputFormat::Png {
                assert_eq!(decoded.into_raw(), img.pixels, "PNG is lossless");
            }
        }
    }
}
