//! `blackforestlabs/flux-2/flex/text-to-image`: FLUX.2 [flex] as the hosted API takes it
//! (fal.ai's size presets or custom sides in multiples of 16, steps, guidance, prompt expansion).

use super::read_prompt;
use super::reader::{one_of, rounded_side, within, Choice, FieldReader};
use kiln_core::catalog::FLUX2_SIDES;
use kiln_core::params::{
    GenerationParams, ImageSize, OutputFormat, OutputSize, Prompt, RouteOptions,
};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

/// The seed page's example prompt, which its schema gives as the default.
const DEFAULT_PROMPT: &str = "High-resolution iPhone photograph tightly composed to capture two fashionable women standing mid-distance from a pristine white gallery wall adorned with a large whimsical modern artwork. The scene shows a candid moment mid-discussion, their relaxed postures conveying natural engagement with the art and each other. One woman, seen from a slight side angle at three-quarter rear view, wears a dark gray corset-style top paired with relaxed black jeans that gently crease at the ankle, her arms loosely at her sides. Her hair, softly catching the ambient light, frames her face as she directs her gaze thoughtfully toward the painting. The other woman, captured from behind and slightly to the side, dons a sleek black dress with subtle texture, complemented by a delicate gingham ribbon tied neatly in her hair, which cascades softly over her shoulders. Her hands rest casually by her sides as she leans slightly forward, visibly engaged in the conversation. Soft, diffuse ambient gallery lighting gently sculpts fabric textures—the corset's structured sheen and the dress's smooth flow—while creating a natural compression between figure and whimsical artwork. The expansive white wall behind them provides a clean, graphic background, establishing a calm horizontal rhythm that anchors this intimate, fashion-forward moment of contemporary art appreciation within a serene minimalist museum setting.";
pub(super) const DEFAULT_SEED: u32 = 0;
pub(super) const DEFAULT_GUIDANCE: f32 = 3.5;
const GUIDANCE_MIN: f64 = 1.5;
const GUIDANCE_MAX: f64 = 10.0;
pub(super) const DEFAULT_STEPS: u32 = 28;
const STEPS_MIN: u32 = 2;
const STEPS_MAX: u32 = 50;
/// Custom sides: multiples of 16 (the latent patch size), 64 to 2048, at most 4 MP in all
/// (kiln-core's [`FLUX2_SIDES`], which the engine keeps `image_size: "auto"` within too).
pub(super) const SIDE_STEP: u32 = FLUX2_SIDES.step;
pub(super) const SIDE_MIN: u32 = FLUX2_SIDES.min;
pub(super) const SIDE_MAX: u32 = FLUX2_SIDES.max;
pub(super) const MAX_PIXELS: u64 = FLUX2_SIDES.max_pixels;

pub(super) const FIELD_TITLES: &[(&str, &str)] = &[
    ("prompt", "Prompt"),
    ("image_size", "Image Size"),
    ("enable_prompt_expansion", "Magic Prompt"),
    ("seed", "Seed"),
    ("output_format", "Output Format"),
    ("guidance_scale", "Guidance Scale"),
    ("num_inference_steps", "Number of Inference Steps"),
];

/// The input of FLUX.2 Flex text-to-image (`blackforestlabs/flux-2/flex/text-to-image`).
// `serde(...)` attributes here are read by `ToSchema` (it speaks serde's vocabulary); these
// types are never deserialized by serde: `read` below collects every violation instead.
#[derive(Debug, Clone, PartialEq, ToSchema)]
#[schema(title = "Input")]
#[serde(deny_unknown_fields)]
pub struct Flux2FlexInput {
    /// What to draw: 1 to 10000 characters after trimming white space (the server may set a
    /// lower limit).
    #[schema(value_type = String, min_length = 1, default = json!(DEFAULT_PROMPT))]
    pub prompt: Prompt,
    /// The size of the generated image. For custom image sizes, you can pass an object with
    /// width and height.
    #[schema(inline, required = false, default = json!(SizePreset::default().name()))]
    pub image_size: Flux2ImageSize,
    /// Whether to expand the prompt using the model's own knowledge.
    #[schema(required = false, default = true)]
    pub enable_prompt_expansion: bool,
    /// The same seed and input make the same image.
    #[schema(required = false, format = Int64, default = json!(DEFAULT_SEED), minimum = 0, maximum = 4294967295_u64)]
    pub seed: u32,
    /// The format of the generated image.
    #[schema(inline, required = false, default = json!(ImageFormat::default().name()))]
    pub output_format: ImageFormat,
    /// The guidance scale to use for the generation.
    #[schema(required = false, default = json!(DEFAULT_GUIDANCE), minimum = 1.5, maximum = 10)]
    pub guidance_scale: f32,
    /// The number of inference steps to perform.
    #[schema(required = false, default = json!(DEFAULT_STEPS), minimum = 2, maximum = 50)]
    pub num_inference_steps: u32,
}

