//! Every rule of the routes' schemas, and the schemas' agreement with the parser.

use super::*;
use kiln_core::params::{ImageSize, OutputFormat, OutputSize, RouteOptions};
use serde_json::json;

const MAX_PROMPT: usize = 10_000;
const PRO: Route = Route::Flux11ProTextToImage;
const FLEX: Route = Route::Flux2FlexTextToImage;
const EDIT: Route = Route::Flux2FlexEdit;
const IMAGE_URL: &str = "https://example.com/cup.png";

fn ok(route: Route, body: Value) -> GenerationParams {
    parse_input(route, &body, MAX_PROMPT).unwrap_or_else(|e| panic!("{body} should pass: {e}"))
}

fn violations(route: Route, body: Value) -> Vec<Violation> {
    match parse_input(route, &body, MAX_PROMPT) {
        Ok(params) => panic!("{body} should fail, got {params:?}"),
        Err(InputErrors(v)) => v,
    }
}

/// The single violation of `body`: its field and rule.
fn violation(route: Route, body: Value) -> (String, String) {
    let v = violations(route, body.clone());
    assert_eq!(v.len(), 1, "{body}: {v:?}");
    (v[0].field.clone(), v[0].rule.clone())
}

fn size(route: Route, body: Value) -> (u32, u32) {
    let OutputSize::Pixels(ImageSize { width, height }) = ok(route, body.clone()).size else {
        panic!("{body} should give a size in pixels")
    };
    (width, height)
}

/// `body` with what `route` requires besides the prompt (an edit's `image_urls`).
fn with_required(route: Route, mut body: Value) -> Value {
    if let (true, Value::Object(fields)) = (route.takes_reference_images(), &mut body) {
        fields.insert("image_urls".into(), json!([IMAGE_URL]));
    }
    body
}

/// `body`'s parameters, rendered back into an input and parsed again, are the same; the input
/// rendered.
fn round_trip(route: Route, body: Value) -> Value {
    let params = ok(route, body.clone());
    let rendered = render_input(route, &params, |source| Some(source.as_str().to_string()));
    assert_eq!(
        ok(route, rendered.clone()),
        params,
        "{body} rendered as {rendered}"
    );
    rendered
}

mod flux11_pro {
    use super::*;

    #[test]
    fn defaults_follow_the_seed() {
        let p = ok(PRO, json!({"prompt": "a cat"}));
        assert_eq!(p.prompt.as_str(), "a cat");
        assert_eq!(
            p.size,
            OutputSize::Pixels(ImageSize {
                width: 1344,
                height: 768
            })
        );
        assert_eq!(p.seed, 81_048_285);
        assert_eq!(p.options, RouteOptions::Flux11Pro { raw: false });
        assert_eq!(p.output_format, OutputFormat::Jpeg);
        assert_eq!(p.num_inference_steps, None);
        assert_eq!(p.guidance_scale, None);
    }

