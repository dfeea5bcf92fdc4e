//! The OpenAPI document at `/openapi.json`, generated from the handlers' `#[utoipa::path]`
//! annotations and the wire types.

use crate::inputs;
use crate::{files, models, ops, requests};
use kiln_core::catalog::Route;
use utoipa::openapi::path::{HttpMethod, Operation, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, Required};
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
        requests::status,
        requests::result,
        requests::cancel,
        files::download,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::openapi_json,
    ),
    modifiers(&BearerToken, &OnePathPerModel)
)]
struct ApiDoc;

pub(crate) fn document() -> Document {
    ApiDoc::openapi()
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

/// Model ids contain slashes, which an OpenAPI path parameter cannot; and each model takes its
/// own input. So the handlers' `{model_id}` operations become one concrete path per model, the
/// submit carrying that model's input schema.
struct OnePathPerModel;

const SUBMIT_TEMPLATE: &str = "/v1/models/{model_id}";
const SCHEMA_TEMPLATE: &str = "/v1/models/{model_id}/schema";

impl Modify for OnePathPerModel {
    fn modify(&self, api: &mut Document) {
        let paths = &mut api.paths.paths;
        let submit = paths
            .remove(SUBMIT_TEMPLATE)
            .and_then(|item| item.post)
            .expect("submit is documented");
        let schema = paths
            .remove(SCHEMA_TEMPLATE)
            .and_then(|item| item.get)
            .expect("schema is documented");
        let components = api.components.get_or_insert_with(Default::default);
        for route in Route::ALL {
            let slug: String = route
                .id()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();

            let mut submit = for_model(&submit, format!("submit_{slug}"));
            submit.summary = Some(format!("Submit a {} request", route.title()));
            let input = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(inputs::schema_name(route))))
                .build();
            submit.request_body = Some(
                RequestBodyBuilder::new()
                    .content("application/json", input)
                    .required(Some(Required::True))
                    .build(),
            );
            paths.insert(
                format!("/v1/models/{}", route.id()),
                PathItem::new(HttpMethod::Post, submit),
            );

            let mut schema = for_model(&schema, format!("schema_{slug}"));
            schema.summary = Some(format!("The input and output schemas of {}", route.title()));
            paths.insert(
                format!("/v1/models/{}/schema", route.id()),
                PathItem::new(HttpMethod::Get, schema),
            );

            // The derived component would lack the field titles; the served schema has them.
            components
                .schemas
                .insert(inputs::schema_name(route), inputs::schema_object(route));
        }
    }
}

/// `template` with the `model_id` parameter filled in.
fn for_model(template: &Operation, operation_id: String) -> Operation {
    let mut operation = template.clone();
    if let Some(parameters) = &mut operation.parameters {
        parameters.retain(|p| p.name != "model_id");
    }
    operation.operation_id = Some(operation_id);
    operation
}
