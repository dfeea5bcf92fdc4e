//! Reference images of an edit: fetched from their URLs or read from their `data:` URIs,
//! decoded, and scaled to the model's working size, before the engine runs.
//!
//! The URLs are the users' and the worker fetches them from inside the operator's network, so
//! the fetch is guarded as the API contract's file-input rules ask: only `http`/`https`; no
//! private, loopback, link-local or otherwise non-public address (as [`crate::address`] judges
//! them), checked for every address a name resolves to and for every redirect hop, unless the
//! operator's [`AllowList`] opens it; a bounded number of redirects; a connect timeout; at
//! most [`FetchPolicy::max_image_bytes`] read.
//!
//! A job's images are fetched concurrently ([`FETCH_CONCURRENCY`] at a time) within one time
//! budget, so a request of ten stalling URLs holds a worker slot for [`FetchPolicy::timeout`],
//! not ten times that; the first image that cannot be had fails the set and cancels the rest.
//!
//! Decoding is where a few bytes become gigabytes, so it is bounded before it starts: each
//! image's header is read first and an image declaring more than [`MAX_IMAGE_PIXELS`], or
//! taking the request past [`MAX_TOTAL_PIXELS`], is refused without decoding. Decoding runs on
//! a blocking thread (never the async runtime, which serves `/healthz` and the API), one image
//! of a job at a time, and each image is scaled down to the model's working size right after,
//! so a job holds at most one full-size image.
//!
//! What the client is told is the image's position, the URL as they sent it and a [`Reason`]
//! from a short fixed list; what happened (an OS error, the address a name resolved to, the
//! server's status) goes to the log under the job's request id, so answers cannot be used to
//! map the network the worker stands in.

use crate::allow::AllowList;
use crate::guard::{self, Redirects};
use image::ImageDecoder as _;
use kiln_core::engine::RgbImage;
use kiln_core::image_file::{fit_to_area, resize_lanczos, REFERENCE_MAX_PIXELS};
use kiln_core::params::{ImageLocation, ImageSource};
use std::error::Error as StdError;
use std::fmt;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How reference images may be fetched.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchPolicy {
    /// Address blocks and host names that may be reached although not public (images on the
    /// deployment's own network; tests on loopback). Empty: public addresses only.
    pub allow: AllowList,
    /// The most bytes one image may have, fetched or inline.
    pub max_image_bytes: u64,
    /// The most time fetching and decoding all of one job's images may take, redirects
    /// included: the images are fetched concurrently and share it.
    pub timeout: Duration,
    /// The most redirects one fetch follows.
    pub max_redirects: usize,
}

impl Default for FetchPolicy {
    /// The API contract's rules: images up to 50 MB, public addresses only.
    fn default() -> Self {
        Self {
            allow: AllowList::default(),
            max_image_bytes: 50 * 1000 * 1000,
            timeout: Duration::from_secs(30),
            max_redirects: 5,
        }
    }
}

/// The most pixels one image may declare: 16 MP (4096 x 4096), a large camera photo. The model
/// works at about a megapixel, so more buys nothing but decoding time and memory.
pub const MAX_IMAGE_PIXELS: u64 = 4096 * 4096;
/// The most pixels all of a request's images may declare together: four images at the
/// per-image limit (or ten 6 MP photos). It bounds a job's decoding work, about a second of
/// one core, whatever the number of images.
pub const MAX_TOTAL_PIXELS: u64 = 4 * MAX_IMAGE_PIXELS;
/// The most memory decoding one image may allocate: a [`MAX_IMAGE_PIXELS`] image in the widest
/// layout JPEG, PNG and WebP decode to (16-bit RGBA, 8 bytes a pixel) is 128 MiB; twice that
/// leaves room for a decoder's working buffers and nothing more.
const MAX_DECODE_ALLOC: u64 = 256 * 1024 * 1024;
/// Images above this many pixels are scaled down to it right after decoding: the FLUX.2
/// engine's own bound for reference images, applied by the same function.
pub const WORKING_PIXELS: u64 = REFERENCE_MAX_PIXELS;
/// How many of a job's images are downloaded at once.
pub const FETCH_CONCURRENCY: usize = 4;
/// URLs are cut to this in messages.
const SHOWN_URL_CHARS: usize = 120;