/// A preset name or custom sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(untagged)]
pub enum Flux2ImageSize {
    Preset(#[schema(inline)] SizePreset),
    Custom(#[schema(inline)] CustomImageSize),
}

/// fal.ai's published size presets, whose names the hosted API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ToSchema)]
pub enum SizePreset {
    #[schema(rename = "square_hd")]
    SquareHd,
    #[schema(rename = "square")]
    Square,
    #[schema(rename = "portrait_4_3")]
    Portrait4x3,
    #[schema(rename = "portrait_16_9")]
    Portrait16x9,
    #[default]
    #[schema(rename = "landscape_4_3")]
    Landscape4x3,
    #[schema(rename = "landscape_16_9")]
    Landscape16x9,
}

impl Choice for SizePreset {
    const ALL: &'static [Self] = &[
        Self::SquareHd,
        Self::Square,
        Self::Portrait4x3,
        Self::Portrait16x9,
        Self::Landscape4x3,
        Self::Landscape16x9,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::SquareHd => "square_hd",
            Self::Square => "square",
            Self::Portrait4x3 => "portrait_4_3",
            Self::Portrait16x9 => "portrait_16_9",
            Self::Landscape4x3 => "landscape_4_3",
            Self::Landscape16x9 => "landscape_16_9",
        }
    }
}

impl SizePreset {
    fn pixels(self) -> ImageSize {
        let (width, height) = match self {
            Self::SquareHd => (1024, 1024),
            Self::Square => (512, 512),
            Self::Portrait4x3 => (768, 1024),
            Self::Portrait16x9 => (576, 1024),
            Self::Landscape4x3 => (1024, 768),
            Self::Landscape16x9 => (1024, 576),
        };
        ImageSize { width, height }
    }
}

/// Custom sides in pixels, each rounded to the nearest multiple of 16, then 64 to 2048; at most
/// 4 MP (4,000,000 pixels) in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomImageSize {
    #[schema(minimum = 64, maximum = 2048)]
    pub width: u32,
    #[schema(minimum = 64, maximum = 2048)]
    pub height: u32,
}

/// The encoded file format of the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ToSchema)]
pub enum ImageFormat {
    #[default]
    #[schema(rename = "jpeg")]
    Jpeg,
    #[schema(rename = "png")]
    Png,
}

impl Choice for ImageFormat {
    const ALL: &'static [Self] = &[Self::Jpeg, Self::Png];

    fn name(self) -> &'static str {
        match self {
            Self::Jpeg => "jpeg",
            Self::Png => "png",
        }
    }
}

impl Flux2FlexInput {
    /// In the engine's vocabulary: pixels and the core's output format.
    pub fn into_params(self) -> GenerationParams {
        GenerationParams {
            prompt: self.prompt,
            size: OutputSize::Pixels(self.image_size.pixels()),
            seed: self.seed,
            num_inference_steps: Some(self.num_inference_steps),
            guidance_scale: Some(self.guidance_scale),
            output_format: self.output_format.to_core(),
            options: RouteOptions::Flux2Flex {
                enable_prompt_expansion: self.enable_prompt_expansion,
            },
            reference_images: Vec::new(),
        }
    }
}

/// Reads the input; `None` when a violation leaves nothing to build.
pub(super) fn read(r: &mut FieldReader<'_>, max_prompt_chars: usize) -> Option<Flux2FlexInput> {
    let prompt = read_prompt(r, max_prompt_chars);
    let image_size = match r.take("image_size") {
        None => Some(Flux2ImageSize::Preset(SizePreset::default())),
        Some(value) => read_image_size(r, value, ""),
    };
    let options = read_options(r);
    Some(Flux2FlexInput {
        prompt: prompt?,
        image_size: image_size?,
        enable_prompt_expansion: options.enable_prompt_expansion,
        seed: options.seed,
        output_format: options.output_format?,
        guidance_scale: options.guidance_scale,
        num_inference_steps: options.num_inference_steps,
    })
}

/// The sampling fields FLUX.2 [flex]'s text-to-image and edit inputs share, defaults applied.
pub(super) struct Flux2Options {
    pub enable_prompt_expansion: bool,
    pub seed: u32,
    /// `None` when invalid (a violation was recorded).
    pub output_format: Option<ImageFormat>,
    pub guidance_scale: f32,
    pub num_inference_steps: u32,
}

pub(super) fn read_options(r: &mut FieldReader<'_>) -> Flux2Options {
    let enable_prompt_expansion = r.boolean("enable_prompt_expansion").unwrap_or(true);
    let seed = r
        .integer("seed", |n| within(n, 0, u32::MAX))
        .unwrap_or(DEFAULT_SEED);
    let output_format = if r.has("output_format") {
        r.choice("output_format")
    } else {
        Some(ImageFormat::default())
    };
    let guidance_scale = r
        .number("guidance_scale", |x| {
            if (GUIDANCE_MIN..=GUIDANCE_MAX).contains(&x) {
                Ok(x as f32)
            } else {
                Err(format!(
                    "must be a number between {GUIDANCE_MIN} and {GUIDANCE_MAX}"
                ))
            }
        })
        .unwrap_or(DEFAULT_GUIDANCE);
    let num_inference_steps = r
        .integer("num_inference_steps", |n| within(n, STEPS_MIN, STEPS_MAX))
        .unwrap_or(DEFAULT_STEPS);
    Flux2Options {
        enable_prompt_expansion,
        seed,
        output_format,
        guidance_scale,
        num_inference_steps,
    }
}