    #[test]
    fn presets_map_to_their_pixel_sizes() {
        for (name, expected) in [
            ("16:9", (1344, 768)),
            ("4:3", (1152, 864)),
            ("1:1", (1024, 1024)),
            ("1:1 (hd)", (1440, 1440)),
            ("3:4", (864, 1152)),
            ("9:16", (768, 1344)),
            ("Custom", (1024, 1024)),
        ] {
            assert_eq!(
                size(PRO, json!({"prompt": "x", "image_size": name})),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn unknown_aspect_ratios_are_refused_listing_the_choices() {
        let (field, rule) = violation(PRO, json!({"prompt": "x", "image_size": "2:1"}));
        assert_eq!(field, "image_size");
        assert!(
            rule.contains("\"1:1 (hd)\"") && rule.contains("\"Custom\""),
            "{rule}"
        );
        let (_, rule) = violation(PRO, json!({"prompt": "x", "image_size": 169}));
        assert_eq!(rule, "must be a string");
    }

    #[test]
    fn custom_sides_round_to_the_nearest_multiple_of_32_ties_up() {
        let custom = |w: i64, h: i64| {
            size(
                PRO,
                json!({"prompt": "x", "image_size": "Custom", "width": w, "height": h}),
            )
        };
        assert_eq!(custom(1000, 1024), (992, 1024)); // 31.25 x 32
        assert_eq!(custom(1008, 1024), (1024, 1024)); // 31.5: a tie goes up
        assert_eq!(custom(1007, 1009), (992, 1024)); // either side of the tie
        assert_eq!(custom(1006, 1024), (992, 1024));
        assert_eq!(custom(256, 1440), (256, 1440)); // the bounds themselves
        assert_eq!(custom(240, 1455), (256, 1440)); // round into range
        assert_eq!(
            size(
                PRO,
                json!({"prompt": "x", "image_size": "Custom", "width": 512})
            ),
            (512, 1024)
        );
    }

    #[test]
    fn custom_sides_out_of_range_after_rounding_are_refused() {
        for (width, rounds_to) in [
            (239, 224),
            (1456, 1472),
            (0, 0),
            (-64, -64),
            (100_000, 100_000),
        ] {
            let (field, rule) = violation(
                PRO,
                json!({"prompt": "x", "image_size": "Custom", "width": width}),
            );
            assert_eq!(field, "width");
            assert_eq!(
                rule,
                format!("must be between 256 and 1440 after rounding to the nearest multiple of 32 (rounds to {rounds_to})")
            );
        }
        let (field, _) = violation(
            PRO,
            json!({"prompt": "x", "image_size": "Custom", "height": 2000}),
        );
        assert_eq!(field, "height");
    }

    #[test]
    fn sides_are_only_allowed_with_custom() {
        let v = violations(PRO, json!({"prompt": "x", "width": 512, "height": 512}));
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].field.as_str(), v[1].field.as_str()),
            ("width", "height")
        );
        assert!(
            v[0].rule
                .contains("only allowed when image_size is \"Custom\""),
            "{}",
            v[0].rule
        );
        let (field, _) = violation(
            PRO,
            json!({"prompt": "x", "image_size": "1:1", "width": 512}),
        );
        assert_eq!(field, "width");
        // With a bad image_size, that is the one violation to report.
        let (field, _) = violation(
            PRO,
            json!({"prompt": "x", "image_size": "big", "width": 512}),
        );
        assert_eq!(field, "image_size");
    }

    #[test]
    fn raw_is_a_boolean() {
        assert_eq!(
            ok(PRO, json!({"prompt": "x", "raw": true})).options,
            RouteOptions::Flux11Pro { raw: true }
        );
        for bad in [json!("true"), json!(1), json!(null)] {
            assert_eq!(
                violation(PRO, json!({"prompt": "x", "raw": bad})),
                ("raw".into(), "must be true or false".into())
            );
        }
    }

    #[test]
    fn seed_spans_u32() {
        assert_eq!(ok(PRO, json!({"prompt": "x", "seed": 0})).seed, 0);
        assert_eq!(
            ok(PRO, json!({"prompt": "x", "seed": 4_294_967_295_u64})).seed,
            u32::MAX
        );
        for bad in [json!(-1), json!(4_294_967_296_u64), json!(u64::MAX)] {
            let (field, rule) = violation(PRO, json!({"prompt": "x", "seed": bad}));
            assert_eq!(
                (field.as_str(), rule.as_str()),
                ("seed", "must be an integer between 0 and 4294967295")
            );
        }
    }

    #[test]
    fn unknown_fields_are_refused_naming_the_allowed_ones() {
        let (field, rule) = violation(PRO, json!({"prompt": "x", "num_inference_steps": 20}));
        assert_eq!(field, "num_inference_steps");
        assert_eq!(
            rule,
            "unknown field; allowed fields: prompt, image_size, width, height, seed, raw"
        );
    }

    #[test]
    fn rendering_is_the_parsers_inverse() {
        let all = round_trip(
            PRO,
            json!({"prompt": " a cat ", "image_size": "Custom", "width": 500, "height": 300, "seed": 7, "raw": true}),
        );
        assert_eq!(
            all,
            json!({"prompt": "a cat", "image_size": "Custom", "width": 512, "height": 288, "seed": 7, "raw": true}),
            "every field written out, the sides as they rounded"
        );
        let defaults = round_trip(PRO, json!({"prompt": "a cat"}));
        assert_eq!(defaults["image_size"], "16:9");
        assert_eq!(defaults["seed"], 81_048_285);
        // Another route's options (never made by the parser) leave the route's default.
        let flex = ok(FLEX, json!({"prompt": "a cat"}));
        let rendered = render_input(PRO, &flex, |_| None);
        assert!(rendered.get("raw").is_none(), "{rendered}");
        let pro = ok(PRO, json!({"prompt": "a cat", "raw": true}));
        let rendered = render_input(FLEX, &pro, |_| None);
        assert!(
            rendered.get("enable_prompt_expansion").is_none(),
            "{rendered}"
        );
        for ratio in ["16:9", "4:3", "1:1", "1:1 (hd)", "3:4", "9:16"] {
            let rendered = round_trip(PRO, json!({"prompt": "x", "image_size": ratio}));
            assert_eq!(rendered["image_size"], ratio);
            assert!(rendered.get("width").is_none(), "{rendered}");
        }
        round_trip(PRO, json!({"prompt": "x", "seed": u32::MAX}));
        // Custom sides that are a preset's pixels make the same request as the preset.
        let square = round_trip(
            PRO,
            json!({"prompt": "x", "image_size": "Custom", "width": 1024, "height": 1024}),
        );
        assert_eq!(square["image_size"], "1:1");
    }
}

