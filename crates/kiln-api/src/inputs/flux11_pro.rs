//! `blackforestlabs/flux-1-1-pro/text-to-image`: FLUX 1.1 [pro] as the hosted API takes it
//! (aspect-ratio presets, custom sides in multiples of 32, raw mode).

use super::read_prompt;
use super::reader::{rounded_side, within, Choice, FieldReader};
use kiln_core::params::{
    GenerationParams, ImageSize, OutputFormat, OutputSize, Prompt, RouteOptions,
};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

/// The seed page's example prompt, which its schema gives as the default.
const DEFAULT_PROMPT: &str = "A cocktail menu book placed on a bar counter. The cover design is minimalist with the 'Zeitinsel' logo prominently centered on the front. Below the logo is an elegant photograph of an Aviation cocktail in a crystal coupe glass, showcasing its signature lavender-blue hue with a maraschino cherry floating delicately on top. The lighting captures the subtle purple tones while the liquid appears silky smooth, creating an ethereal and sophisticated appearance. The cover maintains a clean and elegant aesthetic.";
const DEFAULT_SEED: u32 = 81_048_285;
/// A custom side that was not given.
const DEFAULT_SIDE: u32 = 1024;
/// BFL's FLUX1.1 [pro] API takes sides in multiples of 32 from 256 to 1440.
pub(super) const SIDE_STEP: u32 = 32;
pub(super) const SIDE_MIN: u32 = 256;
pub(super) const SIDE_MAX: u32 = 1440;
const SIDES: [&str; 2] = ["width", "height"];

pub(super) const FIELD_TITLES: &[(&str, &str)] = &[
    ("prompt", "Prompt"),
    ("image_size", "Aspect Ratio (W:H)"),
    ("width", "Width"),
    ("height", "Height"),
    ("seed", "Seed"),
    ("raw", "Raw Mode"),
];

/// The input of FLUX 1.1 Pro text-to-image (`blackforestlabs/flux-1-1-pro/text-to-image`).
// `serde(...)` attributes here are read by `ToSchema` (it speaks serde's vocabulary); these
// types are never deserialized by serde: `read` below collects every violation instead.
#[derive(Debug, Clone, PartialEq, ToSchema)]
#[schema(title = "Input")]
#[serde(deny_unknown_fields)]
pub struct Flux11ProInput {
    /// What to draw: 1 to 10000 characters after trimming white space (the server may set a
    /// lower limit).
    #[schema(value_type = String, min_length = 1, default = json!(DEFAULT_PROMPT))]
    pub prompt: Prompt,
    /// When selecting a custom range, it must be a multiple of 32. If it's not, it will be
    /// automatically rounded to the nearest multiple of 32.
    #[schema(inline, required = false, default = json!(AspectRatio::default().name()))]
    pub image_size: AspectRatio,
    /// Only with `Custom`: the width in pixels, rounded to the nearest multiple of 32, then 256
    /// to 1440.
    #[schema(nullable = false, default = json!(DEFAULT_SIDE), minimum = 256, maximum = 1440)]
    pub width: Option<u32>,
    /// Only with `Custom`: the height in pixels, rounded to the nearest multiple of 32, then
    /// 256 to 1440.
    #[schema(nullable = false, default = json!(DEFAULT_SIDE), minimum = 256, maximum = 1440)]
    pub height: Option<u32>,
    /// The same seed and input make the same image.
    #[schema(required = false, format = Int64, default = json!(DEFAULT_SEED), minimum = 0, maximum = 4294967295_u64)]
    pub seed: u32,
    /// Enabling raw mode means generating images that are less processed and more
    /// natural-looking.
    #[schema(required = false, default = false)]
    pub raw: bool,
}

/// The image's aspect ratio (width:height), or `Custom` sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ToSchema)]
pub enum AspectRatio {
    #[default]
    #[schema(rename = "16:9")]
    Landscape16x9,
    #[schema(rename = "4:3")]
    Landscape4x3,
    #[schema(rename = "1:1")]
    Square,
    #[schema(rename = "1:1 (hd)")]
    SquareHd,
    #[schema(rename = "3:4")]
    Portrait3x4,
    #[schema(rename = "9:16")]
    Portrait9x16,
    Custom,
}

