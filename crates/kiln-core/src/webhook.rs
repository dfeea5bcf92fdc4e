//! Webhooks: where a request's end is announced, the outbox row each announcement becomes, and
//! the signing secret of each API key.
//!
//! A submit may name a [`WebhookUrl`]. When the job reaches a terminal state, the store writes
//! one delivery (an outbox row, keyed by the request id) in the same transaction as that state,
//! so an announcement can be neither lost nor made for a state that was rolled back. A
//! dispatcher on any node claims due deliveries ([`crate::store::JobStore::claim_webhooks`]),
//! POSTs them and records each attempt; a delivery not acknowledged is retried with backoff
//! until its deadline. The messages are signed per the Standard Webhooks spec with a secret
//! derived from the node's shared signing key and the API key's id ([`webhook_secret`]), so
//! every node signs alike and no secret is stored.

use crate::ids::{KeyId, RequestId};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use time::OffsetDateTime;

/// The longest webhook URL accepted.
pub const MAX_WEBHOOK_URL_CHARS: usize = 2048;

/// The shape of a webhook URL accepted at submit, as the OpenAPI document states it (a JSON
/// Schema `pattern`): `http(s)://`, a DNS name ending in a letter or an IPv4 address, an optional
/// port, and a path (with query) of URL-safe characters. [`WebhookUrl::parse`] checks exactly this,
/// so what the document allows the server takes and nothing else (IPv6 literals, user
/// information and non-ASCII names are refused: percent-encode or use a DNS name).
pub const WEBHOOK_URL_PATTERN: &str = concat!(
    "^[Hh][Tt][Tt][Pp][Ss]?://",
    "([A-Za-z0-9.-]*[A-Za-z]|",
    "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3})",
    "(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?",
    "(/([A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?$"
);

/// Whether `raw` matches [`WEBHOOK_URL_PATTERN`] (written out: the pattern is for the document).
fn has_documented_shape(raw: &str) -> bool {
    let lower = raw.get(..8).unwrap_or(raw).to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &raw[8..]
    } else if lower.starts_with("http://") {
        &raw[7..]
    } else {
        return false;
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    (is_dns_name(host) || is_ipv4(host)) && port.is_none_or(is_port) && is_url_path(path)
}

/// URL-safe characters, a `%` only as the start of an escape (`%` and two hex digits): the
/// URL is shown back as a URI (a result's `webhook.url`), which a stray `%` is not.
fn is_url_path(path: &str) -> bool {
    let mut bytes = path.bytes();
    while let Some(b) = bytes.next() {
        let ok = match b {
            b'%' => {
                bytes.next().is_some_and(|h| h.is_ascii_hexdigit())
                    && bytes.next().is_some_and(|l| l.is_ascii_hexdigit())
            }
            _ => b.is_ascii_alphanumeric() || b"._~!$&'()*+,;=:@/?-".contains(&b),
        };
        if !ok {
            return false;
        }
    }
    true
}

fn is_dns_name(host: &str) -> bool {
    host.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && host.bytes().last().is_some_and(|b| b.is_ascii_alphabetic())
}

/// Four decimal octets, each 0..=255 without leading zeros.
fn is_ipv4(host: &str) -> bool {
    let octets: Vec<&str> = host.split('.').collect();
    octets.len() == 4
        && octets.iter().all(|o| {
            !o.is_empty()
                && o.len() <= 3
                && o.bytes().all(|b| b.is_ascii_digit())
                && (o.len() == 1 || !o.starts_with('0'))
                && o.parse::<u16>().is_ok_and(|v| v <= 255)
        })
}

/// 1 to 4 digits, or 5 digits without a leading zero up to 65535.
fn is_port(port: &str) -> bool {
    port.bytes().all(|b| b.is_ascii_digit())
        && match port.len() {
            1..=4 => true,
            5 => !port.starts_with('0') && port.parse::<u32>().is_ok_and(|v| v <= 65535),
            _ => false,
        }
}

/// An absolute `http`/`https` URL with a host: where a request's end is POSTed. Parsed once at
/// submit; whether its address may be reached is decided at each delivery (names resolve anew).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WebhookUrl(String);

/// Why a webhook URL was refused, as the client is told it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidWebhookUrl {
    #[error("must be an absolute URL ({0})")]
    NotAUrl(String),
    #[error("must use http or https, not '{0}'")]
    Scheme(String),
    #[error("must name a host")]
    NoHost,
    #[error("must be at most {MAX_WEBHOOK_URL_CHARS} characters")]
    TooLong,
    #[error("must be http(s)://HOST[:PORT][/PATH] with a DNS name or an IPv4 address and a path of URL-safe characters")]
    Shape,
}