mod flux2_flex {
    use super::*;

    #[test]
    fn defaults_follow_the_seed() {
        let p = ok(FLEX, json!({"prompt": "a cat"}));
        assert_eq!(
            p.size,
            OutputSize::Pixels(ImageSize {
                width: 1024,
                height: 768
            })
        );
        assert_eq!(
            p.options,
            RouteOptions::Flux2Flex {
                enable_prompt_expansion: true
            }
        );
        assert_eq!(p.seed, 0);
        assert_eq!(p.output_format, OutputFormat::Jpeg);
        assert_eq!(p.guidance_scale, Some(3.5));
        assert_eq!(p.num_inference_steps, Some(28));
    }

    #[test]
    fn every_field_can_be_set() {
        let p = ok(
            FLEX,
            json!({"prompt": "a cat", "image_size": "square", "enable_prompt_expansion": false, "seed": 7,
                   "output_format": "png", "guidance_scale": 5, "num_inference_steps": 4}),
        );
        assert_eq!(
            p.size,
            OutputSize::Pixels(ImageSize {
                width: 512,
                height: 512
            })
        );
        assert_eq!(
            p.options,
            RouteOptions::Flux2Flex {
                enable_prompt_expansion: false
            }
        );
        assert_eq!(p.seed, 7);
        assert_eq!(p.output_format, OutputFormat::Png);
        assert_eq!(p.guidance_scale, Some(5.0));
        assert_eq!(p.num_inference_steps, Some(4));
    }

