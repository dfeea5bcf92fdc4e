//! The setting `store.url`: which queue and record store a node uses.
//!
//! `sqlite://PATH` serves one machine (API and workers share the file); `postgres://…` serves
//! many (every API node and worker points at the same database). Parsed once at load, so a
//! mistyped URL stops the start with the setting's name instead of failing at first use.

use std::fmt;
use std::path::PathBuf;

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file (created with its directory when missing).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL, handed to the driver as written (it may carry a password
    /// and query options such as `sslmode`).
    Postgres(url::Url),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreUrlError {
    #[error(
        "store.url must be sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (got '{0}')"
    )]
    Scheme(String),
    #[error("store.url: sqlite:// needs a file path, e.g. sqlite:///var/lib/kiln/kiln.db")]
    NoPath,
    #[error("store.url is not a valid PostgreSQL URL: {reason}")]
    Postgres {
        reason: String,
        #[source]
        source: Option<url::ParseError>,
    },
}

impl StoreLocation {
    pub fn parse(text: &str) -> Result<Self, StoreUrlError> {
        if let Some(path) = text.strip_prefix("sqlite://") {
            return match path {
                "" => Err(StoreUrlError::NoPath),
                path => Ok(StoreLocation::Sqlite(PathBuf::from(path))),
            };
        }
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            // The text is not shown whole: it may be a URL with a password in it.
            return Err(StoreUrlError::Scheme(scheme_of(text)));
        }
        let url = url::Url::parse(text).map_err(|e| StoreUrlError::Postgres {
            reason: e.to_string(),
            source: Some(e),
        })?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(StoreUrlError::Postgres {
                reason: "it names no host".into(),
                source: None,
            });
        }
        Ok(StoreLocation::Postgres(url))
    }

    /// The backend's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreLocation::Sqlite(_) => "sqlite",
            StoreLocation::Postgres(_) => "postgres",
        }
    }
}

/// What to show of a URL that is not one kiln takes: its scheme only.
fn scheme_of(text: &str) -> String {
    match text.split_once("://") {
        Some((scheme, _)) => format!("{scheme}://…"),
        None => text.chars().take(16).collect(),
    }
}

/// Written for logs and `kiln config`: a PostgreSQL password is replaced by `<redacted>`.
impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreLocation::Postgres(url) => write!(f, "{}", redact_password(url)),
        }
    }
}

/// `url` with its password, if any, replaced.
pub fn redact_password(url: &url::Url) -> url::Url {
    let mut shown = url.clone();
    if shown.password().is_some() {
        // Only fails for URLs that cannot have credentials, which one with a password can.
        let _ = shown.set_password(Some("<redacted>"));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_and_postgres_urls_are_read() {
        assert_eq!(
            StoreLocation::parse("sqlite:///var/lib/kiln/kiln.db").unwrap(),
            StoreLocation::Sqlite(PathBuf::from("/var/lib/kiln/kiln.db"))
        );
        assert_eq!(
            StoreLocation::parse("sqlite://data/kiln.db").unwrap(),
            StoreLocation::Sqlite(PathBuf::from("data/kiln.db")),
            "a relative path is relative to the working directory"
        );
        let pg = StoreLocation::parse("postgres://kiln:s3cret@db.internal:5433/kiln").unwrap();
        assert_eq!(pg.kind(), "postgres");
        assert_eq!(
            pg.to_string(),
            "postgres://kiln:%3Credacted%3E@db.internal:5433/kiln"
        );
        assert!(StoreLocation::parse("postgresql://db/kiln?sslmode=require").is_ok());
    }

    #[test]
    fn a_bad_url_names_the_setting_and_hides_what_may_be_a_password() {
        for (text, expected) in [
            (
                "mysql://root:hunter2@db/kiln",
                "store.url must be sqlite://",
            ),
            ("kiln.db", "store.url must be sqlite://"),
            ("sqlite://", "sqlite:// needs a file path"),
            ("postgres://", "store.url is not a valid PostgreSQL URL"),
            (
                "postgres://:hunter2@/kiln",
                "store.url is not a valid PostgreSQL URL",
            ),
        ] {
            let error = StoreLocation::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(!error.contains("hunter2"), "{text}: {error}");
        }
    }
}
