//! `GET /v1/requests`: the token's own requests, newest first, a page at a time (for galleries),
//! each with the input that makes it again.
//!
//! The cursor (`next`, sent back as `before`) is the decimal of the store's [`JobCursor`]: a
//! job's place in submission order, so a page boundary never moves as new requests arrive.
//! Clients treat it as opaque; any value is safe to accept, as the listing is the caller's own.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::files::file_url;
use crate::inputs::{render_input, InputErrors, Violation};
use crate::requests::result_response;
use crate::state::{ApiSettings, AppState};
use crate::wire::{ErrorBody, ListedRequest, RequestList};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use kiln_core::job::Job;
use kiln_core::store::JobCursor;
use serde::Deserialize;
use serde_json::Value;

/// A page's size unless `limit` says, and the most it may say.
const DEFAULT_LIMIT: u32 = 20;
const MAX_LIMIT: u32 = 100;
/// A cursor is 1 to this many decimal digits: every one the server hands out (an `i64`
/// position), and every string it takes as one. The OpenAPI document says `^[0-9]{1,19}$` of
/// both `before` and `next` (a test holds them to it).
const CURSOR_MAX_DIGITS: usize = 19;

/// The listing's query as sent. Parameters it does not name are ignored.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListingQuery {
    /// The most requests one page holds.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100, default = 20)]
    limit: Option<String>,
    /// Lists the requests older than this: a previous page's `next`, as it was given. Without
    /// it, the page starts at the newest request.
    #[param(pattern = "^[0-9]{1,19}$")]
    before: Option<String>,
}

/// A page asked for, valid by construction.
#[derive(Debug, PartialEq)]
struct Listing {
    limit: u32,
    before: Option<JobCursor>,
}

impl ListingQuery {
    /// Both parameters checked, each violation named in one 422001.
    fn parse(self) -> Result<Listing, ApiError> {
        let mut violations = Vec::new();
        let mut violate = |field: &str, rule: &str, raw: &str| {
            let value = Value::String(raw.to_string());
            violations.push(Violation::new(field, rule, Some(&value)));
        };
        let limit = match self.limit.as_deref() {
            None => Some(DEFAULT_LIMIT),
            Some(raw) => {
                let limit = parse_limit(raw);
                if limit.is_none() {
                    violate("limit", "must be an integer from 1 to 100", raw);
                }
                limit
            }
        };
        let before = self.before.as_deref().map(|raw| {
            let cursor = parse_cursor(raw);
            if cursor.is_none() {
                let rule =
                    "must be the `next` of an earlier page, as it was given (1 to 19 digits)";
                violate("before", rule, raw);
            }
            cursor
        });
        match limit {
            Some(limit) if violations.is_empty() => Ok(Listing {
                limit,
                before: before.flatten(),
            }),
            _ => Err(ApiError::InvalidInput(InputErrors(violations))),
        }
    }
}

fn all_digits(raw: &str) -> bool {
    !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit())
}

/// 1..=[`MAX_LIMIT`], in decimal digits only (no sign, no fraction).
fn parse_limit(raw: &str) -> Option<u32> {
    all_digits(raw)
        .then(|| raw.parse::<u32>().ok())
        .flatten()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
}

/// 1 to [`CURSOR_MAX_DIGITS`] decimal digits. A position past every job's (beyond `i64`) lists from the
/// newest, as no cursor would: every string of the pattern is a cursor.
fn parse_cursor(raw: &str) -> Option<JobCursor> {
    if !all_digits(raw) || raw.len() > CURSOR_MAX_DIGITS {
        return None;
    }
    let position: u64 = raw.parse().ok()?;
    Some(JobCursor::new(i64::try_from(position).unwrap_or(i64::MAX)))
}

fn encode_cursor(cursor: JobCursor) -> String {
    cursor.position().to_string()
}

/// The token's own requests, newest first: each with its model, the input that makes it again,
/// its status and times, and its images once it has succeeded. Expired requests are not listed.
#[utoipa::path(
    get,
    path = "/v1/requests",
    tag = "requests",
    params(ListingQuery),
    responses(
        (status = 200, body = RequestList),
        (status = 401, description = "Missing or invalid token (401001)", body = ErrorBody),
        (status = 422, description = "`limit` is not an integer from 1 to 100, or `before` is not a cursor (422001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_requests(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListingQuery>, QueryRejection>,
) -> Result<Json<RequestList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid_query("query", e.body_text(), None))?;
    let listing = query.parse()?;
    let page = state
        .jobs
        .list_jobs(caller.id, listing.before, listing.limit)
        .await?;
    let requests = page
        .jobs
        .into_iter()
        .map(|job| listed_request(&state.settings, job))
        .collect();
    Ok(Json(RequestList {
        requests,
        next: page.next.map(encode_cursor),
    }))
}