    #[test]
    fn presets_map_to_their_pixel_sizes() {
        for (name, expected) in [
            ("square_hd", (1024, 1024)),
            ("square", (512, 512)),
            ("portrait_4_3", (768, 1024)),
            ("portrait_16_9", (576, 1024)),
            ("landscape_4_3", (1024, 768)),
            ("landscape_16_9", (1024, 576)),
        ] {
            assert_eq!(
                size(FLEX, json!({"prompt": "x", "image_size": name})),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn bad_sizes_are_refused_listing_the_presets() {
        for bad in [json!("huge"), json!(5), json!(["square"]), json!(null)] {
            let (field, rule) = violation(FLEX, json!({"prompt": "x", "image_size": bad}));
            assert_eq!(field, "image_size");
            assert!(
                rule.contains("\"landscape_16_9\"") && rule.contains("{\"width\", \"height\"}"),
                "{rule}"
            );
        }
    }

    #[test]
    fn custom_sides_round_to_the_nearest_multiple_of_16_ties_up() {
        let custom = |w: i64, h: i64| {
            size(
                FLEX,
                json!({"prompt": "x", "image_size": {"width": w, "height": h}}),
            )
        };
        assert_eq!(custom(1000, 1000), (1008, 1008)); // 62.5 x 16: a tie goes up
        assert_eq!(custom(999, 1001), (992, 1008)); // either side of the tie
        assert_eq!(custom(1010, 1016), (1008, 1024)); // 63.125, 63.5
        assert_eq!(custom(64, 2048), (64, 2048)); // the bounds themselves
        assert_eq!(custom(56, 2055), (64, 2048)); // round into range
    }

    #[test]
    fn custom_sides_out_of_range_after_rounding_are_refused() {
        for (width, rounds_to) in [(55, 48), (2056, 2064), (-16, -16)] {
            let (field, rule) = violation(
                FLEX,
                json!({"prompt": "x", "image_size": {"width": width, "height": 512}}),
            );
            assert_eq!(field, "image_size.width");
            assert_eq!(
                rule,
                format!("must be between 64 and 2048 after rounding to the nearest multiple of 16 (rounds to {rounds_to})")
            );
        }
    }

    #[test]
    fn custom_sizes_are_at_most_4_megapixels() {
        assert_eq!(
            size(
                FLEX,
                json!({"prompt": "x", "image_size": {"width": 2048, "height": 1952}})
            ),
            (2048, 1952)
        );
        let (field, rule) = violation(
            FLEX,
            json!({"prompt": "x", "image_size": {"width": 2048, "height": 2048}}),
        );
        assert_eq!(field, "image_size");
        assert!(
            rule.starts_with("must be at most 4 MP (4000000 pixels) after rounding"),
            "{rule}"
        );
        // 1992 rounds to 2000: the limit applies to the rounded sides.
        let (field, _) = violation(
            FLEX,
            json!({"prompt": "x", "image_size": {"width": 2048, "height": 1960}}),
        );
        assert_eq!(field, "image_size");
    }

    #[test]
    fn custom_sizes_need_both_sides_and_nothing_else() {
        let v = violations(
            FLEX,
            json!({"prompt": "x", "image_size": {"width": "512", "depth": 3}}),
        );
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["image_size.width", "image_size.height", "image_size.depth"]
        );
        assert_eq!(v[0].rule, "must be an integer");
        assert_eq!(v[1].rule, "required: an integer");
        assert_eq!(v[2].rule, "unknown field; allowed fields: width, height");
    }

    #[test]
    fn guidance_scale_is_a_number_from_1_5_to_10() {
        assert_eq!(
            ok(FLEX, json!({"prompt": "x", "guidance_scale": 1.5})).guidance_scale,
            Some(1.5)
        );
        assert_eq!(
            ok(FLEX, json!({"prompt": "x", "guidance_scale": 10})).guidance_scale,
            Some(10.0)
        );
        for bad in [1.49, 10.01, -3.0] {
            let (field, rule) = violation(FLEX, json!({"prompt": "x", "guidance_scale": bad}));
            assert_eq!(
                (field.as_str(), rule.as_str()),
                ("guidance_scale", "must be a number between 1.5 and 10")
            );
        }
        for bad in [json!(true), json!("3.5"), json!(null)] {
            assert_eq!(
                violation(FLEX, json!({"prompt": "x", "guidance_scale": bad})).1,
                "must be a number"
            );
        }
    }

    #[test]
    fn steps_are_an_integer_from_2_to_50() {
        assert_eq!(
            ok(FLEX, json!({"prompt": "x", "num_inference_steps": 2})).num_inference_steps,
            Some(2)
        );
        assert_eq!(
            ok(FLEX, json!({"prompt": "x", "num_inference_steps": 50})).num_inference_steps,
            Some(50)
        );
        for bad in [1, 51, 0, -5] {
            let (_, rule) = violation(FLEX, json!({"prompt": "x", "num_inference_steps": bad}));
            assert_eq!(rule, "must be an integer between 2 and 50");
        }
        for bad in [json!(5.5), json!(28.000001), json!("28"), json!(true)] {
            assert_eq!(
                violation(FLEX, json!({"prompt": "x", "num_inference_steps": bad})).1,
                "must be an integer"
            );
        }
        // JSON Schema's integers include numbers with no fraction.
        assert_eq!(
            ok(FLEX, json!({"prompt": "x", "num_inference_steps": 28.0})).num_inference_steps,
            Some(28)
        );
        let (_, rule) = violation(FLEX, json!({"prompt": "x", "num_inference_steps": 1e300}));
        assert_eq!(rule, "must be an integer between 2 and 50");
    }

    #[test]
    fn seed_spans_u32() {
        assert_eq!(
            ok(FLEX, json!({"prompt": "x", "seed": 4_294_967_295_u64})).seed,
            u32::MAX
        );
        assert_eq!(
            violation(FLEX, json!({"prompt": "x", "seed": 4_294_967_296_u64})).0,
            "seed"
        );
        assert_eq!(
            violation(FLEX, json!({"prompt": "x", "seed": "5"})).1,
            "must be an integer"
        );
    }

    #[test]
    fn output_format_and_expansion() {
        let (field, rule) = violation(FLEX, json!({"prompt": "x", "output_format": "webp"}));
        assert_eq!(
            (field.as_str(), rule.as_str()),
            ("output_format", "must be one of: \"jpeg\", \"png\"")
        );
        assert_eq!(
            violation(FLEX, json!({"prompt": "x", "output_format": "PNG"})).0,
            "output_format"
        );
        assert_eq!(
            violation(
                FLEX,
                json!({"prompt": "x", "enable_prompt_expansion": "no"})
            )
            .0,
            "enable_prompt_expansion"
        );
    }

    #[test]
    fn unknown_fields_are_refused_naming_the_allowed_ones() {
        let (field, rule) = violation(FLEX, json!({"prompt": "x", "raw": true}));
        assert_eq!(field, "raw");
        assert_eq!(
            rule,
            "unknown field; allowed fields: prompt, image_size, enable_prompt_expansion, seed, output_format, guidance_scale, num_inference_steps"
        );
    }

    #[test]
    fn rendering_is_the_parsers_inverse() {
        let all = round_trip(
            FLEX,
            json!({"prompt": "a fox", "image_size": {"width": 1000, "height": 500}, "enable_prompt_expansion": false, "seed": 12, "output_format": "png", "guidance_scale": 2.7, "num_inference_steps": 9}),
        );
        assert_eq!(
            all,
            json!({"prompt": "a fox", "image_size": {"width": 1008, "height": 496}, "enable_prompt_expansion": false, "seed": 12, "output_format": "png", "guidance_scale": 2.7, "num_inference_steps": 9}),
            "every field written out, the sides as they rounded, the guidance as it was sent"
        );
        let defaults = round_trip(FLEX, json!({"prompt": "a fox"}));
        assert_eq!(
            defaults,
            json!({"prompt": "a fox", "image_size": "landscape_4_3", "enable_prompt_expansion": true, "seed": 0, "output_format": "jpeg", "guidance_scale": 3.5, "num_inference_steps": 28})
        );
        use reader::Choice;
        for preset in SizePreset::ALL {
            let rendered = round_trip(FLEX, json!({"prompt": "x", "image_size": preset.name()}));
            assert_eq!(rendered["image_size"], preset.name());
        }
        for guidance in [1.5, 1.6, 3.3333333, 9.99, 10.0] {
            round_trip(FLEX, json!({"prompt": "x", "guidance_scale": guidance}));
        }
        round_trip(
            FLEX,
            json!({"prompt": "x", "seed": u32::MAX, "image_size": {"width": 2048, "height": 1952}}),
        );
    }
}

mod flux2_edit {
    use super::*;
    use kiln_core::params::ImageLocation;

    #[test]
    fn defaults_follow_the_text_to_image_route_with_an_auto_size() {
        let p = ok(
            EDIT,
            json!({"prompt": "make the cup red", "image_urls": [IMAGE_URL]}),
        );
        assert_eq!(p.size, OutputSize::FirstReference);
        assert_eq!(p.reference_images.len(), 1);
        assert_eq!(
            p.reference_images[0].location(),
            ImageLocation::Url(IMAGE_URL)
        );
        let flex = ok(FLEX, json!({"prompt": "make the cup red"}));
        assert_eq!(
            (
                p.seed,
                p.guidance_scale,
                p.num_inference_steps,
                p.output_format
            ),
            (
                flex.seed,
                flex.guidance_scale,
                flex.num_inference_steps,
                flex.output_format
            )
        );
        assert_eq!(
            p.options,
            RouteOptions::Flux2Flex {
                enable_prompt_expansion: true
            }
        );
    }

    #[test]
    fn sizes_are_auto_a_preset_or_custom() {
        let with_size =
            |size| json!({"prompt": "x", "image_urls": [IMAGE_URL], "image_size": size});
        assert_eq!(
            ok(EDIT, with_size(json!("auto"))).size,
            OutputSize::FirstReference
        );
        assert_eq!(size(EDIT, with_size(json!("square"))), (512, 512));
        assert_eq!(
            size(EDIT, with_size(json!({"width": 100, "height": 72}))),
            (96, 80)
        );
        let (field, rule) = violation(EDIT, with_size(json!("huge")));
        assert_eq!(field, "image_size");
        assert!(
            rule.contains("\"landscape_16_9\", \"auto\" or an object"),
            "{rule}"
        );
    }

    #[test]
    fn image_urls_are_required_and_each_is_checked() {
        assert_eq!(
            violation(EDIT, json!({"prompt": "x"})),
            (
                "image_urls".into(),
                "required: an array of 1 to 10 image URLs or data URIs".into()
            )
        );
        assert_eq!(
            violation(EDIT, json!({"prompt": "x", "image_urls": IMAGE_URL})).1,
            "must be an array of 1 to 10 image URLs or data URIs"
        );
        assert_eq!(
            violation(EDIT, json!({"prompt": "x", "image_urls": []})).1,
            "must hold 1 to 10 images (got 0)"
        );
        let eleven: Vec<&str> = vec![IMAGE_URL; 11];
        assert_eq!(
            violation(EDIT, json!({"prompt": "x", "image_urls": eleven})).1,
            "must hold 1 to 10 images (got 11)"
        );
        let v = violations(
            EDIT,
            json!({"prompt": "x", "image_urls": [IMAGE_URL, "file:///etc/passwd", 3,
                   "data:text/plain;base64,aGk=", "data:image/png;base64,iVBORw0KGgo="]}),
        );
        let found: Vec<(&str, &str)> = v
            .iter()
            .map(|v| (v.field.as_str(), v.rule.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "image_urls[1]",
                    "must be an http:// or https:// URL or a data: URI"
                ),
                ("image_urls[2]", "must be a string"),
                (
                    "image_urls[3]",
                    "a data: URI must be data:image/<type>;base64,<payload>"
                ),
            ]
        );
        let two = ok(
            EDIT,
            json!({"prompt": "x", "image_urls": [IMAGE_URL, "data:image/png;base64,iVBORw0KGgo="]}),
        );
        assert!(matches!(
            two.reference_images[1].location(),
            ImageLocation::Data {
                media_type: "image/png",
                ..
            }
        ));
    }

    #[test]
    fn unknown_fields_are_refused_naming_the_allowed_ones() {
        let (field, rule) = violation(
            EDIT,
            json!({"prompt": "x", "image_urls": [IMAGE_URL], "image_url": IMAGE_URL}),
        );
        assert_eq!(field, "image_url");
        assert!(
            rule.contains("prompt, image_urls, image_size, enable_prompt_expansion, seed"),
            "{rule}"
        );
    }

    #[test]
    fn the_schema_lists_the_images_and_the_auto_size() {
        let urls = &input_schema(EDIT, MAX_PROMPT)["properties"]["image_urls"];
        assert_eq!(urls["type"], "array");
        assert_eq!(
            (urls["minItems"].clone(), urls["maxItems"].clone()),
            (json!(1), json!(10))
        );
        assert_eq!(urls["title"], "Image URLs");
        let size = &input_schema(EDIT, MAX_PROMPT)["properties"]["image_size"];
        assert_eq!(size["default"], "auto");
        assert_eq!(size["oneOf"][0]["enum"], json!(["auto"]));
    }

    #[test]
    fn rendering_is_the_parsers_inverse() {
        let data = "data:image/png;base64,iVBORw0KGgo=";
        let all = round_trip(
            EDIT,
            json!({"prompt": "red cup", "image_urls": [IMAGE_URL, data], "image_size": "square", "enable_prompt_expansion": false, "seed": 3, "output_format": "png", "guidance_scale": 5, "num_inference_steps": 20}),
        );
        assert_eq!(all["image_urls"], json!([IMAGE_URL, data]), "in order");
        assert_eq!(all["image_size"], "square");
        let auto = round_trip(
            EDIT,
            json!({"prompt": "red cup", "image_urls": [IMAGE_URL]}),
        );
        assert_eq!(auto["image_size"], "auto");
        let custom = round_trip(
            EDIT,
            json!({"prompt": "red cup", "image_urls": [IMAGE_URL], "image_size": {"width": 640, "height": 480}}),
        );
        assert_eq!(custom["image_size"], json!({"width": 640, "height": 480}));
    }

    #[test]
    fn images_the_caller_cannot_show_are_left_out() {
        let params = ok(
            EDIT,
            json!({"prompt": "x", "image_urls": [IMAGE_URL, "https://example.com/b.png"]}),
        );
        let rendered = render_input(EDIT, &params, |source| {
            (source.as_str() != IMAGE_URL).then(|| source.as_str().to_string())
        });
        assert_eq!(rendered["image_urls"], json!(["https://example.com/b.png"]));
    }
}

mod shared_rules {
    use super::*;