impl ImageFormat {
    pub(super) fn to_core(self) -> OutputFormat {
        match self {
            ImageFormat::Jpeg => OutputFormat::Jpeg,
            ImageFormat::Png => OutputFormat::Png,
        }
    }

    fn from_core(format: OutputFormat) -> Self {
        match format {
            OutputFormat::Jpeg => ImageFormat::Jpeg,
            OutputFormat::Png => ImageFormat::Png,
        }
    }
}

impl Flux2ImageSize {
    pub(super) fn pixels(self) -> ImageSize {
        match self {
            Flux2ImageSize::Preset(preset) => preset.pixels(),
            Flux2ImageSize::Custom(CustomImageSize { width, height }) => {
                ImageSize { width, height }
            }
        }
    }
}

/// A preset name or custom sides. `other_names` lists further accepted names for the rule's
/// text (the edit route also takes `"auto"`, which its caller reads first).
pub(super) fn read_image_size(
    r: &mut FieldReader<'_>,
    value: Value,
    other_names: &str,
) -> Option<Flux2ImageSize> {
    match value {
        Value::String(name) => match SizePreset::ALL.iter().find(|p| p.name() == name) {
            Some(preset) => Some(Flux2ImageSize::Preset(*preset)),
            None => {
                let rule = format!(
                    "{}{other_names} or an object {{\"width\", \"height\"}}",
                    one_of::<SizePreset>()
                );
                r.violate("image_size", rule, Some(&Value::String(name)));
                None
            }
        },
        Value::Object(fields) => {
            let mut custom = r.nested("image_size.", fields);
            let side = |n| rounded_side(n, SIDE_STEP, SIDE_MIN, SIDE_MAX);
            let mut required_side = |name| {
                if custom.missing(name, "an integer") {
                    None
                } else {
                    custom.integer(name, side)
                }
            };
            let width = required_side("width");
            let height = required_side("height");
            custom.finish(|| vec!["width".into(), "height".into()]);
            let (width, height) = (width?, height?);
            let pixels = u64::from(width) * u64::from(height);
            if pixels > MAX_PIXELS {
                let rule = format!(
                    "must be at most 4 MP ({MAX_PIXELS} pixels) after rounding; {width}x{height} is {pixels}"
                );
                r.violate("image_size", rule, None);
                return None;
            }
            Some(Flux2ImageSize::Custom(CustomImageSize { width, height }))
        }
        other => {
            let rule = format!(
                "must be a string ({}{other_names}) or an object {{\"width\", \"height\"}}",
                one_of::<SizePreset>()
            );
            r.violate("image_size", rule, Some(&other));
            None
        }
    }
}

/// [`read`]'s inverse: the input that gives `params` again, every field written out.
pub(super) fn render(params: &GenerationParams) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("prompt".into(), json!(params.prompt.as_str()));
    // `FirstReference` is an edit's size, never this route's: its default stands then.
    if let OutputSize::Pixels(size) = params.size {
        fields.insert("image_size".into(), render_image_size(size));
    }
    render_options(params, &mut fields);
    fields
}

/// [`read_image_size`]'s inverse: a preset's name when `size` is a preset's pixels, else the
/// custom sides (already rounded and within range, so they read back unchanged).
pub(super) fn render_image_size(size: ImageSize) -> Value {
    let preset = SizePreset::ALL.iter().find(|p| p.pixels() == size);
    match preset {
        Some(preset) => json!(preset.name()),
        None => json!({"width": size.width, "height": size.height}),
    }
}

/// [`read_options`]' inverse, into `fields`. Steps and guidance are always set for FLUX.2
/// routes; were one not, it is left out and its default stands.
pub(super) fn render_options(params: &GenerationParams, fields: &mut Map<String, Value>) {
    // Another route's options are never these routes': the default stands then.
    if let RouteOptions::Flux2Flex {
        enable_prompt_expansion,
    } = params.options
    {
        fields.insert(
            "enable_prompt_expansion".into(),
            json!(enable_prompt_expansion),
        );
    }
    fields.insert("seed".into(), json!(params.seed));
    let format = ImageFormat::from_core(params.output_format);
    fields.insert("output_format".into(), json!(format.name()));
    if let Some(guidance) = params.guidance_scale {
        fields.insert("guidance_scale".into(), shortest_decimal(guidance));
    }
    if let Some(steps) = params.num_inference_steps {
        fields.insert("num_inference_steps".into(), json!(steps));
    }
}

/// `x` as the shortest decimal that reads back as `x` (`2.7`, not `f64::from(2.7f32)`'s
/// `2.700000047683716`): the parser reads a JSON number as an `f64` and narrows it, so the
/// decimal must survive that path too; where it would not, the exact value is written.
fn shortest_decimal(x: f32) -> Value {
    let shortest = x.to_string().parse::<f64>().ok();
    let value = shortest
        .filter(|&decimal| decimal as f32 == x)
        .unwrap_or(f64::from(x));
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}