/// One request as the listing shows it: the result object's status, times, output and error,
/// with the model and the input.
fn listed_request(settings: &ApiSettings, job: Job) -> ListedRequest {
    let (id, model) = (job.id, job.route.id());
    let (input, input_omitted) = listed_input(settings, &job);
    let result = result_response(settings, job, None);
    ListedRequest {
        request_id: result.request_id,
        model,
        status: result.status,
        created_at: result.created_at,
        finished_at: result.finished_at,
        input,
        input_omitted,
        output: result.output,
        error: result.error,
        status_url: settings.request_url(id, "status"),
        result_url: settings.request_url(id, "result"),
    }
}

/// The job's input as its model takes it, and the paths of the images it leaves out. An edit's
/// image sent as a URL is that URL. One sent as a `data:` URI was stored for the job, and is
/// kept only until the job ends (the worker deletes it then): while the request waits or runs
/// the input gives the stored copy's signed file URL; after, it leaves the image out (its bytes
/// are gone) and names it (`image_urls[i]`, its place in the request as sent).
fn listed_input(settings: &ApiSettings, job: &Job) -> (Value, Vec<String>) {
    let stored_copy_kept = !job.state().is_terminal();
    let mut omitted = Vec::new();
    let mut index = 0;
    let input = render_input(job.route, &job.params, |source| {
        let place = index;
        index += 1;
        match source.stored_key() {
            None => Some(source.as_str().to_string()),
            Some(key) if stored_copy_kept => Some(file_url(settings, &key, job.expires_at)),
            Some(_) => {
                omitted.push(format!("image_urls[{place}]"));
                None
            }
        }
    });
    (input, omitted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn query(limit: Option<&str>, before: Option<&str>) -> Result<Listing, Vec<Violation>> {
        let query = ListingQuery {
            limit: limit.map(str::to_string),
            before: before.map(str::to_string),
        };
        query.parse().map_err(|e| match e {
            ApiError::InvalidInput(InputErrors(violations)) => violations,
            other => panic!("not a 422: {other:?}"),
        })
    }

    #[test]
    fn limits_are_1_to_100_defaulting_to_20() {
        let limit = |raw| query(raw, None).map(|listing| listing.limit);
        assert_eq!(limit(None), Ok(20));
        assert_eq!(limit(Some("1")), Ok(1));
        assert_eq!(limit(Some("100")), Ok(100));
        assert_eq!(limit(Some("007")), Ok(7));
        for bad in [
            "0",
            "101",
            "abc",
            "",
            "-1",
            "+5",
            "1.0",
            "1e2",
            "99999999999",
        ] {
            let violations = limit(Some(bad)).unwrap_err();
            assert_eq!(violations.len(), 1, "{bad}");
            assert_eq!(violations[0].field, "limit");
            assert_eq!(violations[0].rule, "must be an integer from 1 to 100");
        }
    }

    #[test]
    fn cursors_are_what_the_pattern_says() {
        let before = |raw| query(None, Some(raw)).map(|listing| listing.before);
        assert_eq!(before("42"), Ok(Some(JobCursor::new(42))));
        assert_eq!(before("0"), Ok(Some(JobCursor::new(0))));
        assert_eq!(
            before("9999999999999999999"),
            Ok(Some(JobCursor::new(i64::MAX))),
            "19 digits past i64 list from the newest"
        );
        for bad in ["", "abc", "-1", "+1", "1.5", "12345678901234567890", "MTIz"] {
            let violations = before(bad).unwrap_err();
            assert_eq!(violations.len(), 1, "{bad}");
            assert_eq!(violations[0].field, "before");
        }
        let encoded = encode_cursor(JobCursor::new(i64::MAX));
        assert_eq!(before(&encoded), Ok(Some(JobCursor::new(i64::MAX))));
    }

    #[test]
    fn the_document_states_the_rules_the_parser_applies() {
        let settings = ApiSettings::with_defaults("http://kiln.test", b"key".to_vec());
        let doc = crate::openapi::document(&settings);
        let parameters = doc["paths"]["/v1/requests"]["get"]["parameters"].clone();
        let schema = |name: &str| {
            let parameters = parameters.as_array().expect("parameters");
            let parameter = parameters.iter().find(|p| p["name"] == name);
            parameter.expect("documented")["schema"].clone()
        };
        let limit = schema("limit");
        assert_eq!(
            (&limit["type"], &limit["minimum"], &limit["maximum"]),
            (&json!("integer"), &json!(1), &json!(MAX_LIMIT))
        );
        assert_eq!(limit["default"], json!(DEFAULT_LIMIT));
        let pattern = format!("^[0-9]{{1,{CURSOR_MAX_DIGITS}}}$");
        assert_eq!(schema("before")["pattern"], json!(pattern));
        let next = &doc["components"]["schemas"]["RequestList"]["properties"]["next"];
        assert_eq!(
            next["pattern"],
            json!(pattern),
            "what is handed out is what is taken"
        );
    }

    #[test]
    fn both_parameters_wrong_are_both_named() {
        let violations = query(Some("0"), Some("x")).unwrap_err();
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["limit", "before"]);
    }
}