    #[test]
    fn the_prompt_is_required_trimmed_and_bounded() {
        for route in Route::ALL {
            let body = |b| with_required(route, b);
            assert_eq!(
                violation(route, body(json!({}))),
                ("prompt".into(), "required: a non-empty string".into())
            );
            assert_eq!(
                ok(route, body(json!({"prompt": "  a cat\n"})))
                    .prompt
                    .as_str(),
                "a cat"
            );
            assert_eq!(
                violation(route, body(json!({"prompt": " \t "}))).1,
                "must not be empty or only white space"
            );
            assert_eq!(
                violation(route, body(json!({"prompt": 42}))).1,
                "must be a string"
            );
            assert_eq!(
                violation(route, body(json!({"prompt": null}))).1,
                "must be a string"
            );
        }
        let limit = |max| parse_input(PRO, &json!({"prompt": "ééééé"}), max);
        assert!(limit(5).is_ok());
        let InputErrors(v) = limit(4).unwrap_err();
        assert_eq!(
            v[0].rule,
            "must be at most 4 characters after trimming (got 5)"
        );
    }

    #[test]
    fn long_values_are_echoed_cut_short() {
        let long = "x".repeat(20_000);
        let InputErrors(v) = parse_input(PRO, &json!({"prompt": long}), 10_000).unwrap_err();
        let Some(Value::String(echo)) = &v[0].value else {
            panic!("{v:?}")
        };
        assert_eq!(echo.chars().count(), 101);
        assert!(echo.ends_with('…'));
    }