impl WebhookUrl {
    pub fn parse(raw: &str) -> Result<Self, InvalidWebhookUrl> {
        if raw.chars().count() > MAX_WEBHOOK_URL_CHARS {
            return Err(InvalidWebhookUrl::TooLong);
        }
        if !has_documented_shape(raw) {
            // A URL of another scheme is named as such: the commonest mistake.
            return match url::Url::parse(raw) {
                Ok(url) if !matches!(url.scheme(), "http" | "https") => {
                    Err(InvalidWebhookUrl::Scheme(url.scheme().to_string()))
                }
                Err(e) => Err(InvalidWebhookUrl::NotAUrl(e.to_string())),
                Ok(_) => Err(InvalidWebhookUrl::Shape),
            };
        }
        let url = url::Url::parse(raw).map_err(|e| InvalidWebhookUrl::NotAUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(InvalidWebhookUrl::Scheme(url.scheme().to_string()));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(InvalidWebhookUrl::NoHost);
        }
        Ok(Self(url.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WebhookUrl {
    type Error = InvalidWebhookUrl;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<WebhookUrl> for String {
    fn from(url: WebhookUrl) -> String {
        url.0
    }
}

impl std::fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `webhook-id` of a request's terminal announcement: the same on every attempt (receivers
/// deduplicate by it), one per request.
pub fn message_id(request: RequestId) -> String {
    format!("msg_{}", request.as_uuid().simple())
}

/// The webhook signing secret of API key `owner`, as `GET /v1/webhooks/secret` hands it out
/// (`whsec_` and the base64 of 32 bytes). Derived, not stored: HMAC-SHA256 of the key's id under
/// the deployment's signing key, so every node derives the same one and rotating the signing key
/// rotates every secret.
pub fn webhook_secret(signing_key: &[u8], owner: KeyId) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(signing_key).expect("HMAC takes a key of any length");
    mac.update(b"kiln webhook secret\n");
    mac.update(owner.to_string().as_bytes());
    let bytes = mac.finalize().into_bytes();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The Standard Webhooks signature header's value for `body` sent as message `id` at
/// `timestamp` (unix seconds) under `secret` (`whsec_...`): `v1,<base64 HMAC-SHA256 of
/// "{id}.{timestamp}.{body}">`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("secrets are made by webhook_secret, valid base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes a key of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{signature}")
}

/// One try at delivering a webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookAttempt {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub outcome: AttemptOutcome,
}

/// What the receiver answered, or why nothing was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The receiver's HTTP status (2xx: delivered).
    Status(u16),
    /// No answer: a short reason that says nothing of the network behind the dispatcher
    /// ("could not connect", "timed out after 10 s", "not a public address").
    Error(String),
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its next attempt (or being attempted now).
    Pending,
    /// A receiver answered 2xx; no attempt follows.
    Delivered,
    /// Not delivered before its deadline; no attempt follows.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|state| state.as_str() == s)
    }
}

/// A request's terminal announcement as recorded: for the result's `webhook` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    pub url: WebhookUrl,
    pub state: DeliveryState,
    pub attempts: Vec<WebhookAttempt>,
}

/// A delivery a dispatcher has claimed: it alone attempts it until its claim runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    pub request: RequestId,
    pub owner: KeyId,
    pub url: WebhookUrl,
    /// When the job ended (the outbox row was written): retries stop `retry_for` after it.
    pub created_at: OffsetDateTime,
    /// The attempts made so far.
    pub attempts: Vec<WebhookAttempt>,
    /// Increases with every claim; recording an attempt names it (a dispatcher whose claim
    /// ran out and was taken over cannot record over the new one).
    pub claim_token: i64,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    Delivered,
    /// Try again this long from now (by the store's clock).
    RetryIn(std::time::Duration),
    GiveUp,
}

/// Writes the body of a delivery's message: the request's result as the API answers it, which
/// only the HTTP layer knows how to write (wire types live there). The dispatcher, which lives
/// with the guarded HTTP client in the worker crate, is handed one by the binary.
#[async_trait::async_trait]
pub trait WebhookMessages: Send + Sync {
    /// `{"request_id", "status": "OK"|"ERROR", "payload": <result object>, "error"?}` for
    /// `delivery`'s request, written now (its file URLs are signed afresh on every attempt);
    /// `None` when the request's record is gone (it expired first), and nothing can be sent.
    async fn body(
        &self,
        delivery: &WebhookDelivery,
    ) -> Result<Option<Vec<u8>>, crate::store::StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_are_parsed_once() {
        assert!(WebhookUrl::parse("https://example.com/hook?x=1").is_ok());
        assert!(WebhookUrl::parse("http://127.0.0.1:8080/h").is_ok());
        assert!(matches!(
            WebhookUrl::parse("ftp://example.com/"),
            Err(InvalidWebhookUrl::Scheme(s)) if s == "ftp"
        ));
        assert!(matches!(
            WebhookUrl::parse("/relative"),
            Err(InvalidWebhookUrl::NotAUrl(_))
        ));
        assert!(matches!(
            WebhookUrl::parse("file:///etc/passwd"),
            Err(InvalidWebhookUrl::Scheme(_))
        ));
        assert!(WebhookUrl::parse("HTTPS://Hooks.Example.com:65535/a?b=c&d=%20").is_ok());
        for shape in [
            "http://[::1]/",
            "http://user:pw@example.com/",
            "http://999.1.1.1/",
            "http://a.1/",
            "http://example.com:65536/",
            "http://example.com/ space",
            "http://example.com/a?b=%L*",
            "http://example.com/%2",
            "http://example.com/%",
        ] {
            assert!(WebhookUrl::parse(shape).is_err(), "{shape}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_WEBHOOK_URL_CHARS));
        assert_eq!(WebhookUrl::parse(&long), Err(InvalidWebhookUrl::TooLong));
    }

    #[test]
    fn secrets_differ_per_key_and_sign_per_the_spec() {
        let (a, b) = (KeyId::new(), KeyId::new());
        let secret = webhook_secret(b"signing", a);
        assert!(secret.starts_with("whsec_"));
        assert_ne!(secret, webhook_secret(b"signing", b));
        assert_eq!(secret, webhook_secret(b"signing", a));
        let signature = sign(&secret, "msg_1", 1_700_000_000, b"{}");
        assert!(signature.starts_with("v1,"));
        assert_ne!(signature, sign(&secret, "msg_1", 1_700_000_001, b"{}"));
    }
}
