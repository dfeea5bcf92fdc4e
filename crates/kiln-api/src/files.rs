//! Capability URLs for result files: `/files/{key}?expires=UNIX&sig=HEX`. Clients download
//! results with a plain GET and no token (as real clients of the hosted API do), so the URL
//! itself is the permission: the key is random, and an HMAC over key and expiry stops anyone
//! from extending a URL's life or pointing it at another file.

use crate::error::ApiError;
use crate::state::{ApiSettings, AppState};
use crate::wire::ErrorBody;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use http_body::{Frame, SizeHint};
use kiln_core::ids::BlobKey;
use kiln_core::report::Chain;
use serde::Deserialize;
use sha2::Sha256;
use std::pin::Pin;
use std::task::{Context, Poll};
use time::OffsetDateTime;

type HmacSha256 = Hmac<Sha256>;

/// The absolute URL that serves `key` until `expires_at` (the request's expiry).
pub(crate) fn file_url(
    settings: &ApiSettings,
    key: &BlobKey,
    expires_at: OffsetDateTime,
) -> String {
    let expires = expires_at.unix_timestamp();
    let sig = hex::encode(
        mac(&settings.signing_key, key.as_str(), expires)
            .finalize()
            .into_bytes(),
    );
    settings.absolute_url(&format!("/files/{key}?expires={expires}&sig={sig}"))
}

fn mac(signing_key: &[u8], key: &str, expires: i64) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(signing_key).expect("HMAC takes a key of any length");
    mac.update(format!("{key}\n{expires}").as_bytes());
    mac
}

/// A file URL's query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct FileGrant {
    /// Unix time after which the URL no longer works.
    expires: i64,
    /// HMAC-SHA256 of the key and `expires`, in hex.
    sig: String,
}

/// Checks a file URL: a forged or altered one is refused (403001), an expired genuine one reads
/// as gone (404001), like the file itself after its request's retention.
fn check_grant(
    signing_key: &[u8],
    key: &str,
    grant: &FileGrant,
    now: OffsetDateTime,
) -> Result<BlobKey, ApiError> {
    let sig = hex::decode(&grant.sig).map_err(|_| ApiError::BadSignature)?;
    // `verify_slice` compares in constant time: timing reveals nothing about the right signature.
    mac(signing_key, key, grant.expires)
        .verify_slice(&sig)
        .map_err(|_| ApiError::BadSignature)?;
    if now.unix_timestamp() >= grant.expires {
        return Err(ApiError::FileNotFound);
    }
    // A key we signed is a valid blob key; this only guards against a signing-key leak.
    BlobKey::try_from(key.to_string()).map_err(|_| ApiError::FileNotFound)
}

/// Download a result file.
#[utoipa::path(
    get,
    path = "/files/{key}",
    tag = "files",
    params(("key" = String, Path, description = "The file's key, as in the result's URL"), FileGrant),
    responses(
        (status = 200, description = "The file, with its content type", content_type = "image/*", body = [u8]),
        (status = 403, description = "Signature missing or wrong (403001)", body = ErrorBody),
        (status = 404, description = "Expired, purged or unknown (404001)", body = ErrorBody),
    )
)]
pub(crate) async fn download(
    State(state): State<AppState>,
    Path(key): Path<String>,
    grant: Result<Query<FileGrant>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(grant) = grant.map_err(|_| ApiError::BadSignature)?;
    let now = OffsetDateTime::now_utc();
    let key = check_grant(&state.settings.signing_key, &key, &grant, now)?;
    // The record goes before its files are deleted: from then on the URL must stop working.
    if !state.jobs.blob_is_live(&key).await? {
        return Err(ApiError::FileNotFound);
    }
    let blob = state
        .blobs
        .open(&key)
        .await?
        .ok_or(ApiError::FileNotFound)?;
    let remaining_s = grant.expires - now.unix_timestamp();
    let cache_control = format!("private, max-age={remaining_s}, immutable");
    let body = BlobBody {
        chunks: Body::from_stream(blob.body),
        length: blob.length,
        key,
    };
    Ok((
        [
            (header::CONTENT_TYPE, blob.content_type),
            (header::CACHE_CONTROL, cache_control),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ],
        Body::new(body),
    )
        .into_response())
}

/// A file's bytes on their way to the client, chunk by chunk as the store yields them, so an
/// API node never holds a whole image. Its exact size (when the store knows it) becomes the
/// Content-Length. A read that fails part-way cuts the connection, which the client sees
/// against that length; hyper drops the error silently, so it is logged here.
struct BlobBody {
    chunks: Body,
    length: Option<u64>,
    key: BlobKey,
}

