//! The routes' input schemas: what each model id accepts, its defaults, and how a request body
//! becomes [`GenerationParams`].
//!
//! [`parse_input`] is the only way in: the HTTP submit and `kiln generate` both call it, so the
//! two validate identically. [`render_input`] is its inverse (a listed request's input, which
//! submitted again makes the same request). The schema a client sees ([`input_schema`],
//! `/openapi.json`) is derived from the same input structs the parser fills, so the two cannot
//! drift apart.

mod flux11_pro;
mod flux2_edit;
mod flux2_flex;
mod json;
mod reader;
mod schema;

pub use flux11_pro::{AspectRatio, Flux11ProInput};
pub use flux2_edit::{AutoSize, EditImageSize, Flux2EditInput};
pub use flux2_flex::{CustomImageSize, Flux2FlexInput, Flux2ImageSize, ImageFormat, SizePreset};
pub use json::{parse_json, JsonError};

use kiln_core::catalog::Route;
use kiln_core::params::{GenerationParams, ImageSource, Prompt};
use reader::FieldReader;
use serde::Serialize;
use serde_json::Value;
use std::fmt;
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

/// One broken rule of one field.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Violation {
    /// The field's path, e.g. `image_size.width`; `body` for the request body as a whole.
    pub field: String,
    /// What the field must be, in words (allowed values, range).
    pub rule: String,
    /// The value given, when it is a short scalar worth echoing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// Longer strings are cut when echoed back in a violation (a prompt can be 10,000 characters).
const ECHO_MAX_CHARS: usize = 100;

impl Violation {
    pub fn new(field: impl Into<String>, rule: impl Into<String>, value: Option<&Value>) -> Self {
        let value = value.and_then(|v| match v {
            Value::String(s) if s.chars().count() > ECHO_MAX_CHARS => Some(Value::String(
                s.chars().take(ECHO_MAX_CHARS).chain(['…']).collect(),
            )),
            Value::Array(_) | Value::Object(_) => None,
            scalar => Some(scalar.clone()),
        });
        Self {
            field: field.into(),
            rule: rule.into(),
            value,
        }
    }
}

/// Every violation found in one input, in field order.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct InputErrors(pub Vec<Violation>);

impl fmt::Display for InputErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self
            .0
            .iter()
            .map(|v| format!("{}: {}", v.field, v.rule))
            .collect();
        write!(
            f,
            "the input does not match the model's schema: {}",
            lines.join("; ")
        )
    }
}

/// Validates `body` against `route`'s schema, applies the defaults, and maps the route's
/// vocabulary to the engine's.
pub fn parse_input(
    route: Route,
    body: &Value,
    max_prompt_chars: usize,
) -> Result<GenerationParams, InputErrors> {
    let Value::Object(fields) = body else {
        return Err(InputErrors(vec![Violation::new(
            "body",
            "must be a JSON object",
            None,
        )]));
    };
    let mut violations = Vec::new();
    let mut reader = FieldReader::new("", fields.clone(), &mut violations);
    let params = match route {
        Route::Flux11ProTextToImage => {
            flux11_pro::read(&mut reader, max_prompt_chars).map(Flux11ProInput::into_params)
        }
        Route::Flux2FlexTextToImage => {
            flux2_flex::read(&mut reader, max_prompt_chars).map(Flux2FlexInput::into_params)
        }
        Route::Flux2FlexEdit => {
            flux2_edit::read(&mut reader, max_prompt_chars).map(Flux2EditInput::into_params)
        }
    };
    reader.finish(|| allowed_fields(route));
    match params {
        Some(params) if violations.is_empty() => Ok(params),
        _ => Err(InputErrors(violations)),
    }
}

/// The input that, submitted to `route`, gives `params` again: [`parse_input`]'s inverse, with
/// every field written out (defaults too) in the route's own vocabulary (a preset's name for
/// its pixels). `image_url` gives each of an edit's reference images as the input shows it;
/// `None` leaves that image out, and the input then needs it back before it is submitted.
pub fn render_input(
    route: Route,
    params: &GenerationParams,
    image_url: impl FnMut(&ImageSource) -> Option<String>,
) -> Value {
    Value::Object(match route {
        Route::Flux11ProTextToImage => flux11_pro::render(params),
        Route::Flux2FlexTextToImage => flux2_flex::render(params),
        Route::Flux2FlexEdit => flux2_edit::render(params, image_url),
    })
}

