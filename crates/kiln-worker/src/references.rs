//! Reference images of an edit: fetched from their URLs or read from their `data:` URIs, and
//! decoded, before the engine runs.
//!
//! The URLs are the users' and the worker fetches them from inside the operator's network, so
//! the fetch is guarded as the API contract's file-input rules ask: only `http`/`https`; no
//! private, loopback, link-local or otherwise non-public address (as [`crate::address`] judges
//! them), checked for every address a name resolves to and for every redirect hop (unless the
//! operator allows them); a bounded number of redirects; a connect timeout and a whole-fetch
//! timeout; at most [`FetchPolicy::max_image_bytes`] read; and a bounded decoded size.

use crate::address::{non_public, NonPublic};
use kiln_core::engine::RgbImage;
use kiln_core::params::{ImageLocation, ImageSource};
use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// How reference images may be fetched.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchPolicy {
    /// Whether URLs may reach private, loopback and link-local addresses (a deployment whose
    /// images live on its own network; tests on loopback).
    pub allow_private_addresses: bool,
    /// The most bytes one image may have, fetched or inline.
    pub max_image_bytes: u64,
    /// The most time one image's fetch may take, redirects included.
    pub timeout: Duration,
    /// The most redirects one fetch follows.
    pub max_redirects: usize,
}

impl Default for FetchPolicy {
    /// The API contract's rules: images up to 50 MB, public addresses only.
    fn default() -> Self {
        Self {
            allow_private_addresses: false,
            max_image_bytes: 50 * 1000 * 1000,
            timeout: Duration::from_secs(30),
            max_redirects: 5,
        }
    }
}

/// Decoded images larger than this on a side are refused (a few bytes of PNG can claim to be
/// gigapixels); the engine scales anything above about a megapixel down anyway.
const MAX_DECODED_SIDE: u32 = 16_384;
/// The most memory decoding one image may allocate.
const MAX_DECODE_ALLOC: u64 = 1 << 30;
/// A connection that is not up by then will not be.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// URLs are cut to this in messages.
const SHOWN_URL_CHARS: usize = 120;

/// One image could not be had; the message says which and why, in words for the user.
#[derive(Debug, thiserror::Error)]
#[error("reference image {position} ({shown}): {reason}")]
pub struct FetchError {
    /// 1-based, in the request's order.
    pub position: usize,
    shown: String,
    pub reason: String,
}

/// Fetches and decodes reference images under a [`FetchPolicy`]. One per worker process: it
/// keeps a connection pool.
#[derive(Clone)]
pub struct ReferenceFetcher {
    client: reqwest::Client,
    policy: FetchPolicy,
}

impl ReferenceFetcher {
    pub fn new(policy: FetchPolicy) -> Self {
        let allow_private = policy.allow_private_addresses;
        let max_redirects = policy.max_redirects;
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(format!("more than {max_redirects} redirects"));
            }
            match check_url(attempt.url(), allow_private) {
                Ok(()) => attempt.follow(),
                Err(reason) => {
                    let message = format!("redirected to {}: {reason}", attempt.url());
                    attempt.error(message)
                }
            }
        });
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .redirect(redirects)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(policy.timeout)
            // A proxy from the environment would connect on the worker's behalf, past the
            // address checks.
            .no_proxy()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client's settings are valid");
        Self { client, policy }
    }

    /// Every source's image, in order; the first that cannot be had fails them all.
    pub async fn fetch_all(&self, sources: &[ImageSource]) -> Result<Vec<RgbImage>, FetchError> {
        let mut images = Vec::with_capacity(sources.len());
        for (i, source) in sources.iter().enumerate() {
            let error = |reason: String| FetchError {
                position: i + 1,
                shown: shown(source),
                reason,
            };
            let bytes = match source.location() {
                ImageLocation::Url(url) => self.download(url).await.map_err(error)?,
                ImageLocation::Data { base64, .. } => self.inline_bytes(base64).map_err(error)?,
            };
            images.push(decode(&bytes).map_err(error)?);
        }
        Ok(images)
    }

    async fn download(&self, url: &str) -> Result<Vec<u8>, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        check_url(&parsed, self.policy.allow_private_addresses)?;
        let mut response = self
            .client
            .get(parsed)
            .send()
            .await
            .map_err(|e| describe_request_error(e, &self.policy))?;
        let status = response.status();
        if status.is_redirection() {
            // reqwest hands back a redirect it cannot follow (to another scheme) unfollowed.
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or("nowhere");
            return Err(format!(
                "redirected to {location}, which is not followed (http and https only)"
            ));
        }
        if !status.is_success() {
            return Err(format!("the server answered {status}"));
        }
        let max = self.policy.max_image_bytes;
        if let Some(length) = response.content_length().filter(|&n| n > max) {
            return Err(too_large(length, max));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| describe_request_error(e, &self.policy))?
        {
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > max {
                return Err(format!("larger than the limit of {max} bytes"));
            }
        }
        Ok(bytes)
    }

    fn inline_bytes(&self, base64: &str) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        let max = self.policy.max_image_bytes;
        // Base64 is 4 characters for every 3 bytes: refuse before decoding what is too large.
        let decoded_len = base64.len() as u64 / 4 * 3;
        if decoded_len > max {
            return Err(too_large(decoded_len, max));
        }
        base64::engine::general_purpose::STANDARD
            .decode(base64)
            .map_err(|e| format!("the data URI's base64 does not decode: {e}"))
    }
}