    #[test]
    fn the_body_must_be_an_object() {
        for route in Route::ALL {
            for body in [json!([]), json!("a cat"), json!(null), json!(3)] {
                assert_eq!(
                    violation(route, body),
                    ("body".into(), "must be a JSON object".into())
                );
            }
        }
    }

    #[test]
    fn every_violation_is_reported_at_once() {
        let v = violations(
            PRO,
            json!({"prompt": "", "image_size": "wide", "seed": 1.5, "raw": "yes", "steps": 4}),
        );
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["prompt", "image_size", "seed", "raw", "steps"]);
        assert_eq!(v[2].value, Some(json!(1.5)));

        let v = violations(
            FLEX,
            json!({"image_size": {"width": 9000, "height": 9000}, "seed": -1, "output_format": "gif",
                   "guidance_scale": 11, "num_inference_steps": 100, "extra": 1, "other": 2}),
        );
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "prompt",
                "image_size.width",
                "image_size.height",
                "seed",
                "output_format",
                "guidance_scale",
                "num_inference_steps",
                "extra",
                "other"
            ]
        );
        let message = InputErrors(v).to_string();
        assert!(
            message.contains("num_inference_steps: must be an integer between 2 and 50"),
            "{message}"
        );
    }
}

mod schemas {
    use super::*;
    use reader::Choice;

