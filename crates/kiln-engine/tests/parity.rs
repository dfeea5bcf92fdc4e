//! Numerics against diffusers: tiny random FLUX.1 pipelines made by
//! `tools/reference/make_fixtures.py`, loaded in every supported layout, must reproduce what
//! diffusers' FluxPipeline computed on them.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use kiln_engine::{EngineOptions, Flux1Pipeline, PipelineRequest};
use std::collections::HashMap;
use std::path::Path;

mod common;
use common::{
    f32_options, fixtures, max_abs, max_abs_of, max_pixel_diff, quantize_to_gguf, Reference, TOL,
};

fn guidance(r: &Reference) -> Option<f32> {
    r.json["guidance"].as_f64().map(|g| g as f32)
}

/// A BFL-layout directory: the given transformer file, `ae.safetensors`, and the text
/// encoders' and tokenizers' folders of the diffusers fixture (linked, not copied).
fn bfl_dir(config: &str, transformer: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let link =
        |from: &Path, name: &str| std::os::unix::fs::symlink(from, dir.path().join(name)).unwrap();
    link(
        transformer,
        transformer.file_name().unwrap().to_str().unwrap(),
    );
    link(
        &fixtures().join(format!("{config}-bfl/ae.safetensors")),
        "ae.safetensors",
    );
    for part in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"] {
        link(&fixtures().join(format!("{config}-diffusers/{part}")), part);
    }
    dir
}

fn load(dir: &Path) -> Flux1Pipeline {
    Flux1Pipeline::load(dir, &f32_options(), &mut |_| {}).unwrap()
}

/// Measured errors of one checkpoint against the reference.
#[derive(Debug)]
struct Errors {
    pooled: f32,
    t5: f32,
    velocity: f32,
    final_latents: f32,
    image: u8,
}

fn run_against_reference(config: &str, dir: &Path) -> Errors {
    let r = Reference::load(config);
    let p = load(dir);
    let (w, h) = (r.u32("width"), r.u32("height"));
    let max_len = r.u32("max_sequence_length") as usize;
    assert_eq!(
        p.model().variant().defaults().max_sequence_length,
        max_len,
        "variant default T5 length"
    );

    let text = p
        .encode_prompt(r.json["prompt"].as_str().unwrap(), max_len)
        .unwrap();
    assert_eq!(text.clip_ids, r.ids("clip_ids"), "CLIP token ids");
    assert_eq!(text.t5_ids, r.ids("t5_ids"), "T5 token ids");

    let sigma0 = r.json["sigmas"][0].as_f64().unwrap() as f32;
    let v = p
        .velocity(r.t("latents_in"), sigma0, guidance(&r), &text, w, h)
        .unwrap();

    // The defaults (steps, guidance, T5 length) are the variant's, as the reference used.
    let req = PipelineRequest {
        prompt: r.json["prompt"].as_str().unwrap().to_string(),
        width: w,
        height: h,
        steps: None,
        guidance: None,
        seed: 0,
        max_sequence_length: None,
        initial_latents: Some(
            kiln_engine::read_latents(&fixtures().join(format!("{config}-latents-in.safetensors")))
                .unwrap(),
        ),
        preview_interval: 0,
    };
    let out = p.run(&req, &[], &mut ()).unwrap();
    assert_eq!(out.applied.num_inference_steps, r.u32("steps"));
    assert_eq!(out.applied.guidance, guidance(&r));
    let want_px = r.t("image").flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!((out.image.width, out.image.height), (w, h));
    let image = max_pixel_diff(&out.image.pixels, &want_px);
    let e = Errors {
        pooled: max_abs(&text.pooled, r.t("pooled")),
        t5: max_abs(&text.t5, r.t("t5")),
        velocity: max_abs(&v, r.t("noise_pred_0")),
        final_latents: max_abs(&out.final_latents, r.t("final_latents")),
        image,
    };
    eprintln!(
        "{config} {}: {e:?} (|velocity| max {})",
        dir.display(),
        max_abs_of(r.t("noise_pred_0"))
    );
    e
}

fn assert_exact_layout(config: &str, dir: &Path) {
    let e = run_against_reference(config, dir);
    assert!(e.pooled <= TOL && e.t5 <= TOL, "text encoders: {e:?}");
    assert!(e.velocity <= TOL, "transformer: {e:?}");
    assert!(
        e.final_latents <= TOL,
        "final latents after every step: {e:?}"
    );
    assert!(e.image <= 2, "image: {e:?}");
}