/// Why an image could not be had, as the client is told it: a few fixed reasons that say
/// nothing of the network behind the worker (a closed port, a refused connection, a timeout
/// and an HTTP error status all read "could not be fetched").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NotFetched,
    /// Its host is, or resolves only to, an address that is not public and not allowed.
    NotPublic,
    TooLarge {
        max_bytes: u64,
    },
    NotAnImage,
    BadDataUri,
    TooManyPixels {
        width: u32,
        height: u32,
    },
    /// It takes the request's images past [`MAX_TOTAL_PIXELS`] together.
    TooManyPixelsInAll,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotFetched => write!(f, "could not be fetched"),
            Reason::NotPublic => write!(f, "is not a public address"),
            Reason::TooLarge { max_bytes } => write!(f, "is larger than {max_bytes} bytes"),
            Reason::NotAnImage => write!(f, "is not an image kiln can read (JPEG, PNG or WebP)"),
            Reason::BadDataUri => write!(f, "is a data URI whose base64 does not decode"),
            Reason::TooManyPixels { width, height } => write!(
                f,
                "is {width}x{height}, larger than {MAX_IMAGE_PIXELS} pixels"
            ),
            Reason::TooManyPixelsInAll => write!(
                f,
                "takes the request's images past {MAX_TOTAL_PIXELS} pixels in all"
            ),
        }
    }
}

/// One image could not be had. The message (what the client sees) names it and gives the
/// [`Reason`]; the source is what happened, for the log.
#[derive(Debug, thiserror::Error)]
#[error("reference image {position} ({shown}) {reason}")]
pub struct FetchError {
    /// 1-based, in the request's order.
    pub position: usize,
    shown: String,
    pub reason: Reason,
    #[source]
    detail: Box<dyn StdError + Send + Sync>,
}

/// Why one image failed, before it is known which: the reason and the detail.
#[derive(Debug)]
struct Failure {
    reason: Reason,
    detail: Box<dyn StdError + Send + Sync>,
}

