//! The OpenAPI document at `/openapi.json`, generated from the handlers' `#[utoipa::path]`
//! annotations and the wire types, then completed as JSON with what depends on the server's
//! settings (its URL, the models it serves, the prompt limit) and what every operation shares.

use crate::inputs;
use crate::state::ApiSettings;
use crate::{files, listing, models, ops, requests, stream, webhooks};
use kiln_core::catalog::Route;
use serde_json::{json, Map, Value};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::OpenApi as Document;
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln",
        description = "A self-hosted image-generation API for FLUX models, speaking the hosted Model API's protocol: submit a request to a model, poll its status and result, download the images."
    ),
    paths(
        models::submit,
        models::list,
        models::schema,
        listing::list_requests,
        requests::status,
        stream::status_stream,
        requests::result,
        requests::cancel,
        webhooks::secret,
        files::download,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::openapi_json,
    ),
    // Sent, not answered: no path names the webhook message, so it is listed here.
    components(schemas(crate::wire::WebhookMessage, crate::wire::WaitedResponse)),
    modifiers(&BearerToken)
)]
struct ApiDoc;

/// The document this server publishes: its public URL as the server, and submit operations
/// only for the models it serves (the catalog and every model's schema stay documented: they
/// answer for every model).
pub(crate) fn document(settings: &ApiSettings) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
    doc["servers"] = json!([{"url": settings.public_url.trim_end_matches('/')}]);
    one_path_per_model(&mut doc, settings);
    ops::document_metrics(&mut doc, settings);
    declare_common_answers(&mut doc);
    document_live_requests(&mut doc);
    doc
}

/// What utoipa's attributes cannot say: the webhook URL's exact shape (the pattern the server
/// checks, kept in one place) on every submit, and the status stream's items as the events they
/// are (`id` and `data`, the data a JSON status object), not as one JSON body.
fn document_live_requests(doc: &mut Value) {
    let paths = doc["paths"]
        .as_object_mut()
        .expect("the document has paths");
    for (path, item) in paths.iter_mut() {
        if !path.starts_with("/v1/models/") {
            continue;
        }
        // `get_mut`, not indexing: indexing a missing key would add an empty `post` operation.
        let parameters = item
            .get_mut("post")
            .and_then(|post| post.get_mut("parameters"))
            .and_then(Value::as_array_mut);
        for parameter in parameters.into_iter().flatten() {
            if parameter["name"] == "webhook" && parameter["in"] == "query" {
                parameter["schema"]["pattern"] = json!(kiln_core::webhook::WEBHOOK_URL_PATTERN);
            }
        }
    }
    let stream = paths
        .get_mut("/v1/requests/{request_id}/status/stream")
        .and_then(|item| item.pointer_mut("/get/responses/200/content/text~1event-stream"));
    if let Some(stream) = stream {
        stream["schema"] = json!({
            "type": "object",
            "required": ["id", "data"],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "event": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/StatusResponse"},
                },
            },
        });
    }
}

/// The `bearer` scheme the authenticated operations name.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, api: &mut Document) {
        api.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

const SUBMIT_TEMPLATE: &str = "/v1/models/{model_id}";
const SCHEMA_TEMPLATE: &str = "/v1/models/{model_id}/schema";

/// Model ids contain slashes, which an OpenAPI path parameter cannot; and each model takes its
/// own input. So the handlers' `{model_id}` operations become one concrete path per model, the
/// submit carrying that model's input schema.
fn one_path_per_model(doc: &mut Value, settings: &ApiSettings) {
    let paths = doc["paths"]
        .as_object_mut()
        .expect("the document has paths");
    let mut submit = paths
        .remove(SUBMIT_TEMPLATE)
        .map(|mut item| item["post"].take())
        .expect("submit is documented");
    document_waited_answer(&mut submit);
    let mut schema = paths
        .remove(SCHEMA_TEMPLATE)
        .map(|mut item| item["get"].take())
        .expect("schema is documented");
    for template in [&mut submit, &mut schema] {
        let parameters = template["parameters"].as_array_mut();
        if let Some(parameters) = parameters {
            parameters.retain(|p| p["name"] != "model_id");
        }
    }
    let mut inputs = Map::new();
    for route in Route::ALL {
        let slug: String = route
            .id()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let mut get = schema.clone();
        get["operationId"] = json!(format!("schema_{slug}"));
        get["summary"] = json!(format!("The input and output schemas of {}", route.title()));
        paths.insert(
            format!("/v1/models/{}/schema", route.id()),
            json!({ "get": get }),
        );
        if !settings.served_routes.contains(&route) {
            continue;
        }
        let name = inputs::schema_name(route);
        let mut post = submit.clone();
        post["operationId"] = json!(format!("submit_{slug}"));
        post["summary"] = json!(format!("Submit a {} request", route.title()));
        post["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}},
        });
        paths.insert(
            format!("/v1/models/{}", route.id()),
            json!({ "post": post }),
        );
        inputs.insert(name, inputs::input_schema(route, settings.max_prompt_chars));
    }
    let schemas = &mut doc["components"]["schemas"];
    for (name, input) in inputs {
        schemas[name] = input;
    }
}

/// A submit's 200 is one of two bodies (`Prefer: wait`), which the annotation cannot say.
fn document_waited_answer(submit: &mut Value) {
    submit["responses"]["200"]["content"]["application/json"]["schema"] = json!({"oneOf": [
        {"$ref": "#/components/schemas/SubmitResponse"},
        {"$ref": "#/components/schemas/WaitedResponse"},
    ]});
    submit["responses"]["200"]["headers"]["Preference-Applied"] = json!({
        "description": "`wait=N` when a `Prefer: wait=N` was honoured",
        "schema": {"type": "string"},
    });
}

/// What any operation may answer besides its own outcomes, declared on each: every answer's
/// `x-request-id`; `Retry-After` on 429 and 503; 405 (with `Allow`) and 500 anywhere; 413
/// wherever a body is taken.
fn declare_common_answers(doc: &mut Value) {
    let error = json!({"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}});
    let request_id = json!({
        "description": "This request's id, a UUID the server makes (a client's own x-request-id is not echoed); the server log names it",
        "required": true,
        "schema": {"type": "string"},
    });
    let retry_after = json!({
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1},
    });
    let allow = json!({
        "description": "The methods this path takes",
        "schema": {"type": "string"},
    });
    let paths = doc["paths"]
        .as_object_mut()
        .expect("the document has paths");
    for operation in paths
        .values_mut()
        .flat_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
    {
        let takes_body = operation.get("requestBody").is_some();
        let responses = &mut operation["responses"];
        responses["405"] = json!({
            "description": "Method not allowed on this path (405001); `Allow` lists the methods it takes",
            "headers": {"Allow": allow},
            "content": error,
        });
        responses["500"] = json!({
            "description": "Internal error (500001); the message names only the request id",
            "content": error,
        });
        if takes_body {
            responses["413"] = json!({"description": "Body too large (413001)", "content": error});
        }
        for (status, response) in responses.as_object_mut().into_iter().flatten() {
            let headers = &mut response["headers"];
            headers["x-request-id"] = request_id.clone();
            if status == "429" || status == "503" {
                headers["Retry-After"] = retry_after.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_its_own_id() {
        let settings = ApiSettings::with_defaults("http://kiln.test", b"key".to_vec());
        let doc = document(&settings);
        let mut ids: Vec<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .values()
            .flat_map(|item| item.as_object().expect("a path item").values())
            .map(|operation| operation["operationId"].as_str().expect("an id"))
            .collect();
        let count = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), count, "operation ids repeat: {ids:?}");
    }
}