#[test]
fn dev_diffusers_layout_matches_diffusers() {
    assert_exact_layout("dev", &fixtures().join("dev-diffusers"));
}

#[test]
fn schnell_diffusers_layout_matches_diffusers() {
    assert_exact_layout("schnell", &fixtures().join("schnell-diffusers"));
}

#[test]
fn dev_bfl_single_files_match_diffusers() {
    let dir = bfl_dir(
        "dev",
        &fixtures().join("dev-bfl/flux1-tiny-dev.safetensors"),
    );
    assert_exact_layout("dev", dir.path());
}

#[test]
fn schnell_bfl_single_files_match_diffusers() {
    let dir = bfl_dir(
        "schnell",
        &fixtures().join("schnell-bfl/flux1-tiny-schnell.safetensors"),
    );
    assert_exact_layout("schnell", dir.path());
}

/// Q8_0 from the `gguf` Python package (fixtures): within 1.5% of the velocity's largest value
/// for one call and 2/255 per pixel after all steps. Measured: 0.85% (dev) and 0.99% (schnell)
/// of it, 1/255 per pixel; candle's Q8_0 kernel also quantizes the activations.
#[test]
fn gguf_q8_0_transformers_stay_close() {
    for config in ["dev", "schnell"] {
        let file = fixtures().join(format!("{config}-gguf/flux1-tiny-{config}-Q8_0.gguf"));
        let dir = bfl_dir(config, &file);
        let e = run_against_reference(config, dir.path());
        let scale = max_abs_of(Reference::load(config).t("noise_pred_0"));
        assert!(
            e.pooled <= TOL && e.t5 <= TOL,
            "text encoders are not quantized: {e:?}"
        );
        assert!(
            e.velocity <= 0.015 * scale,
            "{config} Q8_0 transformer: {e:?}"
        );
        assert!(e.image <= 2, "{config} Q8_0 image: {e:?}");
    }
}

/// Q4_0 and Q4_K (quantized by candle): coarser, within 15% of the velocity's largest value.
/// Measured: Q4_0 9.5% (26 tensors quantized), Q4_K 0.5% (the 4 tensors whose rows are whole
/// 256-element super-blocks in so small a model).
#[test]
fn gguf_q4_0_and_q4_k_transformers_load_and_run() {
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4K] {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join(format!("flux1-tiny-dev-{dtype:?}.gguf"));
        let quantized = quantize_to_gguf(
            &fixtures().join("dev-bfl/flux1-tiny-dev.safetensors"),
            dtype,
            &file,
        );
        assert!(
            !quantized.is_empty(),
            "no tensor of the tiny model fits {dtype:?} blocks"
        );
        let dir = bfl_dir("dev", &file);
        let p = load(dir.path());
        assert!(
            p.describe().contains(&format!("{dtype:?}")),
            "{}",
            p.describe()
        );
        let e = run_against_reference("dev", dir.path());
        let scale = max_abs_of(Reference::load("dev").t("noise_pred_0"));
        eprintln!("{dtype:?}: {} tensors quantized", quantized.len());
        assert!(e.velocity <= 0.15 * scale, "{dtype:?} transformer: {e:?}");
    }
}