impl Failure {
    fn new(reason: Reason, detail: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// One image's bytes, fetched, with the size its header declares.
struct Fetched {
    bytes: Vec<u8>,
    pixels: u64,
}

/// Fetches and decodes reference images under a [`FetchPolicy`]. One per worker process: it
/// keeps a connection pool.
#[derive(Clone)]
pub struct ReferenceFetcher {
    client: reqwest::Client,
    policy: Arc<FetchPolicy>,
}

impl ReferenceFetcher {
    pub fn new(policy: FetchPolicy) -> Self {
        let client = guard::client(
            policy.allow.clone(),
            Redirects::Follow(policy.max_redirects),
        );
        Self {
            client,
            policy: Arc::new(policy),
        }
    }

    /// Every source's image, in order, each scaled to at most [`WORKING_PIXELS`].
    ///
    /// The images are fetched concurrently and their headers read; only when all are in and
    /// within the pixel limits, together too, are they decoded, one at a time (a job holds one
    /// full-size image and one core). All of it happens within [`FetchPolicy::timeout`]. The
    /// first image that cannot be had fails them all (the others are cancelled), and what
    /// happened to it is logged at warn.
    pub async fn fetch_all(&self, sources: &[ImageSource]) -> Result<Vec<RgbImage>, FetchError> {
        let deadline = tokio::time::Instant::now() + self.policy.timeout;
        let refuse = |(index, failure): (usize, Failure)| refused(index, &sources[index], failure);
        let fetched = self
            .fetch_concurrently(sources, deadline)
            .await
            .map_err(refuse)?;
        let mut declared = 0;
        for (index, image) in fetched.iter().enumerate() {
            declared += image.pixels;
            if declared > MAX_TOTAL_PIXELS {
                let detail = format!("{declared} pixels declared up to this image");
                return Err(refuse((
                    index,
                    Failure::new(Reason::TooManyPixelsInAll, detail),
                )));
            }
        }
        let mut images = Vec::with_capacity(fetched.len());
        for (index, image) in fetched.into_iter().enumerate() {
            let decoding = tokio::task::spawn_blocking(move || decode_and_scale(&image.bytes));
            let decoded = match tokio::time::timeout_at(deadline, decoding).await {
                Ok(Ok(decoded)) => decoded,
                // A decoder that panics on what it was given: the input's fault, not kiln's.
                Ok(Err(panicked)) => Err(Failure::new(Reason::NotAnImage, panicked)),
                Err(_) => Err(self.out_of_time()),
            };
            images.push(decoded.map_err(|failure| refuse((index, failure)))?);
        }
        Ok(images)
    }

    /// Every source's bytes and declared size, fetched [`FETCH_CONCURRENCY`] at a time until
    /// `deadline`; or the first failure and the index of the image it is of.
    async fn fetch_concurrently(
        &self,
        sources: &[ImageSource],
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Fetched>, (usize, Failure)> {
        let downloads = Arc::new(Semaphore::new(FETCH_CONCURRENCY));
        // Dropping the set (on the first failure, or when the job is dropped) aborts every
        // fetch still running.
        let mut tasks = JoinSet::new();
        for (index, source) in sources.iter().enumerate() {
            let (fetcher, source, downloads) = (self.clone(), source.clone(), downloads.clone());
            tasks.spawn(async move { (index, fetcher.fetch_one(&source, &downloads).await) });
        }
        let mut fetched: Vec<Option<Fetched>> = sources.iter().map(|_| None).collect();
        loop {
            let joined = match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(joined) => joined,
                Err(_) => {
                    let index = fetched.iter().position(Option::is_none).unwrap_or(0);
                    return Err((index, self.out_of_time()));
                }
            };
            match joined {
                None => return Ok(fetched.into_iter().flatten().collect()),
                Some(Ok((index, Ok(image)))) => fetched[index] = Some(image),
                Some(Ok((index, Err(failure)))) => return Err((index, failure)),
                // A panic in a fetch is a bug of kiln's: it propagates as it would inline.
                Some(Err(join_error)) => std::panic::resume_unwind(join_error.into_panic()),
            }
        }
    }

    fn out_of_time(&self) -> Failure {
        let detail = format!(
            "not fetched and decoded within {} s, the time all of a job's images share",
            self.policy.timeout.as_secs_f32()
        );
        Failure::new(Reason::NotFetched, detail)
    }

    /// One source's bytes, and its header checked against [`MAX_IMAGE_PIXELS`].
    async fn fetch_one(
        &self,
        source: &ImageSource,
        downloads: &Semaphore,
    ) -> Result<Fetched, Failure> {
        let bytes = match source.location() {
            ImageLocation::Url(url) => {
                let _slot = downloads.acquire().await.expect("never closed");
                self.download(url).await?
            }
            ImageLocation::Data { base64, .. } => self.inline_bytes(base64)?,
            // The worker reads stored inline images back into data URIs before fetching
            // (run.rs); one that reaches here was not.
            ImageLocation::Stored { key, .. } => {
                let detail = format!("stored image {key} was not read back from the blob store");
                return Err(Failure::new(Reason::NotFetched, detail));
            }
        };
        // Parsing a header is little work, but a hostile one's metadata can be some: not on
        // the async runtime either.
        tokio::task::spawn_blocking(move || {
            let pixels = read_header(&bytes)?.1;
            Ok(Fetched { bytes, pixels })
        })
        .await
        .unwrap_or_else(|panicked| Err(Failure::new(Reason::NotAnImage, panicked)))
    }

    async fn download(&self, url: &str) -> Result<Vec<u8>, Failure> {
        let parsed = reqwest::Url::parse(url).map_err(|e| Failure::new(Reason::NotFetched, e))?;
        check_url(&parsed, &self.policy.allow)?;
        let mut response = self
            .client
            .get(parsed)
            .send()
            .await
            .map_err(request_failed)?;
        let status = response.status();
        if status.is_redirection() {
            // reqwest hands back a redirect it cannot follow (to another scheme) unfollowed.
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or("nowhere");
            let detail =
                format!("redirected to {location}, which is not followed (http and https only)");
            return Err(Failure::new(Reason::NotFetched, detail));
        }
        if !status.is_success() {
            let detail = format!("the server answered {status}");
            return Err(Failure::new(Reason::NotFetched, detail));
        }
        let max = self.policy.max_image_bytes;
        let too_large = |detail: String| Failure::new(Reason::TooLarge { max_bytes: max }, detail);
        if let Some(length) = response.content_length().filter(|&n| n > max) {
            return Err(too_large(format!("the server announced {length} bytes")));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request_failed)? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > max {
                return Err(too_large(format!("more than {max} bytes sent")));
            }
        }
        Ok(bytes)
    }

    fn inline_bytes(&self, base64: &str) -> Result<Vec<u8>, Failure> {
        use base64::Engine as _;
        let max = self.policy.max_image_bytes;
        // Base64 is 4 characters for every 3 bytes: refuse before decoding what is too large.
        let decoded_len = base64.len() as u64 / 4 * 3;
        if decoded_len > max {
            let detail = format!("the data URI holds {decoded_len} bytes");
            return Err(Failure::new(Reason::TooLarge { max_bytes: max }, detail));
        }
        base64::engine::general_purpose::STANDARD
            .decode(base64)
            .map_err(|e| Failure::new(Reason::BadDataUri, e))
    }
}

/// The client's error for the image at `index`, after logging what happened.
fn refused(index: usize, source: &ImageSource, failure: Failure) -> FetchError {
    let error = FetchError {
        position: index + 1,
        shown: shown(source),
        reason: failure.reason,
        detail: failure.detail,
    };
    // The job's span around this carries the request id.
    tracing::warn!(
        image = error.position,
        source = %error.shown,
        reason = %error.reason,
        detail = %chain(&*error.detail),
        "reference image refused"
    );
    error
}

/// An error and its causes, one after another.
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// reqwest's error as a failure: "not a public address" where the guard refused the address
/// (in the resolver or on a redirect), "could not be fetched" for everything else.
fn request_failed(error: reqwest::Error) -> Failure {
    let reason = if guard::refused_by_guard(&error) {
        Reason::NotPublic
    } else {
        Reason::NotFetched
    };
    Failure::new(reason, error)
}

/// A decoder for the image in `bytes` (JPEG, PNG or WebP, found from its content) that has
/// read its header only, and the pixels the header declares, refused above
/// [`MAX_IMAGE_PIXELS`]. Blocking.
fn read_header(bytes: &[u8]) -> Result<(impl image::ImageDecoder + '_, u64), Failure> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Failure::new(Reason::NotAnImage, e))?;
    if reader.format().is_none() {
        let detail = "no JPEG, PNG or WebP signature";
        return Err(Failure::new(Reason::NotAnImage, detail));
    }
    reader.limits(decode_limits());
    let decoder = reader
        .into_decoder()
        .map_err(|e| Failure::new(Reason::NotAnImage, e))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > MAX_IMAGE_PIXELS {
        let detail = format!("the header declares {width}x{height}");
        return Err(Failure::new(
            Reason::TooManyPixels { width, height },
            detail,
        ));
    }
    Ok((decoder, pixels))
}

fn decode_limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    limits
}