fn too_large(bytes: u64, max: u64) -> String {
    format!("{bytes} bytes is larger than the limit of {max} bytes")
}

/// The image in `bytes` (JPEG, PNG or WebP, found from its content) as 8-bit RGB.
fn decode(bytes: &[u8]) -> Result<RgbImage, String> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    if reader.format().is_none() {
        return Err("not an image kiln can read (JPEG, PNG or WebP)".into());
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DECODED_SIDE);
    limits.max_image_height = Some(MAX_DECODED_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| format!("cannot decode the image: {e}"))?
        .to_rgb8();
    let (width, height) = image.dimensions();
    Ok(RgbImage {
        width,
        height,
        pixels: image.into_raw(),
    })
}

/// The scheme is http(s), and a host given as an address is one the policy allows (a host
/// name is checked when it resolves, by [`GuardedResolver`]).
fn check_url(url: &reqwest::Url, allow_private: bool) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("the scheme {} is not http or https", url.scheme()));
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(url::Host::Domain(_)) => return Ok(()),
        None => return Err("the URL has no host".into()),
    };
    match refusal(ip, allow_private) {
        None => Ok(()),
        Some(why) => Err(refused_address(ip, why)),
    }
}

/// Why the policy refuses `ip`, or `None` when it allows it.
fn refusal(ip: IpAddr, allow_private: bool) -> Option<NonPublic> {
    if allow_private {
        None
    } else {
        non_public(ip)
    }
}

fn refused_address(ip: IpAddr, why: NonPublic) -> String {
    format!(
        "{ip} is a private, loopback, link-local or otherwise non-public address ({why}), \
         which this server does not fetch from"
    )
}

/// Resolves host names like the system does, then drops every address the policy refuses; a
/// name with none left fails. Checking the addresses actually connected to (not a name looked
/// up beforehand) leaves no window for a name to change its answer in between.
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let mut allowed: Vec<SocketAddr> = Vec::new();
            let mut first_refused = None;
            for address in tokio::net::lookup_host((host.as_str(), 0)).await? {
                match refusal(address.ip(), allow_private) {
                    None => allowed.push(address),
                    Some(why) => {
                        first_refused.get_or_insert((address.ip(), why));
                    }
                }
            }
            match (allowed.is_empty(), first_refused) {
                (false, _) => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
                (true, Some((ip, why))) => {
                    Err(format!("{host} resolves to {}", refused_address(ip, why)).into())
                }
                (true, None) => Err(format!("{host} has no address").into()),
            }
        })
    }
}

/// reqwest's error, with its cause (a refused address, a redirect loop) in words.
fn describe_request_error(error: reqwest::Error, policy: &FetchPolicy) -> String {
    if error.is_timeout() {
        return format!(
            "no complete answer within {} s",
            policy.timeout.as_secs_f32()
        );
    }
    // reqwest's own text names the URL, which the message around it already shows.
    let error = error.without_url();
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// The source as shown in messages: a URL cut short, or what a data URI holds.
fn shown(source: &ImageSource) -> String {
    match source.location() {
        ImageLocation::Url(url) if url.chars().count() > SHOWN_URL_CHARS => {
            url.chars().take(SHOWN_URL_CHARS).chain(['…']).collect()
        }
        ImageLocation::Url(url) => url.to_string(),
        ImageLocation::Data { media_type, base64 } => {
            format!("data URI, {media_type}, {} base64 characters", base64.len())
        }
    }
}