/// A diffusers folder like the fixture's, every entry linked but `replaced`, which `fill`
/// writes (given the new folder and the fixture's).
fn diffusers_dir_replacing(
    config: &str,
    replaced: &str,
    fill: impl FnOnce(&Path, &Path),
) -> tempfile::TempDir {
    let src = fixtures().join(format!("{config}-diffusers"));
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != replaced {
            std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    fill(dir.path(), &src);
    dir
}

/// A diffusers folder like the fixture's but whose `transformer/` holds `files` (written by
/// `fill`) beside the original config.json.
fn diffusers_dir_with_transformer(config: &str, fill: impl FnOnce(&Path)) -> tempfile::TempDir {
    diffusers_dir_replacing(config, "transformer", |dir, src| {
        let t = dir.join("transformer");
        std::fs::create_dir(&t).unwrap();
        std::os::unix::fs::symlink(src.join("transformer/config.json"), t.join("config.json"))
            .unwrap();
        fill(&t);
    })
}

/// A checkpoint whose `model_index.json` asks for true classifier-free guidance (as kiln's
/// demo checkpoint does) matches diffusers' `true_cfg_scale` with `negative_prompt=""`, on top
/// of the guidance embedding for dev; for schnell a request's guidance is that scale.
#[test]
fn true_cfg_checkpoints_match_diffusers() {
    for config in ["dev", "schnell"] {
        let r = Reference::load(config);
        let scale = r.json["true_cfg_scale"].as_f64().unwrap() as f32;
        let dir = diffusers_dir_replacing(config, "model_index.json", |dir, src| {
            let mut index: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(src.join("model_index.json")).unwrap(),
            )
            .unwrap();
            index["_kiln"] = serde_json::json!({ "true_cfg_scale": scale });
            std::fs::write(dir.join("model_index.json"), index.to_string()).unwrap();
        });
        let p = load(dir.path());
        let initial =
            kiln_engine::read_latents(&fixtures().join(format!("{config}-latents-in.safetensors")))
                .unwrap();
        let request = |guidance: Option<f32>| PipelineRequest {
            prompt: r.json["prompt"].as_str().unwrap().to_string(),
            width: r.u32("width"),
            height: r.u32("height"),
            steps: None,
            guidance,
            seed: 0,
            max_sequence_length: None,
            initial_latents: Some(initial.clone()),
            preview_interval: 0,
        };
        let out = p.run(&request(None), &[], &mut ()).unwrap();
        let e = max_abs(&out.final_latents, r.t("final_latents_true_cfg"));
        let moved = max_abs(r.t("final_latents_true_cfg"), r.t("final_latents"));
        eprintln!("{config} true CFG {scale}: final latents {e} (guidance moved them {moved})");
        assert!(e <= TOL, "{config}: {e}");
        assert!(moved > 100.0 * TOL, "{config}: the reference is not guided");
        assert!(
            out.applied
                .notes
                .iter()
                .any(|n| n.contains(&format!("true classifier-free guidance {scale}"))),
            "{:?}",
            out.applied.notes
        );
        match config {
            "dev" => assert_eq!(out.applied.guidance, guidance(&r)),
            _ => {
                assert_eq!(out.applied.guidance, Some(scale));
                // A request's guidance is the scale; 1 is none at all, as in diffusers.
                let unguided = p.run(&request(Some(1.0)), &[], &mut ()).unwrap();
                let e = max_abs(&unguided.final_latents, r.t("final_latents"));
                assert!(e <= TOL, "schnell at scale 1: {e}");
            }
        }
    }
}