/// The image in `bytes` as 8-bit RGB of at most [`WORKING_PIXELS`]; the header is checked
/// again before anything is decoded. Blocking.
fn decode_and_scale(bytes: &[u8]) -> Result<RgbImage, Failure> {
    let not_an_image = |e: image::ImageError| Failure::new(Reason::NotAnImage, e);
    let (decoder, _) = read_header(bytes)?;
    // What `ImageReader::decode` checks before allocating the pixel buffer.
    decode_limits()
        .reserve(decoder.total_bytes())
        .map_err(not_an_image)?;
    let decoded = image::DynamicImage::from_decoder(decoder).map_err(not_an_image)?;
    Ok(scale_to_working_size(decoded.into_rgb8()))
}

/// The size a `width x height` image is scaled to: [`fit_to_area`] to [`WORKING_PIXELS`], the
/// function and bound the FLUX.2 engine applies to reference images. Done here with the same
/// filter, the engine finds the image within its bound and encodes exactly what it would have
/// made of the full one; an image within the bound is left as it is. (A side is kept at least
/// 1 pixel, which the engine then refuses as too thin, as it would the original.)
fn working_size(width: u32, height: u32) -> (u32, u32) {
    let (w, h) = fit_to_area(width, height, WORKING_PIXELS);
    (w.max(1), h.max(1))
}

