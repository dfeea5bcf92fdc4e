//! Validated generation parameters. A value of these types has passed the route's schema: the
//! HTTP layer and `kiln generate` parse into them once, and nothing downstream checks again.

use crate::catalog::Route;
use crate::ids::BlobKey;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A prompt, trimmed and non-empty, within the configured length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Prompt(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("must not be empty or only white space")]
    Empty,
    #[error("must be at most {max} characters after trimming (got {len})")]
    TooLong { len: usize, max: usize },
}

impl Prompt {
    pub fn parse(raw: &str, max_chars: usize) -> Result<Self, PromptError> {
        let trimmed = raw.trim();
        let len = trimmed.chars().count();
        if len == 0 {
            Err(PromptError::Empty)
        } else if len > max_chars {
            Err(PromptError::TooLong {
                len,
                max: max_chars,
            })
        } else {
            Ok(Self(trimmed.to_string()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Prompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The encoded file format of a result image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Jpeg,
    Png,
}

impl OutputFormat {
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Png => "png",
        }
    }
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Png => "image/png",
        }
    }
}

/// Pixel dimensions of the requested image, already rounded and range-checked by the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

/// The size of the result: given in pixels, or (an edit's `image_size: "auto"`) the size the
/// engine makes of the first reference image.
// Untagged, so records written before edits existed (`{"width", "height"}`) read back as
// `Pixels`; `FirstReference` is stored as `null`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OutputSize {
    Pixels(ImageSize),
    FirstReference,
}

/// Where a reference image comes from: an `http(s)` URL that a worker fetches, or a `data:`
/// URI carrying the image itself. Parsed at the edge: the scheme is one of these, a URL has a
/// host, and a data URI names an image media type and carries valid base64.
///
/// The API node does not keep a data URI in the job's record: it stores the image in the blob
/// store for as long as the job needs it and records a [`ImageLocation::Stored`] source
/// instead (`kiln-blob:<media type>;<key>`), which only records read back ([`ImageSource::parse`],
/// the edge, refuses it; `TryFrom<String>`, the records' reader, takes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageSource(String);

/// An [`ImageSource`], taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageLocation<'a> {
    Url(&'a str),
    Data {
        media_type: &'a str,
        base64: &'a str,
    },
    /// An inline image kept in the blob store under `key` while its job needs it.
    Stored {
        media_type: &'a str,
        key: &'a str,
    },
}

/// The scheme of [`ImageLocation::Stored`] sources; no client can send it.
const STORED_SCHEME: &str = "kiln-blob:";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageSourceError {
    #[error("must be an http:// or https:// URL or a data: URI")]
    Scheme,
    #[error("must be a URL with a host (at most {max} characters)")]
    Url { max: usize },
    #[error("a data: URI must be data:image/<type>;base64,<payload>")]
    DataUri,
    #[error("the data: URI's payload is not valid base64")]
    Base64,
}

/// Longer URLs are refused: no real image address needs more, and the job record keeps it.
const MAX_URL_CHARS: usize = 8192;

impl ImageSource {
    pub fn parse(raw: &str) -> Result<Self, ImageSourceError> {
        let raw = raw.trim();
        let scheme_end = raw.find(':').ok_or(ImageSourceError::Scheme)?;
        match raw[..scheme_end].to_ascii_lowercase().as_str() {
            "http" | "https" => {
                let host_ok = url::Url::parse(raw)
                    .ok()
                    .is_some_and(|u| u.host_str().is_some_and(|h| !h.is_empty()));
                if !host_ok || raw.len() > MAX_URL_CHARS {
                    return Err(ImageSourceError::Url { max: MAX_URL_CHARS });
                }
            }
            "data" => {
                let source = Self(raw.to_string());
                let ImageLocation::Data { base64, .. } = source.location() else {
                    return Err(ImageSourceError::DataUri);
                };
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(base64)
                    .map_err(|_| ImageSourceError::Base64)?;
                return Ok(source);
            }
            _ => return Err(ImageSourceError::Scheme),
        }
        Ok(Self(raw.to_string()))
    }