impl Choice for AspectRatio {
    const ALL: &'static [Self] = &[
        Self::Landscape16x9,
        Self::Landscape4x3,
        Self::Square,
        Self::SquareHd,
        Self::Portrait3x4,
        Self::Portrait9x16,
        Self::Custom,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Landscape16x9 => "16:9",
            Self::Landscape4x3 => "4:3",
            Self::Square => "1:1",
            Self::SquareHd => "1:1 (hd)",
            Self::Portrait3x4 => "3:4",
            Self::Portrait9x16 => "9:16",
            Self::Custom => "Custom",
        }
    }
}

impl AspectRatio {
    /// The preset's pixel size (~1 MP in multiples of 32, as BFL's API takes them); `None` for
    /// `Custom`.
    fn pixels(self) -> Option<ImageSize> {
        let (width, height) = match self {
            Self::Landscape16x9 => (1344, 768),
            Self::Landscape4x3 => (1152, 864),
            Self::Square => (1024, 1024),
            Self::SquareHd => (1440, 1440),
            Self::Portrait3x4 => (864, 1152),
            Self::Portrait9x16 => (768, 1344),
            Self::Custom => return None,
        };
        Some(ImageSize { width, height })
    }
}

impl Flux11ProInput {
    /// In the engine's vocabulary: pixels, and the checkpoint's own steps and guidance (the
    /// hosted API exposes neither for this model).
    pub fn into_params(self) -> GenerationParams {
        let size = self.image_size.pixels().unwrap_or(ImageSize {
            width: self.width.unwrap_or(DEFAULT_SIDE),
            height: self.height.unwrap_or(DEFAULT_SIDE),
        });
        GenerationParams {
            prompt: self.prompt,
            size: OutputSize::Pixels(size),
            seed: self.seed,
            num_inference_steps: None,
            guidance_scale: None,
            output_format: OutputFormat::Jpeg,
            options: RouteOptions::Flux11Pro { raw: self.raw },
            reference_images: Vec::new(),
        }
    }
}

/// Reads the input; `None` when a violation leaves nothing to build.
pub(super) fn read(r: &mut FieldReader<'_>, max_prompt_chars: usize) -> Option<Flux11ProInput> {
    let prompt = read_prompt(r, max_prompt_chars);
    let image_size = if r.has("image_size") {
        r.choice::<AspectRatio>("image_size")
    } else {
        Some(AspectRatio::default())
    };
    let side = |n| rounded_side(n, SIDE_STEP, SIDE_MIN, SIDE_MAX);
    let (width, height) = if image_size == Some(AspectRatio::Custom) {
        (r.integer("width", side), r.integer("height", side))
    } else {
        for name in SIDES {
            // With an invalid image_size that violation says enough.
            if let (Some(value), Some(_)) = (r.take(name), image_size) {
                r.violate(
                    name,
                    "only allowed when image_size is \"Custom\"",
                    Some(&value),
                );
            }
        }
        (None, None)
    };
    let seed = r
        .integer("seed", |n| within(n, 0, u32::MAX))
        .unwrap_or(DEFAULT_SEED);
    let raw = r.boolean("raw").unwrap_or(false);
    Some(Flux11ProInput {
        prompt: prompt?,
        image_size: image_size?,
        width,
        height,
        seed,
        raw,
    })
}

/// [`read`]'s inverse: the input that gives `params` again, every field written out. A size is
/// given by its preset's name when it is a preset's pixels, else as `Custom` sides (already
/// multiples of 32 within range, so they read back unchanged).
pub(super) fn render(params: &GenerationParams) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("prompt".into(), json!(params.prompt.as_str()));
    // `FirstReference` is an edit's size, never this route's: its default stands then.
    if let OutputSize::Pixels(size) = params.size {
        let preset = AspectRatio::ALL
            .iter()
            .find(|ratio| ratio.pixels() == Some(size));
        match preset {
            Some(ratio) => {
                fields.insert("image_size".into(), json!(ratio.name()));
            }
            None => {
                fields.insert("image_size".into(), json!(AspectRatio::Custom.name()));
                fields.insert("width".into(), json!(size.width));
                fields.insert("height".into(), json!(size.height));
            }
        }
    }
    fields.insert("seed".into(), json!(params.seed));
    // Another route's options are never this route's: its default stands then.
    if let RouteOptions::Flux11Pro { raw } = params.options {
        fields.insert("raw".into(), json!(raw));
    }
    fields
}