/// `image` scaled to [`working_size`] with the engine's filter.
fn scale_to_working_size(image: image::RgbImage) -> RgbImage {
    let size = working_size(image.width(), image.height());
    if size == image.dimensions() {
        return RgbImage {
            width: size.0,
            height: size.1,
            pixels: image.into_raw(),
        };
    }
    resize_lanczos(&image, size)
}

/// The scheme is http(s), and a host given as an address is one the allow list lets through
/// (a host name is checked when it resolves): [`guard::check_url`]'s verdict as a failure.
fn check_url(url: &reqwest::Url, allow: &AllowList) -> Result<(), Failure> {
    guard::check_url(url, allow).map_err(|refused| {
        let reason = if refused.not_public {
            Reason::NotPublic
        } else {
            Reason::NotFetched
        };
        Failure::new(reason, refused.detail)
    })
}

/// The source as shown in messages: the URL as the client sent it, cut short, or what a data
/// URI holds.
fn shown(source: &ImageSource) -> String {
    match source.location() {
        ImageLocation::Url(url) if url.chars().count() > SHOWN_URL_CHARS => {
            url.chars().take(SHOWN_URL_CHARS).chain(['…']).collect()
        }
        ImageLocation::Url(url) => url.to_string(),
        ImageLocation::Data { media_type, base64 } => {
            format!("data URI, {media_type}, {} base64 characters", base64.len())
        }
        ImageLocation::Stored { media_type, .. } => format!("inline image, {media_type}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_size_is_the_engines_area_fit() {
        // The same cases as the engine's `prepared_reference_size` test (before its cut to
        // multiples of 16).
        assert_eq!(working_size(4000, 3000), (1182, 886));
        assert_eq!(working_size(1500, 1000), (1254, 836));
        assert_eq!(working_size(1024, 1024), (1024, 1024));
        assert_eq!(working_size(70, 50), (70, 50));
        assert_eq!(working_size(2000, 1500), (1182, 886));
        // Too thin for the model: the side floored to nothing stays a pixel, and the engine
        // refuses the image as it would the original.
        assert_eq!(working_size(4096 * 4096, 1), (4194304, 1));
        for (w, h) in [
            (4000, 3000),
            (1500, 1000),
            (2000, 1500),
            (4096, 4096),
            (1025, 1024),
        ] {
            let (sw, sh) = working_size(w, h);
            assert!(u64::from(sw) * u64::from(sh) <= WORKING_PIXELS, "{w}x{h}");
        }
    }

    #[test]
    fn scaling_keeps_small_images_untouched() {
        let image = image::RgbImage::from_fn(30, 20, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let scaled = scale_to_working_size(image.clone());
        assert_eq!((scaled.width, scaled.height), (30, 20));
        assert_eq!(scaled.pixels, image.into_raw());
    }
}