/// The rule every route shares: required, 1..=`max_chars` characters after trimming.
fn read_prompt(r: &mut FieldReader<'_>, max_chars: usize) -> Option<Prompt> {
    if r.missing("prompt", "a non-empty string") {
        return None;
    }
    r.string("prompt", |s| {
        Prompt::parse(s, max_chars).map_err(|e| e.to_string())
    })
}

/// The JSON schema of `route`'s input, as served at `/v1/models/{model_id}/schema` and in the
/// OpenAPI document: exactly what [`parse_input`] with `max_prompt_chars` accepts.
pub fn input_schema(route: Route, max_prompt_chars: usize) -> Value {
    let mut schema =
        serde_json::to_value(schema_object(route)).expect("a schema serializes to JSON");
    schema::refine(route, &mut schema, max_prompt_chars);
    schema
}

/// The name of `route`'s input schema among the OpenAPI document's components.
pub(crate) fn schema_name(route: Route) -> String {
    match route {
        Route::Flux11ProTextToImage => Flux11ProInput::name().into_owned(),
        Route::Flux2FlexTextToImage => Flux2FlexInput::name().into_owned(),
        Route::Flux2FlexEdit => Flux2EditInput::name().into_owned(),
    }
}

/// `route`'s input schema in utoipa's model, titles included (without [`input_schema`]'s
/// refinements).
fn schema_object(route: Route) -> RefOr<Schema> {
    let (schema, titles) = match route {
        Route::Flux11ProTextToImage => (Flux11ProInput::schema(), flux11_pro::FIELD_TITLES),
        Route::Flux2FlexTextToImage => (Flux2FlexInput::schema(), flux2_flex::FIELD_TITLES),
        Route::Flux2FlexEdit => (Flux2EditInput::schema(), flux2_edit::FIELD_TITLES),
    };
    with_field_titles(schema, titles)
}

/// The field names `route` accepts, in schema order.
fn allowed_fields(route: Route) -> Vec<String> {
    match schema_object(route) {
        RefOr::T(Schema::Object(object)) => object.properties.keys().cloned().collect(),
        _ => unreachable!("an input schema is an object"),
    }
}

/// Two touches on the derived schema. utoipa's derive takes a title for a type but not for a
/// field; the seeds title every field (UIs show them as labels), so they are set here. And an
/// inlined type that carries the field's own description and default comes out wrapped in a
/// one-item `oneOf`; unwrapping it gives the flat `{"type": "string", "enum": [...]}` of the seeds.
fn with_field_titles(schema: RefOr<Schema>, titles: &[(&str, &str)]) -> RefOr<Schema> {
    let RefOr::T(Schema::Object(mut object)) = schema else {
        unreachable!("an input schema is an object")
    };
    for (field, title) in titles {
        let property = object
            .properties
            .get_mut(*field)
            .expect("every titled field is in the schema");
        let RefOr::T(schema) = property else {
            unreachable!("input field {field} has an inline schema")
        };
        if let Schema::OneOf(wrapper) = schema {
            if let [RefOr::T(inner)] = wrapper.items.as_slice() {
                let (description, default) = (wrapper.description.take(), wrapper.default.take());
                *schema = inner.clone();
                match schema {
                    Schema::Object(o) => (o.description, o.default) = (description, default),
                    Schema::OneOf(o) => (o.description, o.default) = (description, default),
                    _ => unreachable!("input field {field} is an object or a choice of them"),
                }
            }
        }
        let title = Some((*title).to_string());
        match schema {
            Schema::Object(o) => o.title = title,
            Schema::OneOf(o) => o.title = title,
            Schema::Array(a) => a.title = title,
            _ => unreachable!("input field {field} is an object, an array or a choice of them"),
        }
    }
    RefOr::T(Schema::Object(object))
}

#[cfg(test)]
mod tests;