impl http_body::Body for BlobBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.chunks).poll_frame(cx);
        if let Poll::Ready(Some(Err(error))) = &polled {
            tracing::warn!(error = %Chain(error), blob = %this.key, "a file download was cut short");
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(length) => SizeHint::with_exact(length),
            None => self.chunks.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn settings() -> ApiSettings {
        ApiSettings::with_defaults("https://kiln.test", b"test signing key".to_vec())
    }

    /// Splits a URL made by `file_url` back into key and grant, as the router would.
    fn parse(url: &str) -> (String, FileGrant) {
        let rest = url
            .strip_prefix("https://kiln.test/files/")
            .expect("URL under /files/");
        let (key, query) = rest.split_once('?').unwrap();
        let grant: FileGrant = parse_query(query);
        (key.to_string(), grant)
    }

    fn parse_query(query: &str) -> FileGrant {
        let mut expires = None;
        let mut sig = None;
        for pair in query.split('&') {
            match pair.split_once('=').unwrap() {
                ("expires", v) => expires = Some(v.parse().unwrap()),
                ("sig", v) => sig = Some(v.to_string()),
                other => panic!("unexpected parameter {other:?}"),
            }
        }
        FileGrant {
            expires: expires.unwrap(),
            sig: sig.unwrap(),
        }
    }

    #[test]
    fn a_fresh_url_is_accepted() {
        let s = settings();
        let now = OffsetDateTime::now_utc();
        let key = BlobKey::random("jpeg");
        let (k, grant) = parse(&file_url(&s, &key, now + Duration::hours(1)));
        assert_eq!(check_grant(&s.signing_key, &k, &grant, now).unwrap(), key);
    }

    #[test]
    fn tampering_with_any_part_is_refused() {
        let s = settings();
        let now = OffsetDateTime::now_utc();
        let key = BlobKey::random("jpeg");
        let (k, grant) = parse(&file_url(&s, &key, now + Duration::hours(1)));
        let forbidden = |r: Result<BlobKey, ApiError>| matches!(r, Err(ApiError::BadSignature));

        let longer = FileGrant {
            expires: grant.expires + 3600,
            sig: grant.sig.clone(),
        };
        assert!(forbidden(check_grant(&s.signing_key, &k, &longer, now)));

        let other_key = BlobKey::random("jpeg");
        assert!(forbidden(check_grant(
            &s.signing_key,
            other_key.as_str(),
            &grant,
            now
        )));

        let mut flipped = grant.sig.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        let flipped = FileGrant {
            expires: grant.expires,
            sig: String::from_utf8(flipped).unwrap(),
        };
        assert!(forbidden(check_grant(&s.signing_key, &k, &flipped, now)));

        let garbage = FileGrant {
            expires: grant.expires,
            sig: "not hex".into(),
        };
        assert!(forbidden(check_grant(&s.signing_key, &k, &garbage, now)));

        let truncated = FileGrant {
            expires: grant.expires,
            sig: grant.sig[..32].to_string(),
        };
        assert!(forbidden(check_grant(&s.signing_key, &k, &truncated, now)));

        assert!(forbidden(check_grant(
            b"another server's key",
            &k,
            &grant,
            now
        )));
    }

    #[test]
    fn an_expired_url_reads_as_gone() {
        let s = settings();
        let now = OffsetDateTime::now_utc();
        let key = BlobKey::random("png");
        let (k, grant) = parse(&file_url(&s, &key, now - Duration::seconds(1)));
        assert!(matches!(
            check_grant(&s.signing_key, &k, &grant, now),
            Err(ApiError::FileNotFound)
        ));
    }

    #[test]
    fn urls_are_absolute_under_the_public_url() {
        let mut s = settings();
        s.public_url = "https://kiln.test/".into();
        let url = file_url(&s, &BlobKey::random("png"), OffsetDateTime::now_utc());
        assert!(url.starts_with("https://kiln.test/files/"), "{url}");
    }

    /// A file is sent as the store's chunks, not one buffer, with its exact length.
    #[tokio::test]
    async fn a_file_is_streamed_in_chunks_with_its_length() {
        use kiln_core::blob::{Blob, BlobStore};
        let dir = tempfile::tempdir().unwrap();
        let store = kiln_blob::LocalBlobStore::new(dir.path()).unwrap();
        let key = BlobKey::random("png");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let blob = Blob {
            bytes: bytes.clone(),
            content_type: "image/png".into(),
        };
        store.put(&key, blob).await.unwrap();
        let opened = store.open(&key).await.unwrap().unwrap();
        let mut body = BlobBody {
            chunks: Body::from_stream(opened.body),
            length: opened.length,
            key,
        };
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(3_000_000));
        let mut frames = 0;
        let mut read = Vec::new();
        while let Some(frame) =
            std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx)).await
        {
            let data = frame.unwrap().into_data().unwrap();
            read.extend_from_slice(&data);
            frames += 1;
        }
        assert!(frames > 1, "sent in several chunks, got {frames}");
        assert!(read == bytes, "the chunks are the file, in order");
    }
}
