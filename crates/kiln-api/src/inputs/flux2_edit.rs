//! `blackforestlabs/flux-2/flex/edit`: FLUX.2 [flex] conditioned on reference images, as the
//! hosted API takes it (fal.ai's `flux-2-flex/edit`): the text-to-image fields, `image_urls`,
//! and an `image_size` that defaults to `auto` (the first reference image's size).

use super::flux2_flex::{
    read_image_size, read_options, render_image_size, render_options, CustomImageSize,
    Flux2ImageSize, ImageFormat, SizePreset, DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS,
};
use super::read_prompt;
use super::reader::{Choice, FieldReader};
use kiln_core::params::{GenerationParams, ImageSource, OutputSize, Prompt, RouteOptions};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

/// The seed pages' edit example.
const DEFAULT_PROMPT: &str =
    "Change the colours of the vase to a gradient from deep purple to soft pink.";
/// At most this many reference images (BFL's FLUX.2 [flex] takes up to 10).
pub(super) const MAX_IMAGES: usize = 10;

pub(super) const FIELD_TITLES: &[(&str, &str)] = &[
    ("prompt", "Prompt"),
    ("image_urls", "Image URLs"),
    ("image_size", "Image Size"),
    ("enable_prompt_expansion", "Magic Prompt"),
    ("seed", "Seed"),
    ("output_format", "Output Format"),
    ("guidance_scale", "Guidance Scale"),
    ("num_inference_steps", "Number of Inference Steps"),
];

/// The input of FLUX.2 [flex] edit (`blackforestlabs/flux-2/flex/edit`).
// As in `flux2_flex`: the serde attributes are read by `ToSchema` only; `read` parses.
#[derive(Debug, Clone, PartialEq, ToSchema)]
#[schema(title = "Input")]
#[serde(deny_unknown_fields)]
pub struct Flux2EditInput {
    /// What to change or make: 1 to 10000 characters after trimming white space (the server
    /// may set a lower limit). Refer to the images by their order ("the cup from image 2").
    #[schema(value_type = String, min_length = 1, default = json!(DEFAULT_PROMPT))]
    pub prompt: Prompt,
    /// The reference images, 1 to 10: `https://` (or `http://`) URLs the server downloads, or
    /// `data:image/...;base64,...` URIs. Each at most 50 MB (the server may set a lower limit);
    /// JPEG, PNG or WebP. Images over 1024x1024 pixels of area are scaled down to it.
    #[schema(value_type = Vec<String>, min_items = 1, max_items = 10)]
    pub image_urls: Vec<ImageSource>,
    /// The size of the generated image: `auto` (the first reference image's size, at most
    /// 1024x1024 pixels of area, sides cut to multiples of 16), a preset, or an object with
    /// width and height.
    #[schema(inline, required = false, default = "auto")]
    pub image_size: EditImageSize,
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

/// `auto`, a preset name, or custom sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(untagged)]
pub enum EditImageSize {
    Auto(#[schema(inline)] AutoSize),
    Preset(#[schema(inline)] SizePreset),
    Custom(#[schema(inline)] CustomImageSize),
}

/// The first reference image's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
pub enum AutoSize {
    #[schema(rename = "auto")]
    Auto,
}

impl Flux2EditInput {
    /// In the engine's vocabulary.
    pub fn into_params(self) -> GenerationParams {
        let size = match self.image_size {
            EditImageSize::Auto(AutoSize::Auto) => OutputSize::FirstReference,
            EditImageSize::Preset(p) => OutputSize::Pixels(Flux2ImageSize::Preset(p).pixels()),
            EditImageSize::Custom(c) => OutputSize::Pixels(Flux2ImageSize::Custom(c).pixels()),
        };
        GenerationParams {
            prompt: self.prompt,
            size,
            seed: self.seed,
            num_inference_steps: Some(self.num_inference_steps),
            guidance_scale: Some(self.guidance_scale),
            output_format: self.output_format.to_core(),
            options: RouteOptions::Flux2Flex {
                enable_prompt_expansion: self.enable_prompt_expansion,
            },
            reference_images: self.image_urls,
        }
    }
}

/// Reads the input; `None` when a violation leaves nothing to build.
pub(super) fn read(r: &mut FieldReader<'_>, max_prompt_chars: usize) -> Option<Flux2EditInput> {
    let prompt = read_prompt(r, max_prompt_chars);
    let image_urls = read_image_urls(r);
    let image_size = match r.take("image_size") {
        None => Some(EditImageSize::Auto(AutoSize::Auto)),
        Some(Value::String(name)) if name == AutoSize::NAME => {
            Some(EditImageSize::Auto(AutoSize::Auto))
        }
        Some(value) => read_image_size(r, value, ", \"auto\"").map(|size| match size {
            Flux2ImageSize::Preset(p) => EditImageSize::Preset(p),
            Flux2ImageSize::Custom(c) => EditImageSize::Custom(c),
        }),
    };
    let options = read_options(r);
    Some(Flux2EditInput {
        prompt: prompt?,
        image_urls: image_urls?,
        image_size: image_size?,
        enable_prompt_expansion: options.enable_prompt_expansion,
        seed: options.seed,
        output_format: options.output_format?,
        guidance_scale: options.guidance_scale,
        num_inference_steps: options.num_inference_steps,
    })
}

/// Required: an array of 1 to [`MAX_IMAGES`] sources, each checked (`image_urls[i]` names a bad
/// one).
fn read_image_urls(r: &mut FieldReader<'_>) -> Option<Vec<ImageSource>> {
    const WHAT: &str = "an array of 1 to 10 image URLs or data URIs";
    if r.missing("image_urls", WHAT) {
        return None;
    }
    let value = r.take("image_urls")?;
    let Value::Array(items) = &value else {
        r.violate("image_urls", format!("must be {WHAT}"), Some(&value));
        return None;
    };
    if items.is_empty() || items.len() > MAX_IMAGES {
        let rule = format!("must hold 1 to {MAX_IMAGES} images (got {})", items.len());
        r.violate("image_urls", rule, None);
        return None;
    }
    let mut sources = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("image_urls[{i}]");
        match item {
            Value::String(s) => match ImageSource::parse(s) {
                Ok(source) => sources.push(source),
                Err(e) => r.violate(&field, e.to_string(), Some(item)),
            },
            other => r.violate(&field, "must be a string", Some(other)),
        }
    }
    (sources.len() == items.len()).then_some(sources)
}

/// [`read`]'s inverse: the input that gives `params` again, every field written out. Each
/// reference image is written as `image_url` gives it, in order; one it gives `None` for is
/// left out (the caller says which: the input then needs it back before it is submitted).
pub(super) fn render(
    params: &GenerationParams,
    image_url: impl FnMut(&ImageSource) -> Option<String>,
) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("prompt".into(), json!(params.prompt.as_str()));
    let urls: Vec<String> = params
        .reference_images
        .iter()
        .filter_map(image_url)
        .collect();
    fields.insert("image_urls".into(), json!(urls));
    let size = match params.size {
        OutputSize::FirstReference => json!(AutoSize::NAME),
        OutputSize::Pixels(size) => render_image_size(size),
    };
    fields.insert("image_size".into(), size);
    render_options(params, &mut fields);
    fields
}

impl AutoSize {
    /// Its name on the wire.
    const NAME: &'static str = "auto";
}
