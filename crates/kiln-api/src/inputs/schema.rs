//! The rules the derived schemas cannot state, added to their JSON, so that what the schema
//! allows is exactly what the parser accepts: generated clients and validators (and
//! schemathesis's checks) then agree with the server.
//!
//! - A prompt is 1 to `max_prompt_chars` characters after trimming white space: a pattern says
//!   it, with Rust's white space (what `str::trim` removes), not the regex engine's `\s`.
//! - Custom sides are rounded before their range is checked, so the raw range is wider by half a
//!   step each way (FLUX 1.1 [pro]: 240..=1455 rounds into 256..=1440).
//! - FLUX 1.1 [pro] takes `width` and `height` only with `image_size: "Custom"`.
//! - FLUX.2's custom sizes are at most 4 MP after rounding: one branch per band of widths.
//! - An edit's image URLs are `http(s)` URLs with a host name, or base64 `data:image/...` URIs.

use super::reader::{rounded_side_bounds, Choice};
use super::{flux11_pro, flux2_flex};
use kiln_core::catalog::Route;
use serde_json::{json, Map, Value};

/// The characters `str::trim` removes (Unicode's White_Space), as a regex class body.
const WHITE_SPACE: &str =
    r"\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// Adds the rules above to `route`'s derived schema.
pub(super) fn refine(route: Route, schema: &mut Value, max_prompt_chars: usize) {
    let properties = &mut schema["properties"];
    properties["prompt"]["pattern"] = json!(trimmed_length_pattern(max_prompt_chars));
    match route {
        Route::Flux11ProTextToImage => refine_flux11_pro(schema),
        Route::Flux2FlexTextToImage => refine_custom_size(&mut schema["properties"]["image_size"]),
        Route::Flux2FlexEdit => {
            refine_custom_size(&mut schema["properties"]["image_size"]);
            schema["properties"]["image_urls"]["items"]["pattern"] = json!(image_source_pattern());
        }
    }
}

/// A string of 1 to `max` characters once white space is trimmed from both ends.
fn trimmed_length_pattern(max: usize) -> String {
    let (ws, text) = (format!("[{WHITE_SPACE}]"), format!("[^{WHITE_SPACE}]"));
    match max {
        0 | 1 => format!("^{ws}*{text}{ws}*$"),
        _ => format!(r"^{ws}*{text}(?:[\s\S]{{0,{}}}{text})?{ws}*$", max - 2),
    }
}

/// An `http(s)` URL whose host is a name (its last label starts with a letter, which the URL
/// standard does not read as an IPv4 number), or a `data:image/...;base64,` URI whose payload
/// is canonical padded base64; white space around either is trimmed.
fn image_source_pattern() -> String {
    const PORT: &str =
        "(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})";
    const HOST: &str = "(?:[A-Za-z0-9-]{1,63}\\.){0,8}[A-Za-z][A-Za-z0-9-]{0,62}";
    let url = format!("[hH][tT][tT][pP][sS]?://{HOST}(?::{PORT})?(?:[/?#][!-~]{{0,7000}})?");
    let base64 =
        "(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?";
    let data = format!("[dD][aA][tT][aA]:[iI][mM][aA][gG][eE]/[^,]+;(?:base64|BASE64),{base64}");
    let ws = format!("[{WHITE_SPACE}]");
    format!("^{ws}*(?:{url}|{data}){ws}*$")
}

/// Raw side bounds, and `width`/`height` only with `Custom`: a choice of two shapes, the
/// custom one requiring `image_size: "Custom"`, the preset one refusing the sides.
fn refine_flux11_pro(schema: &mut Value) {
    let (min, max) = rounded_side_bounds(
        flux11_pro::SIDE_STEP,
        flux11_pro::SIDE_MIN,
        flux11_pro::SIDE_MAX,
    );
    for side in ["width", "height"] {
        let property = &mut schema["properties"][side];
        (property["minimum"], property["maximum"]) = (json!(min), json!(max));
    }
    let presets: Vec<&str> = flux11_pro::AspectRatio::ALL
        .iter()
        .filter(|r| **r != flux11_pro::AspectRatio::Custom)
        .map(|r| r.name())
        .collect();
    let custom = flux11_pro::AspectRatio::Custom.name();
    schema["oneOf"] = json!([
        {
            "title": "Custom size",
            "required": ["image_size"],
            "properties": {"image_size": {"const": custom}},
        },
        {
            "title": "Preset size",
            "properties": {"image_size": {"enum": presets}, "width": false, "height": false},
        },
    ]);
}

/// In a FLUX.2 `image_size` (a choice of names or an object), the object's raw side bounds and
/// its area limit.
fn refine_custom_size(image_size: &mut Value) {
    let Some(choices) = image_size["oneOf"].as_array_mut() else {
        unreachable!("a FLUX.2 image_size is a choice")
    };
    let custom = choices
        .iter_mut()
        .find(|c| c["type"] == "object")
        .expect("a FLUX.2 image_size takes custom sides");
    let (step, min, max) = (
        flux2_flex::SIDE_STEP,
        flux2_flex::SIDE_MIN,
        flux2_flex::SIDE_MAX,
    );
    let (raw_min, raw_max) = rounded_side_bounds(step, min, max);
    for side in ["width", "height"] {
        let property = &mut custom["properties"][side];
        (property["minimum"], property["maximum"]) = (json!(raw_min), json!(raw_max));
    }
    custom["anyOf"] = Value::Array(area_bands(step, min, max, flux2_flex::MAX_PIXELS));
}

/// Branches over the raw width: in each, the largest raw height whose rounded area fits
/// `max_pixels` given the rounded width. Widths whose every height fits make the first branch.
fn area_bands(step: u32, min: u32, max: u32, max_pixels: u64) -> Vec<Value> {
    let max_height = |width: u32| {
        let fits = max_pixels / u64::from(width) / u64::from(step) * u64::from(step);
        fits.min(u64::from(max)) as u32
    };
    let half = step / 2;
    // (first rounded width, last rounded width, largest rounded height), consecutive widths
    // with the same largest height together.
    let mut bands: Vec<(u32, u32, u32)> = Vec::new();
    for width in (min..=max).step_by(step as usize) {
        match bands.last_mut() {
            Some(band) if band.2 == max_height(width) => band.1 = width,
            _ => bands.push((width, width, max_height(width))),
        }
    }
    bands
        .into_iter()
        .map(|(first, last, height)| {
            let mut properties = Map::new();
            let mut width = json!({"minimum": first - half, "maximum": last + half - 1});
            if first == min {
                width = json!({"maximum": last + half - 1});
            }
            properties.insert("width".into(), width);
            if height < max {
                properties.insert("height".into(), json!({"maximum": height + half - 1}));
            }
            json!({ "properties": properties })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_bands_admit_exactly_the_rounded_areas_that_fit() {
        let bands = area_bands(16, 64, 2048, 4_000_000);
        let admits = |w: u32, h: u32| {
            bands.iter().any(|b| {
                let p = &b["properties"];
                let within = |v: u32, s: &Value| {
                    s["minimum"].as_u64().is_none_or(|m| u64::from(v) >= m)
                        && s["maximum"].as_u64().is_none_or(|m| u64::from(v) <= m)
                };
                within(w, &p["width"]) && within(h, &p["height"])
            })
        };
        let round = |n: u32| (n + 8) / 16 * 16;
        for w in (56..=2055).step_by(3) {
            for h in (1900..=2055).step_by(1) {
                let fits = u64::from(round(w)) * u64::from(round(h)) <= 4_000_000;
                assert_eq!(admits(w, h), fits, "{w}x{h}");
            }
        }
    }
}