    fn property(route: Route, field: &str) -> Value {
        input_schema(route, MAX_PROMPT)["properties"][field].clone()
    }

    fn names<C: Choice>() -> Vec<Value> {
        C::ALL.iter().map(|c| json!(c.name())).collect()
    }

    #[test]
    fn schemas_are_strict_objects_requiring_the_prompt_and_an_edits_images() {
        for route in Route::ALL {
            let schema = input_schema(route, MAX_PROMPT);
            assert_eq!(schema["type"], "object");
            assert_eq!(schema["title"], "Input");
            let required = if route.takes_reference_images() {
                json!(["prompt", "image_urls"])
            } else {
                json!(["prompt"])
            };
            assert_eq!(schema["required"], required);
            assert_eq!(schema["additionalProperties"], json!(false));
            assert_eq!(property(route, "prompt")["type"], "string");
        }
    }

    #[test]
    fn field_titles_follow_the_seeds() {
        assert_eq!(property(PRO, "image_size")["title"], "Aspect Ratio (W:H)");
        assert_eq!(property(PRO, "raw")["title"], "Raw Mode");
        assert_eq!(
            property(FLEX, "enable_prompt_expansion")["title"],
            "Magic Prompt"
        );
        assert_eq!(
            property(FLEX, "num_inference_steps")["title"],
            "Number of Inference Steps"
        );
        assert!(property(FLEX, "prompt")["default"]
            .as_str()
            .unwrap()
            .starts_with("High-resolution iPhone photograph"));
        assert!(property(PRO, "prompt")["default"]
            .as_str()
            .unwrap()
            .starts_with("A cocktail menu book"));
    }

