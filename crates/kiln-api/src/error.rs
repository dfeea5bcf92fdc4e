//! The HTTP layer's one error type, and the one table ([`ApiError::status_and_code`]) that maps
//! each error to an HTTP status and the hosted API's six-digit code.

use crate::inputs::{InputErrors, JsonError, Violation};
use crate::wire::ErrorBody;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_core::blob::BlobError;
use kiln_core::catalog::{Route, UnknownRoute};
use kiln_core::ids::MalformedRequestId;
use kiln_core::report::Chain;
use kiln_core::store::StoreError;

/// What a client is told to wait when the queue is full: long enough for a few jobs to finish.
const QUEUE_FULL_RETRY_AFTER_S: u64 = 10;
/// What a client is told to wait while the server drains: about how long a restart takes.
const DRAINING_RETRY_AFTER_S: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    UnknownModel(#[from] UnknownRoute),
    #[error("no engine is configured for model '{route}' on this server (it serves: {served}); ask the operator to configure one, or use a served model")]
    ModelNotServed { route: Route, served: String },
    #[error(transparent)]
    MalformedRequestId(#[from] MalformedRequestId),
    #[error("missing API token: send the header 'Authorization: Bearer <token>'")]
    MissingToken,
    #[error("invalid or revoked API token")]
    InvalidToken,
    #[error("this file URL's signature is missing or does not match; use the URL exactly as the result gave it")]
    BadSignature,
    /// Unknown, expired and another token's requests all read the same, so that ids cannot be
    /// probed.
    #[error("no such request (unknown, expired, or submitted with another token)")]
    RequestNotFound,
    #[error("no such file (unknown, expired, or deleted)")]
    FileNotFound,
    #[error("no endpoint {method} {path}")]
    NoSuchEndpoint { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// A client too slow to send its body (or one holding the connection open on purpose).
    #[error("the request body did not arrive within {seconds} s of its headers")]
    BodyTimeout { seconds: u64 },
    /// The body is not JSON at all. 422001 rather than 400001 (which names a bad model or id):
    /// like a schema violation, it is the input that must change, and FastAPI-based services
    /// such as the hosted one answer a JSON syntax error with their 422 too.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// A submit's body must be declared JSON: anything else is refused before it is read.
    #[error("the request body must be application/json (got {0})")]
    UnsupportedMediaType(String),
    #[error(transparent)]
    InvalidInput(#[from] InputErrors),
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyConflict,
    #[error("the Idempotency-Key header must be 1 to 255 visible ASCII characters")]
    InvalidIdempotencyKey,
    /// `Prefer: wait=N` with N not a whole number of seconds from 1 to 60 (the value given).
    #[error("Prefer: wait must be 1 to 60 seconds (got '{0}')")]
    InvalidPreferWait(String),
    #[error("too many requests for this API key; retry in {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    #[error("the queue is full ({depth} jobs waiting); retry later")]
    QueueFull { depth: u64 },
    /// One key may not fill the shared queue: its own waiting jobs must run first.
    #[error("this API key already has {queued} jobs waiting, the most one key may queue; retry once some have run")]
    KeyQueueFull { queued: u64 },
    #[error("the server is shutting down; retry shortly")]
    Draining,
    /// Logged with the request id, never shown: the client gets a generic message.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl ApiError {
    /// The table: every error's HTTP status and six-digit code.
    pub(crate) fn status_and_code(&self) -> (StatusCode, u32) {
        use ApiError::*;
        match self {
            UnknownModel(_) | ModelNotServed { .. } | MalformedRequestId(_) => {
                (StatusCode::BAD_REQUEST, 400001)
            }
            MissingToken | InvalidToken => (StatusCode::UNAUTHORIZED, 401001),
            BadSignature => (StatusCode::FORBIDDEN, 403001),
            RequestNotFound | FileNotFound | NoSuchEndpoint { .. } => {
                (StatusCode::NOT_FOUND, 404001)
            }
            MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, 405001),
            BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, 408001),
            BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, 413001),
            UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, 415001),
            // The input is valid; the key's state is what conflicts (RFC 9110's 409: resubmit
            // with a new key).
            IdempotencyConflict => (StatusCode::CONFLICT, 409001),
            MalformedJson(_) | InvalidInput(_) | InvalidIdempotencyKey | InvalidPreferWait(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, 422001)
            }
            RateLimited { .. } | KeyQueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, 429001),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, 500001),
            QueueFull { .. } | Draining => (StatusCode::SERVICE_UNAVAILABLE, 503001),
        }
    }

    /// Seconds for the `Retry-After` header, for the errors that pass with time.
    fn retry_after_s(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_s } => Some(*retry_after_s),
            ApiError::QueueFull { .. } | ApiError::KeyQueueFull { .. } => {
                Some(QUEUE_FULL_RETRY_AFTER_S)
            }
            ApiError::Draining => Some(DRAINING_RETRY_AFTER_S),
            _ => None,
        }
    }

    /// A query parameter at fault: a 422001 whose `detail` names the parameter and its rule,
    /// as a schema violation names an input field.
    pub(crate) fn invalid_query(
        parameter: &str,
        rule: impl Into<String>,
        value: Option<&str>,
    ) -> Self {
        let value = value.map(|v| serde_json::Value::String(v.to_string()));
        ApiError::InvalidInput(InputErrors(vec![Violation::new(
            parameter,
            rule,
            value.as_ref(),
        )]))
    }

    /// The fields at fault, for `detail`.
    fn detail(&self) -> Vec<Violation> {
        match self {
            ApiError::InvalidInput(errors) => errors.0.clone(),
            ApiError::MalformedJson(reason) => vec![Violation::new(
                "body",
                format!("must be valid JSON ({reason})"),
                None,
            )],
            ApiError::IdempotencyConflict => vec![Violation::new(
                "Idempotency-Key",
                "already used with a different model or input; send a new key for a new request",
                None,
            )],
            ApiError::UnsupportedMediaType(_) => vec![Violation::new(
                "Content-Type",
                "must be application/json",
                None,
            )],
            ApiError::InvalidIdempotencyKey => {
                vec![Violation::new(
                    "Idempotency-Key",
                    "must be 1 to 255 visible ASCII characters",
                    None,
                )]
            }
            ApiError::InvalidPreferWait(value) => vec![Violation::new(
                "Prefer",
                "wait must be 1..=60 seconds",
                Some(&serde_json::Value::String(format!("wait={value}"))),
            )],
            _ => Vec::new(),
        }
    }

    /// The body a client sees. A 500 says nothing of the cause: the log has it.
    pub(crate) fn body(&self) -> ErrorBody {
        let (_, code) = self.status_and_code();
        let error_message = match self {
            ApiError::Internal(_) => {
                "internal error; the server log has the details under this response's x-request-id"
                    .to_string()
            }
            other => other.to_string(),
        };
        ErrorBody {
            error_code: code,
            error_message,
            detail: self.detail(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self {
            // Runs inside the request's trace span, which carries its x-request-id.
            tracing::error!(error = %Chain(cause.as_ref()), "request failed");
        }
        let (status, _) = self.status_and_code();
        let mut response = (status, Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after_s() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, ApiError::MissingToken | ApiError::InvalidToken) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::QueueFull { depth } => ApiError::QueueFull { depth },
            StoreError::OwnerQueueFull { queued } => ApiError::KeyQueueFull { queued },
            StoreError::IdempotencyConflict => ApiError::IdempotencyConflict,
            // The rest cannot come from what the HTTP layer calls; if one does, it is a bug.
            other @ (StoreError::Backend { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Closed
            | StoreError::LeaseLost(_)
            | StoreError::NoSuchKey(_)
            | StoreError::DuplicateKeyName(_)) => ApiError::Internal(Box::new(other)),
        }
    }
}

impl From<JsonError> for ApiError {
    fn from(error: JsonError) -> Self {
        match error {
            JsonError::Syntax(reason) => ApiError::MalformedJson(reason),
            JsonError::DuplicateKey(path) => {
                ApiError::InvalidInput(InputErrors(vec![Violation::new(
                    path,
                    "is given more than once; give each field once",
                    None,
                )]))
            }
        }
    }
}

impl From<BlobError> for ApiError {
    fn from(error: BlobError) -> Self {
        ApiError::Internal(Box::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_error() -> Vec<ApiError> {
        vec![
            "nope".parse::<Route>().unwrap_err().into(),
            ApiError::ModelNotServed {
                route: Route::Flux2FlexTextToImage,
                served: "x".into(),
            },
            "123"
                .parse::<kiln_core::ids::RequestId>()
                .unwrap_err()
                .into(),
            ApiError::MissingToken,
            ApiError::InvalidToken,
            ApiError::BadSignature,
            ApiError::RequestNotFound,
            ApiError::FileNotFound,
            ApiError::NoSuchEndpoint {
                method: "GET".into(),
                path: "/x".into(),
            },
            ApiError::MethodNotAllowed {
                method: "PUT".into(),
                path: "/x".into(),
            },
            ApiError::BodyTooLarge { limit: 10 },
            ApiError::BodyTimeout { seconds: 30 },
            ApiError::MalformedJson("eof".into()),
            InputErrors(vec![Violation::new("seed", "must be an integer", None)]).into(),
            ApiError::IdempotencyConflict,
            ApiError::InvalidIdempotencyKey,
            ApiError::InvalidPreferWait("61".into()),
            ApiError::RateLimited { retry_after_s: 3 },
            ApiError::QueueFull { depth: 5 },
            ApiError::KeyQueueFull { queued: 5 },
            ApiError::UnsupportedMediaType("text/plain".into()),
            ApiError::Draining,
            ApiError::Internal("disk on fire at /var/lib/kiln".into()),
        ]
    }

    #[test]
    fn every_code_starts_with_its_http_status() {
        for error in every_error() {
            let (status, code) = error.status_and_code();
            assert_eq!(code / 1000, u32::from(status.as_u16()), "{error:?}");
            assert_eq!(code % 1000, 1, "{error:?}");
        }
    }

    #[test]
    fn the_table_follows_the_contract() {
        let code = |e: ApiError| e.status_and_code().1;
        assert_eq!(code(ApiError::MissingToken), 401001);
        assert_eq!(code(ApiError::RequestNotFound), 404001);
        assert_eq!(code(ApiError::BodyTooLarge { limit: 1 }), 413001);
        assert_eq!(code(ApiError::BodyTimeout { seconds: 1 }), 408001);
        assert_eq!(code(ApiError::RateLimited { retry_after_s: 1 }), 429001);
        assert_eq!(code(StoreError::QueueFull { depth: 1 }.into()), 503001);
        assert_eq!(code(StoreError::IdempotencyConflict.into()), 409001);
        let io = || std::io::Error::other("x");
        assert_eq!(code(StoreError::backend("sqlite", io()).into()), 500001);
        assert_eq!(
            code(BlobError::backend("s3", "reading", io()).into()),
            500001
        );
        assert_eq!(code(ApiError::Draining), 503001);
        assert_eq!(code(ApiError::BadSignature), 403001);
        assert_eq!(code("x".parse::<Route>().unwrap_err().into()), 400001);
    }

    #[test]
    fn waiting_errors_carry_retry_after_and_others_do_not() {
        for error in every_error() {
            let (status, _) = error.status_and_code();
            let expects = matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            );
            let response = error.into_response();
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                expects,
                "{status}"
            );
        }
        let response = ApiError::RateLimited { retry_after_s: 7 }.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }

    #[test]
    fn internal_errors_leak_nothing() {
        let body = ApiError::Internal("disk on fire at /var/lib/kiln".into()).body();
        assert_eq!(body.error_code, 500001);
        assert!(
            !body.error_message.contains("disk"),
            "{}",
            body.error_message
        );
        assert!(
            !body.error_message.contains("/var"),
            "{}",
            body.error_message
        );
        assert!(body.detail.is_empty());
        let cause = std::io::Error::other("SQLITE_CORRUPT in jobs.db");
        let body = ApiError::from(StoreError::backend("sqlite", cause)).body();
        assert!(
            !body.error_message.contains("SQLITE"),
            "{}",
            body.error_message
        );
    }

    #[test]
    fn schema_violations_list_each_field() {
        let errors = InputErrors(vec![
            Violation::new("seed", "must be an integer", Some(&serde_json::json!("5"))),
            Violation::new("raw", "must be true or false", Some(&serde_json::json!(1))),
        ]);
        let body = ApiError::from(errors).body();
        assert_eq!(body.error_code, 422001);
        assert_eq!(body.detail.len(), 2);
        assert_eq!(body.detail[0].field, "seed");
        assert_eq!(body.detail[0].value, Some(serde_json::json!("5")));
        let conflict = ApiError::IdempotencyConflict.body();
        assert_eq!(conflict.detail[0].field, "Idempotency-Key");
    }
}
