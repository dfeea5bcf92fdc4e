//! Where the blobs live, as the operator writes it in the setting `blobs.url`, and opening the
//! store it names.

use crate::{LocalBlobStore, S3BlobStore};
use kiln_core::blob::{BlobError, BlobStore};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

/// A parsed `blobs.url`: valid by construction, so [`open`] only fails on the store itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobLocation {
    /// `file:///ABSOLUTE/DIR`: a directory on this machine.
    Directory(PathBuf),
    /// `s3://BUCKET[/PREFIX]`: objects under `PREFIX/` in an S3-compatible bucket; endpoint,
    /// region and credentials come from the standard `AWS_*` environment variables.
    S3 {
        bucket: String,
        prefix: Option<String>,
    },
}

const ACCEPTED: &str = "file:///ABSOLUTE/DIR or s3://BUCKET[/PREFIX]";

/// A `blobs.url` kiln cannot use.
#[derive(Debug, thiserror::Error)]
#[error("blobs.url {url:?} is not a blob location ({reason}); expected {ACCEPTED}")]
pub struct InvalidBlobLocation {
    pub url: String,
    pub reason: &'static str,
}

impl FromStr for BlobLocation {
    type Err = InvalidBlobLocation;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidBlobLocation {
            url: url.to_string(),
            reason,
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            parse_s3(rest).map_err(invalid)
        } else if url.starts_with("file:") {
            parse_file(url).map_err(invalid)
        } else {
            Err(invalid("unknown scheme"))
        }
    }
}

fn parse_file(url: &str) -> Result<BlobLocation, &'static str> {
    let parsed = url::Url::parse(url).map_err(|_| "not a URL")?;
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("a file URL takes no query or fragment");
    }
    // `to_file_path` refuses a host (`file://relative/dir` names the host `relative`) and
    // decodes percent-escapes, so what remains is an absolute path.
    let path = parsed
        .to_file_path()
        .map_err(|()| "a file URL needs an absolute path: file:///DIR")?;
    Ok(BlobLocation::Directory(path))
}

fn parse_s3(rest: &str) -> Result<BlobLocation, &'static str> {
    let (bucket, prefix) = match rest.split_once('/') {
        Some((bucket, prefix)) => (bucket, prefix.trim_end_matches('/')),
        None => (rest, ""),
    };
    check_bucket(bucket)?;
    let prefix = if prefix.is_empty() {
        None
    } else {
        check_prefix(prefix)?;
        Some(prefix.to_string())
    };
    Ok(BlobLocation::S3 {
        bucket: bucket.to_string(),
        prefix,
    })
}

/// S3's bucket naming rules: 3 to 63 lowercase letters, digits, dots and hyphens, beginning
/// and ending with a letter or digit. A compatible service may allow more, but a name that
/// breaks these is far more often a typo than a MinIO quirk.
fn check_bucket(bucket: &str) -> Result<(), &'static str> {
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && edge_ok(bucket.as_bytes().first())
        && edge_ok(bucket.as_bytes().last());
    if ok {
        Ok(())
    } else {
        Err("a bucket name is 3 to 63 of a-z, 0-9, '.', '-', starting and ending with a letter or digit")
    }
}

/// A prefix is `/`-separated segments of the characters S3 calls safe in keys, none of them
/// empty, `.` or `..`: what is written is exactly where the objects land.
fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!-_.*'()".contains(&b))
    };
    if prefix.split('/').all(segment_ok) {
        Ok(())
    } else {
        Err("a prefix is '/'-separated segments of a-z, A-Z, 0-9 and !-_.*'(), none empty, '.' or '..'")
    }
}

impl fmt::Display for BlobLocation {
    /// The location as `blobs.url` spells it, for the startup summary (it holds no secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobLocation::Directory(dir) => write!(f, "file://{}", dir.display()),
            BlobLocation::S3 {
                bucket,
                prefix: None,
            } => write!(f, "s3://{bucket}"),
            BlobLocation::S3 {
                bucket,
                prefix: Some(prefix),
            } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// The store `location` names: the directory (created if missing) or the bucket, configured
/// from the `AWS_*` environment variables ([`S3BlobStore::from_env`]). Sends no request; call
/// [`BlobStore::ping`] to check the store answers.
pub fn open(location: &BlobLocation) -> Result<Arc<dyn BlobStore>, BlobError> {
    Ok(match location {
        BlobLocation::Directory(dir) => Arc::new(LocalBlobStore::new(dir)?),
        BlobLocation::S3 { bucket, prefix } => {
            Arc::new(S3BlobStore::from_env(bucket, prefix.as_deref())?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<BlobLocation, InvalidBlobLocation> {
        url.parse()
    }

    #[test]
    fn a_file_url_names_an_absolute_directory() {
        assert_eq!(
            parse("file:///var/lib/kiln/blobs").unwrap(),
            BlobLocation::Directory("/var/lib/kiln/blobs".into())
        );
        assert_eq!(
            parse("file:///srv/my%20blobs/").unwrap(),
            BlobLocation::Directory("/srv/my blobs/".into())
        );
        assert_eq!(
            parse("file://localhost/srv/blobs").unwrap(),
            BlobLocation::Directory("/srv/blobs".into())
        );
    }

    #[test]
    fn an_s3_url_names_a_bucket_and_an_optional_prefix() {
        let s3 = |bucket: &str, prefix: Option<&str>| BlobLocation::S3 {
            bucket: bucket.into(),
            prefix: prefix.map(Into::into),
        };
        assert_eq!(
            parse("s3://kiln-results").unwrap(),
            s3("kiln-results", None)
        );
        assert_eq!(
            parse("s3://kiln-results/").unwrap(),
            s3("kiln-results", None)
        );
        assert_eq!(
            parse("s3://kiln.results/prod/images/").unwrap(),
            s3("kiln.results", Some("prod/images"))
        );
    }

    #[test]
    fn display_writes_the_url_back() {
        for url in [
            "s3://kiln-results",
            "s3://kiln-results/prod/a",
            "file:///srv/blobs",
        ] {
            assert_eq!(parse(url).unwrap().to_string(), url);
        }
    }

    #[test]
    fn anything_else_is_refused_naming_the_setting_and_the_accepted_forms() {
        let refused = [
            ("/var/lib/kiln/blobs", "unknown scheme"),
            ("blobs", "unknown scheme"),
            ("gs://bucket", "unknown scheme"),
            ("S3://bucket", "unknown scheme"),
            ("file://relative/dir", "absolute path"),
            ("file:///srv/blobs?mode=fast", "no query"),
            ("s3://", "bucket name"),
            ("s3://ab", "bucket name"),
            ("s3://Kiln-Results", "bucket name"),
            ("s3://kiln_results", "bucket name"),
            ("s3://-kiln", "bucket name"),
            ("s3://kiln-results/a//b", "prefix"),
            ("s3://kiln-results/a/../b", "prefix"),
            ("s3://kiln-results/a b", "prefix"),
            ("s3://kiln-results/a?x=1", "prefix"),
        ];
        for (url, reason) in refused {
            let message = parse(url).expect_err(url).to_string();
            assert!(message.contains("blobs.url"), "{message}");
            assert!(message.contains(ACCEPTED), "{message}");
            assert!(message.contains(reason), "{url}: {message}");
        }
    }

    #[tokio::test]
    async fn open_makes_the_directory_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        let location = parse(&format!("file://{}", blobs.display())).unwrap();
        let store = open(&location).unwrap();
        assert!(blobs.is_dir());
        store.ping().await.unwrap();
    }
}