#[test]
fn sharded_diffusers_transformer_matches_diffusers() {
    let dir = diffusers_dir_with_transformer("dev", |t| {
        let src = fixtures().join("dev-diffusers/transformer/diffusion_pytorch_model.safetensors");
        let tensors = candle_core::safetensors::load(src, &Device::Cpu).unwrap();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut weight_map = serde_json::Map::new();
        for (i, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
            let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
            let part: HashMap<&str, Tensor> = chunk
                .iter()
                .map(|n| (n.as_str(), tensors[*n].clone()))
                .collect();
            candle_core::safetensors::save(&part, t.join(&file)).unwrap();
            for n in chunk {
                weight_map.insert((*n).clone(), file.clone().into());
            }
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(
            t.join("diffusion_pytorch_model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
    });
    assert_exact_layout("dev", dir.path());
}

#[test]
fn gguf_transformer_in_a_diffusers_folder_runs() {
    let dir = diffusers_dir_with_transformer("dev", |t| {
        let q8 = fixtures().join("dev-gguf/flux1-tiny-dev-Q8_0.gguf");
        std::os::unix::fs::symlink(q8, t.join("flux1-tiny-dev-Q8_0.gguf")).unwrap();
    });
    let p = load(dir.path());
    assert!(
        p.describe()
            .contains("diffusers layout, GGUF Q8_0 transformer"),
        "{}",
        p.describe()
    );
    let e = run_against_reference("dev", dir.path());
    assert!(
        e.velocity <= 0.015 * max_abs_of(Reference::load("dev").t("noise_pred_0")),
        "{e:?}"
    );
}

fn bf16_options() -> Option<EngineOptions> {
    if kiln_engine::cpu_bf16_kernel().is_none() {
        eprintln!("SKIPPED: bf16 on this CPU (it has neither AMX-BF16 nor AVX512-BF16)");
        return None;
    }
    Some(EngineOptions {
        precision: Some(kiln_engine::Precision::Bf16),
        ..Default::default()
    })
}

/// bf16 on the CPU (weights and products in bf16 with f32 sums, activations f32), one velocity:
/// bf16 keeps ~3 significant digits, so closeness to the f32 reference is checked.
#[test]
fn bf16_precision_stays_close_to_f32_reference() {
    let Some(options) = bf16_options() else {
        return;
    };
    let r = Reference::load("dev");
    let p = Flux1Pipeline::load(&fixtures().join("dev-diffusers"), &options, &mut |_| {}).unwrap();
    assert!(p.describe().contains("BF16"), "{}", p.describe());
    let text = p
        .encode_prompt(r.json["prompt"].as_str().unwrap(), 512)
        .unwrap();
    let v = p
        .velocity(r.t("latents_in"), 1.0, guidance(&r), &text, 40, 24)
        .unwrap();
    let err = max_abs(&v, r.t("noise_pred_0"));
    let scale = max_abs_of(r.t("noise_pred_0"));
    eprintln!("bf16 velocity error {err} (|velocity| max {scale})");
    assert!(err <= 0.05 * scale, "bf16 velocity error {err}");
}

/// A fixture's reference and its diffusers-layout checkpoint loaded with `options`.
fn reference_and_pipeline(config: &str, options: &EngineOptions) -> (Reference, Flux1Pipeline) {
    let dir = fixtures().join(format!("{config}-diffusers"));
    let p = Flux1Pipeline::load(&dir, options, &mut |_| {}).unwrap();
    (Reference::load(config), p)
}

/// The tolerance of kiln's bf16: over a whole generation from the reference's initial latents,
/// its error against the f32 reference is at most 1.25x diffusers' own bf16 error on the CPU
/// (`final_latents_bf16_cpu`, stored by `tools/reference/bf16_parity.py --store`).
#[test]
fn bf16_generations_err_no_more_than_diffusers_bf16() {
    let Some(options) = bf16_options() else {
        return;
    };
    for config in ["dev", "schnell"] {
        let (r, p) = reference_and_pipeline(config, &options);
        let req = PipelineRequest {
            prompt: r.json["prompt"].as_str().unwrap().to_string(),
            width: r.u32("width"),
            height: r.u32("height"),
            steps: None,
            guidance: None,
            seed: 0,
            max_sequence_length: None,
            initial_latents: Some(
                kiln_engine::read_latents(
                    &fixtures().join(format!("{config}-latents-in.safetensors")),
                )
                .unwrap(),
            ),
            preview_interval: 0,
        };
        let out = p.run(&req, &[], &mut ()).unwrap();
        let want = r.t("final_latents");
        let ours = max_abs(&out.final_latents, want);
        let theirs = max_abs(r.t("final_latents_bf16_cpu"), want);
        eprintln!(
            "{config}: bf16 error kiln {ours}, diffusers {theirs} (ratio {})",
            ours / theirs
        );
        assert!(
            ours <= 1.25 * theirs,
            "{config}: kiln {ours} vs diffusers {theirs}"
        );
    }
}

/// The VAE in bf16 (its 3x3 convolutions by Winograd on the CPU's bf16 products, its attention's
/// projections packed in bf16): decoding the f32 reference's final latents, kiln's mean pixel
/// error against the f32 reference's image is at most 1.25x that of diffusers' bf16 VAE on the
/// same latents (`image_bf16_cpu`, from `tools/reference/bf16_parity.py --store`), and its
/// largest at most one level over diffusers' largest (pixels are whole levels, so a ratio of
/// maxima of 1 or 2 levels says little).
#[test]
fn bf16_decode_errs_no_more_than_diffusers_bf16_vae() {
    let Some(options) = bf16_options() else {
        return;
    };
    for config in ["dev", "schnell"] {
        let (r, p) = reference_and_pipeline(config, &options);
        let image = p
            .decode(r.t("final_latents"), r.u32("width"), r.u32("height"))
            .unwrap();
        let pixels = |name: &str| r.t(name).flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let want = pixels("image");
        let errors = |got: &[u8]| {
            let mean = got
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b) as f64)
                .sum::<f64>()
                / want.len() as f64;
            (mean, max_pixel_diff(got, &want))
        };
        let (ours, theirs) = (errors(&image.pixels), errors(&pixels("image_bf16_cpu")));
        eprintln!(
            "{config}: bf16 decode (mean, max) pixel error kiln {ours:?}, diffusers {theirs:?}"
        );
        assert!(
            ours.0 <= 1.25 * theirs.0,
            "{config}: mean {ours:?} vs {theirs:?}"
        );
        assert!(
            ours.1 <= theirs.1 + 1,
            "{config}: max {ours:?} vs {theirs:?}"
        );
    }
}