    /// An inline image stored in the blob store under `key`.
    pub fn stored(media_type: &str, key: &BlobKey) -> Self {
        Self(format!("{STORED_SCHEME}{media_type};{}", key.as_str()))
    }

    /// A `data:` URI carrying `bytes` (a stored image read back, for the fetcher).
    pub fn data(media_type: &str, bytes: &[u8]) -> Self {
        use base64::Engine as _;
        let payload = base64::engine::general_purpose::STANDARD.encode(bytes);
        Self(format!("data:{media_type};base64,{payload}"))
    }

    /// The blob key of a [`ImageLocation::Stored`] source.
    pub fn stored_key(&self) -> Option<BlobKey> {
        match self.location() {
            ImageLocation::Stored { key, .. } => BlobKey::try_from(key.to_string()).ok(),
            _ => None,
        }
    }

    /// The source taken apart. A `data:` URI that is not `data:image/...;base64,...` reads as a
    /// URL here; [`ImageSource::parse`] never lets one through.
    pub fn location(&self) -> ImageLocation<'_> {
        if let Some((media_type, key)) = self
            .0
            .strip_prefix(STORED_SCHEME)
            // Keys have no `;`; a media type may.
            .and_then(|rest| rest.rsplit_once(';'))
        {
            return ImageLocation::Stored { media_type, key };
        }
        let data = self
            .0
            .get(..5)
            .filter(|s| s.eq_ignore_ascii_case("data:"))
            .and_then(|_| self.0[5..].split_once(','))
            .and_then(|(header, payload)| {
                let media_type = header
                    .strip_suffix(";base64")
                    .or_else(|| header.strip_suffix(";BASE64"))?;
                let is_image =
                    media_type.len() > 6 && media_type[..6].eq_ignore_ascii_case("image/");
                is_image.then_some(ImageLocation::Data {
                    media_type,
                    base64: payload,
                })
            });
        data.unwrap_or(ImageLocation::Url(&self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How records read sources back: what the edge accepts, and stored images.
impl TryFrom<String> for ImageSource {
    type Error = ImageSourceError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let stored = Self(s);
        match stored.stored_key() {
            Some(_) => Ok(stored),
            None => Self::parse(&stored.0),
        }
    }
}

impl From<ImageSource> for String {
    fn from(s: ImageSource) -> String {
        s.0
    }
}

/// A route's own options, beyond the parameters every route shares: each route family's
/// variant carries exactly what its schema offers, so an engine matches on the variant it
/// understands and names the rest, rather than every engine reading every route's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "route", rename_all = "snake_case", deny_unknown_fields)]
pub enum RouteOptions {
    /// FLUX 1.1 [pro] text-to-image.
    Flux11Pro {
        /// "Raw mode" (less processed, more natural images); what it does is the model
        /// configuration's choice.
        raw: bool,
    },
    /// FLUX.2 [flex], text-to-image and edit.
    Flux2Flex {
        /// Prompt expansion by the text encoder's own language model.
        enable_prompt_expansion: bool,
    },
}

/// Everything an engine needs for one generation, in the route's vocabulary mapped to the
/// engine's: `None` means "the checkpoint's configured default".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    pub prompt: Prompt,
    pub size: OutputSize,
    pub seed: u32,
    pub num_inference_steps: Option<u32>,
    pub guidance_scale: Option<f32>,
    pub output_format: OutputFormat,
    /// What the request's route offers beyond the parameters every route shares.
    pub options: RouteOptions,
    /// An edit's reference images, in the request's order; empty for text-to-image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_images: Vec<ImageSource>,
}

impl GenerationParams {
    /// The blob keys of the reference images stored with the job (see [`ImageSource::stored`]).
    pub fn stored_images(&self) -> Vec<BlobKey> {
        self.reference_images
            .iter()
            .filter_map(ImageSource::stored_key)
            .collect()
    }