    #[test]
    fn choices_and_defaults_agree_with_the_parser() {
        let pro = property(PRO, "image_size");
        assert_eq!(pro["type"], "string");
        assert_eq!(pro["enum"], json!(names::<AspectRatio>()));
        assert_eq!(pro["default"], "16:9");
        assert_eq!(
            property(PRO, "seed")["default"],
            json!(ok(PRO, json!({"prompt": "x"})).seed)
        );
        assert_eq!(property(PRO, "seed")["maximum"], json!(u32::MAX));
        assert_eq!(property(PRO, "raw")["default"], json!(false));
        assert_eq!(property(PRO, "width")["default"], json!(1024));

        let flex = ok(FLEX, json!({"prompt": "x"}));
        let size = property(FLEX, "image_size");
        assert_eq!(size["default"], "landscape_4_3");
        assert_eq!(size["oneOf"][0]["enum"], json!(names::<SizePreset>()));
        assert_eq!(size["oneOf"][1]["required"], json!(["width", "height"]));
        assert_eq!(
            property(FLEX, "output_format")["enum"],
            json!(names::<ImageFormat>())
        );
        assert_eq!(property(FLEX, "output_format")["default"], "jpeg");
        assert_eq!(property(FLEX, "seed")["default"], json!(flex.seed));
        assert_eq!(
            property(FLEX, "guidance_scale")["default"],
            json!(flex.guidance_scale.unwrap())
        );
        assert_eq!(property(FLEX, "guidance_scale")["minimum"], json!(1.5));
        assert_eq!(property(FLEX, "guidance_scale")["maximum"], json!(10));
        assert_eq!(
            property(FLEX, "num_inference_steps")["default"],
            json!(flex.num_inference_steps.unwrap())
        );
        assert_eq!(property(FLEX, "num_inference_steps")["minimum"], json!(2));
        assert_eq!(property(FLEX, "num_inference_steps")["maximum"], json!(50));
        let RouteOptions::Flux2Flex {
            enable_prompt_expansion,
        } = flex.options
        else {
            panic!("{:?} on {FLEX:?}", flex.options)
        };
        assert_eq!(
            property(FLEX, "enable_prompt_expansion")["default"],
            json!(enable_prompt_expansion)
        );
    }

    #[test]
    fn custom_sides_state_the_raw_values_that_round_into_range() {
        for side in ["width", "height"] {
            assert_eq!(property(PRO, side)["minimum"], json!(240));
            assert_eq!(property(PRO, side)["maximum"], json!(1455));
            ok(
                PRO,
                json!({"prompt": "x", "image_size": "Custom", side: 240}),
            );
            ok(
                PRO,
                json!({"prompt": "x", "image_size": "Custom", side: 1455}),
            );
            violations(
                PRO,
                json!({"prompt": "x", "image_size": "Custom", side: 239}),
            );
            violations(
                PRO,
                json!({"prompt": "x", "image_size": "Custom", side: 1456}),
            );
        }
        let custom = &property(FLEX, "image_size")["oneOf"][1];
        assert_eq!(custom["properties"]["width"]["minimum"], json!(56));
        assert_eq!(custom["properties"]["height"]["maximum"], json!(2055));
        // The 4 MP limit: 2048 wide takes at most 1952 high (after rounding).
        let bands = custom["anyOf"].as_array().unwrap();
        let widest = bands.last().unwrap();
        assert_eq!(widest["properties"]["width"]["maximum"], json!(2055));
        assert_eq!(widest["properties"]["height"]["maximum"], json!(1959));
        ok(
            FLEX,
            json!({"prompt": "x", "image_size": {"width": 2055, "height": 1959}}),
        );
        violations(
            FLEX,
            json!({"prompt": "x", "image_size": {"width": 2055, "height": 1960}}),
        );
    }

    #[test]
    fn pro_sides_are_allowed_only_with_custom() {
        let schema = input_schema(PRO, MAX_PROMPT);
        let [custom, preset] = schema["oneOf"].as_array().unwrap().as_slice() else {
            panic!("two shapes: {}", schema["oneOf"])
        };
        assert_eq!(custom["properties"]["image_size"]["const"], "Custom");
        assert_eq!(custom["required"], json!(["image_size"]));
        let presets = names::<AspectRatio>();
        assert_eq!(
            preset["properties"]["image_size"]["enum"],
            json!(presets[..presets.len() - 1])
        );
        assert_eq!(preset["properties"]["width"], json!(false));
        violations(
            PRO,
            json!({"prompt": "x", "image_size": "1:1", "width": 512}),
        );
    }
}