    /// Reads a job record's stored parameters (the JSON [`Serialize`] writes), `route` being
    /// the job's: records written before [`RouteOptions`] existed are read too (see
    /// [`StoredParams`]). Records are only ever written in the current form.
    pub fn from_stored_json(route: Route, json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str::<StoredParams>(json)?.into_params(route)
    }
}

/// [`GenerationParams`] as a job record may hold it. Records written before [`RouteOptions`]
/// have no `options` but two top-level flags, `raw` and `enable_prompt_expansion` (both always
/// written), and an accepted job must survive an upgrade; which flag counts depends on the
/// job's route, which only the record (not this JSON) knows. Delete this once no record of
/// the old form can remain (a job outlives its retention at most).
#[derive(Deserialize)]
struct StoredParams {
    prompt: Prompt,
    size: OutputSize,
    seed: u32,
    num_inference_steps: Option<u32>,
    guidance_scale: Option<f32>,
    output_format: OutputFormat,
    options: Option<RouteOptions>,
    /// The legacy form's flags; ignored when `options` is present.
    raw: Option<bool>,
    enable_prompt_expansion: Option<bool>,
    #[serde(default)]
    reference_images: Vec<ImageSource>,
}

impl StoredParams {
    fn into_params(self, route: Route) -> Result<GenerationParams, serde_json::Error> {
        let legacy_flag = |flag: Option<bool>, name| {
            flag.ok_or_else(|| {
                <serde_json::Error as serde::de::Error>::custom(format_args!(
                    "missing field `options` (or the legacy `{name}`)"
                ))
            })
        };
        let options = match (self.options, route) {
            (Some(options), _) => options,
            (None, Route::Flux11ProTextToImage) => RouteOptions::Flux11Pro {
                raw: legacy_flag(self.raw, "raw")?,
            },
            (None, Route::Flux2FlexTextToImage | Route::Flux2FlexEdit) => RouteOptions::Flux2Flex {
                enable_prompt_expansion: legacy_flag(
                    self.enable_prompt_expansion,
                    "enable_prompt_expansion",
                )?,
            },
        };
        Ok(GenerationParams {
            prompt: self.prompt,
            size: self.size,
            seed: self.seed,
            num_inference_steps: self.num_inference_steps,
            guidance_scale: self.guidance_scale,
            output_format: self.output_format,
            options,
            reference_images: self.reference_images,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_sources_are_urls_or_image_data_uris() {
        let url = ImageSource::parse(" https://example.com/a.png ").unwrap();
        assert_eq!(
            url.location(),
            ImageLocation::Url("https://example.com/a.png")
        );
        let data = ImageSource::parse("data:image/png;base64,iVBORw0KGgo=").unwrap();
        assert_eq!(
            data.location(),
            ImageLocation::Data {
                media_type: "image/png",
                base64: "iVBORw0KGgo="
            }
        );
        for (raw, err) in [
            ("ftp://example.com/a.png", ImageSourceError::Scheme),
            ("example.com/a.png", ImageSourceError::Scheme),
            ("https://", ImageSourceError::Url { max: MAX_URL_CHARS }),
            ("data:text/plain;base64,aGk=", ImageSourceError::DataUri),
            ("data:image/png,rawbytes", ImageSourceError::DataUri),
            (
                "data:image/png;base64,not base64!",
                ImageSourceError::Base64,
            ),
        ] {
            assert_eq!(ImageSource::parse(raw), Err(err), "{raw}");
        }
        let key = BlobKey::random("png");
        let stored = ImageSource::stored("image/png", &key);
        assert_eq!(stored.stored_key(), Some(key.clone()));
        let json = serde_json::to_string(&stored).unwrap();
        let read: ImageSource = serde_json::from_str(&json).unwrap();
        assert_eq!(read, stored, "records read stored sources back");
        assert_eq!(
            ImageSource::parse(stored.as_str()),
            Err(ImageSourceError::Scheme),
            "no client can name a blob"
        );
        let forged = r#""kiln-blob:image/png;../../etc/passwd""#;
        assert!(serde_json::from_str::<ImageSource>(forged).is_err());
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_CHARS));
        assert!(ImageSource::parse(&long).is_err());
    }

    #[test]
    fn sizes_stored_before_edits_read_back() {
        let old: OutputSize = serde_json::from_str(r#"{"width": 64, "height": 48}"#).unwrap();
        assert_eq!(
            old,
            OutputSize::Pixels(ImageSize {
                width: 64,
                height: 48
            })
        );
        let auto = serde_json::to_string(&OutputSize::FirstReference).unwrap();
        assert_eq!(
            serde_json::from_str::<OutputSize>(&auto).unwrap(),
            OutputSize::FirstReference
        );
    }

    #[test]
    fn stored_params_read_in_both_forms() {
        let current = GenerationParams {
            prompt: Prompt::parse("a cat", 100).unwrap(),
            size: OutputSize::Pixels(ImageSize {
                width: 64,
                height: 48,
            }),
            seed: 7,
            num_inference_steps: Some(4),
            guidance_scale: Some(2.5),
            output_format: OutputFormat::Png,
            options: RouteOptions::Flux2Flex {
                enable_prompt_expansion: true,
            },
            reference_images: Vec::new(),
        };
        let json = serde_json::to_string(&current).unwrap();
        assert!(
            json.contains(r#""options":{"route":"flux2_flex","enable_prompt_expansion":true}"#),
            "{json}"
        );
        assert!(
            !json.contains(r#""raw""#),
            "only the current form is written: {json}"
        );
        assert_eq!(
            GenerationParams::from_stored_json(Route::Flux2FlexTextToImage, &json).unwrap(),
            current
        );
        assert_eq!(
            serde_json::from_str::<GenerationParams>(&json).unwrap(),
            current
        );

        // Written before `RouteOptions`: the job's route picks the flag that counts.
        let legacy = r#"{"prompt":"a cat","size":{"width":64,"height":48},"seed":7,
            "num_inference_steps":null,"guidance_scale":null,"output_format":"jpeg",
            "raw":true,"enable_prompt_expansion":false}"#;
        let pro = GenerationParams::from_stored_json(Route::Flux11ProTextToImage, legacy).unwrap();
        assert_eq!(pro.options, RouteOptions::Flux11Pro { raw: true });
        assert_eq!(pro.seed, 7);
        assert_eq!(pro.output_format, OutputFormat::Jpeg);
        for route in [Route::Flux2FlexTextToImage, Route::Flux2FlexEdit] {
            let flex = GenerationParams::from_stored_json(route, legacy).unwrap();
            assert_eq!(
                flex.options,
                RouteOptions::Flux2Flex {
                    enable_prompt_expansion: false
                }
            );
        }
        assert!(
            serde_json::from_str::<GenerationParams>(legacy).is_err(),
            "the legacy form needs the route"
        );
        let neither = r#"{"prompt":"a cat","size":null,"seed":7,"output_format":"jpeg"}"#;
        let err = GenerationParams::from_stored_json(Route::Flux2FlexEdit, neither).unwrap_err();
        assert!(err.to_string().contains("enable_prompt_expansion"), "{err}");
        let unknown = json.replace("enable_prompt_expansion", "expand");
        assert!(GenerationParams::from_stored_json(Route::Flux2FlexEdit, &unknown).is_err());
    }

    #[test]
    fn prompt_is_trimmed_and_bounded() {
        assert_eq!(Prompt::parse("  a cat ", 10).unwrap().as_str(), "a cat");
        assert_eq!(Prompt::parse(" \n\t", 10), Err(PromptError::Empty));
        assert_eq!(Prompt::parse("ééééé", 5).unwrap().as_str(), "ééééé");
        assert_eq!(
            Prompt::parse("abcdef", 5),
            Err(PromptError::TooLong { len: 6, max: 5 })
        );
    }
}
