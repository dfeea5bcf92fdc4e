//! FLUX.2 on the tiny random klein-like and dev-like pipelines made by
//! `tools/reference/make_flux2_fixtures.py`: numerics against what diffusers'
//! Flux2KleinPipeline and Flux2Pipeline computed on them, previews and interruption.

use kiln_core::engine::{StepEvent, StepObserver};
use kiln_engine::flux2::sampling::pack_channels_last;
use kiln_engine::flux2::{Flux2Variant, TokenChoice, EXPANSION_TEMPERATURE};
use kiln_engine::{Flux2Pipeline, PipelineRequest};
use std::ops::ControlFlow;

mod common;
use candle_core::quantized::GgmlDType;
use common::{
    f32_options, fixtures, max_abs, max_abs_of, max_pixel_diff, quantize_to_gguf, Reference, TOL,
};
use std::path::{Path, PathBuf};

fn prompt(r: &Reference) -> &str {
    r.json["prompt"].as_str().unwrap()
}

fn load(config: &str) -> Flux2Pipeline {
    Flux2Pipeline::load(
        &fixtures().join(format!("{config}-diffusers")),
        &f32_options(),
        &mut |_| {},
    )
    .unwrap()
}

/// The reference run's prompt, size and initial latents, with `steps` and `guidance`.
fn reference_request(r: &Reference, steps: Option<u32>, guidance: Option<f32>) -> PipelineRequest {
    PipelineRequest {
        prompt: prompt(r).to_string(),
        width: r.u32("width"),
        height: r.u32("height"),
        steps,
        guidance,
        seed: 0,
        max_sequence_length: None,
        initial_latents: Some(pack_channels_last(r.t("latents_in")).unwrap()),
        preview_interval: 0,
    }
}

fn guidance(r: &Reference) -> Option<f32> {
    r.json["guidance"].as_f64().map(|g| g as f32)
}

#[test]
fn klein_matches_diffusers() {
    let p = load("klein");
    assert_eq!(p.model().variant(), Flux2Variant::Klein { distilled: true });
    assert_eq!(p.defaults().steps, 4);
    assert_matches_reference("klein", &p, None);
}

/// FLUX.2 in bf16 on the CPU (weights and products bf16, f32 sums and activations): every
/// stage close to the f32 reference, within these stated tolerances (bf16 keeps ~3
/// significant digits): text embeddings and velocity within 2% of their largest value, final
/// latents within 2% of theirs, the image within 8 levels of 255.
#[test]
fn klein_in_bf16_stays_close_to_the_f32_reference() {
    if kiln_engine::cpu_bf16_kernel().is_none() {
        eprintln!("SKIPPED: bf16 on this CPU (it has neither AMX-BF16 nor AVX512-BF16)");
        return;
    }
    let options = kiln_engine::EngineOptions {
        precision: Some(kiln_engine::Precision::Bf16),
        ..Default::default()
    };
    let dir = fixtures().join("klein-diffusers");
    let p = Flux2Pipeline::load(&dir, &options, &mut |_| {}).unwrap();
    assert!(p.describe().contains("BF16"), "{}", p.describe());
    let r = Reference::load("klein");
    let e = measure("klein", &p, None);
    let scale = |name: &str| max_abs_of(r.t(name));
    eprintln!("klein bf16: {e:?}");
    assert!(e.embeds <= 0.02 * scale("prompt_embeds_valid"), "{e:?}");
    assert!(e.velocity <= 0.02 * scale("noise_pred_0"), "{e:?}");
    assert!(e.final_latents <= 0.02 * scale("final_latents"), "{e:?}");
    assert!(e.image <= 8, "{e:?}");
}

/// A folder linking the klein fixture's parts but `except`, which the caller provides.
fn klein_except(except: &str) -> tempfile::TempDir {
    let src = fixtures().join("klein-diffusers");
    let dir = tempfile::tempdir().unwrap();
    for part in [
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "model_index.json",
    ] {
        if part != except {
            std::os::unix::fs::symlink(src.join(part), dir.path().join(part)).unwrap();
        }
    }
    dir
}

/// A klein folder whose `transformer/` holds only `file` (BFL's names, no config.json).
fn klein_with_bfl_transformer(file: &Path) -> tempfile::TempDir {
    let dir = klein_except("transformer");
    let tdir = dir.path().join("transformer");
    std::fs::create_dir(&tdir).unwrap();
    std::os::unix::fs::symlink(file, tdir.join(file.file_name().unwrap())).unwrap();
    dir
}

fn bfl_transformer_file() -> PathBuf {
    fixtures().join("klein-bfl/flux2-tiny-klein.safetensors")
}

#[test]
fn klein_bfl_transformer_matches_diffusers() {
    let dir = klein_with_bfl_transformer(&bfl_transformer_file());
    let p = Flux2Pipeline::load(dir.path(), &f32_options(), &mut |_| {}).unwrap();
    assert!(
        p.describe().contains("BFL-named transformer"),
        "{}",
        p.describe()
    );
    // The configuration is read from the tensors: the same as diffusers' config.json.
    assert_eq!(
        p.model().transformer_config(),
        load("klein").model().transformer_config()
    );
    assert_matches_reference("klein", &p, None);
}

/// Q8_0 (quantized by candle from the BFL file, as city96-style GGUFs keep BFL's names):
/// within 1.5% of the velocity's largest value for one call and 2/255 per pixel after all
/// steps, as for FLUX.1. Measured: 1.11%, 2/255.
#[test]
fn klein_gguf_q8_0_transformer_stays_close() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("flux2-tiny-klein-Q8_0.gguf");
    let quantized = quantize_to_gguf(&bfl_transformer_file(), GgmlDType::Q8_0, &file);
    assert!(!quantized.is_empty());
    let dir = klein_with_bfl_transformer(&file);
    let p = Flux2Pipeline::load(dir.path(), &f32_options(), &mut |_| {}).unwrap();
    assert!(
        p.describe().contains("GGUF Q8_0 transformer"),
        "{}",
        p.describe()
    );
    let e = measure("klein", &p, None);
    let scale = max_abs_of(Reference::load("klein").t("noise_pred_0"));
    eprintln!(
        "{} tensors quantized; velocity error {:.2}% of the largest value",
        quantized.len(),
        100.0 * e.velocity / scale
    );
    assert!(e.embeds <= TOL, "the text encoder is not quantized: {e:?}");
    assert!(e.velocity <= 0.015 * scale, "Q8_0 transformer: {e:?}");
    assert!(e.image <= 2, "Q8_0 image: {e:?}");
}

#[test]
fn dev_matches_diffusers() {
    let p = load("flux2-dev");
    assert_eq!(p.model().variant(), Flux2Variant::Dev);
    assert_eq!(p.defaults().guidance, Some(4.0));
    assert_matches_reference("flux2-dev", &p, Some(4.0));
}

/// Measured errors of a checkpoint against the reference run.
#[derive(Debug)]
struct Errors {
    embeds: f32,
    padding_rows: f32,
    sigmas: f32,
    velocity: f32,
    final_latents: f32,
    image: u8,
}

/// Every stage at the f32 tolerance.
fn assert_matches_reference(config: &str, p: &Flux2Pipeline, applied_guidance: Option<f32>) {
    let e = measure(config, p, applied_guidance);
    assert!(
        e.embeds <= TOL && e.padding_rows <= TOL,
        "text encoder: {e:?}"
    );
    assert!(e.sigmas <= 1e-6, "schedule: {e:?}");
    assert!(e.velocity <= TOL, "transformer: {e:?}");
    assert!(e.final_latents <= TOL, "final latents: {e:?}");
    assert!(e.image <= 2, "image: {e:?}");
}

/// Every stage against the reference run of `config`; `applied_guidance` is what the run
/// reports (klein's distilled model takes none, dev embeds it).
fn measure(config: &str, p: &Flux2Pipeline, applied_guidance: Option<f32>) -> Errors {
    let r = Reference::load(config);
    let (w, h) = (r.u32("width"), r.u32("height"));
    let max_len = r.u32("max_sequence_length") as usize;
    assert_eq!(
        p.model().chat_text(prompt(&r)),
        r.json["chat_text"].as_str().unwrap()
    );

    // Text: the chat-framed ids, and the stacked hidden states of the prompt's rows and of
    // the first padding rows (which attend to the prompt only).
    let text = p.encode_prompt(prompt(&r), max_len).unwrap();
    assert_eq!(text.ids, r.ids("input_ids"), "text token ids");
    let valid = r.u32("valid_tokens") as usize;
    assert_eq!(text.valid, valid);
    let embeds_err = max_abs(
        &text.embeds.narrow(1, 0, valid).unwrap(),
        r.t("prompt_embeds_valid"),
    );
    let pad_err = max_abs(
        &text.embeds.narrow(1, valid, 4).unwrap(),
        r.t("prompt_embeds_pad_rows"),
    );

    // The empirical-mu schedule.
    let steps = r.u32("steps") as usize;
    let tokens = r.t("latents_in").dims()[2] * r.t("latents_in").dims()[3];
    let want_sigmas: Vec<f32> = r.json["sigmas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap() as f32)
        .collect();
    let sigmas = p.model().schedule_sigmas(steps, tokens);
    assert_eq!(sigmas.len(), want_sigmas.len());
    let sigma_err = sigmas
        .iter()
        .zip(&want_sigmas)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);

    // One transformer call at the first noise level.
    let packed = pack_channels_last(r.t("latents_in")).unwrap();
    let v = p
        .velocity(&packed, want_sigmas[0], guidance(&r), &text, w, h)
        .unwrap();
    let velocity_err = max_abs(&v, r.t("noise_pred_0"));

    // The whole run with the reference's initial latents, steps and guidance.
    let req = reference_request(&r, Some(steps as u32), guidance(&r));
    let out = p.run(&req, &[], &mut ()).unwrap();
    assert_eq!(out.applied.num_inference_steps, steps as u32);
    assert_eq!(out.applied.guidance, applied_guidance);
    // Flux2Pipeline returns the packed latents as the sampler left them, Flux2KleinPipeline
    // denormalised and un-patchified ones.
    let final_latents = if r.t("final_latents").rank() == 3 {
        out.final_latents.clone()
    } else {
        p.unpack_latents(&out.final_latents, w, h).unwrap()
    };
    let final_err = max_abs(&final_latents, r.t("final_latents"));
    let want_px = r.t("image").flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!((out.image.width, out.image.height), (w, h));
    let image_err = max_pixel_diff(&out.image.pixels, &want_px);
    let e = Errors {
        embeds: embeds_err,
        padding_rows: pad_err,
        sigmas: sigma_err,
        velocity: velocity_err,
        final_latents: final_err,
        image: image_err,
    };
    eprintln!("{config} {}: {e:?}", p.describe());
    e
}

/// Collects previews; stops after `stop_after` steps if set.
struct Watch {
    previews: Vec<(u32, u32, u32)>,
    stop_after: Option<u32>,
}
impl StepObserver for Watch {
    fn on_step(&mut self, e: StepEvent<'_>) -> ControlFlow<()> {
        if let Some(p) = e.preview {
            self.previews.push((e.step, p.width, p.height));
        }
        match self.stop_after {
            Some(n) if e.step >= n => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    }
}

#[test]
fn klein_previews_at_latent_resolution_and_stops_when_asked() {
    let p = load("klein");
    let req = PipelineRequest {
        prompt: "a lighthouse".into(),
        width: 32,
        height: 48,
        steps: None,
        guidance: None,
        seed: 7,
        max_sequence_length: Some(64),
        initial_latents: None,
        preview_interval: 1,
    };
    let mut watch = Watch {
        previews: Vec::new(),
        stop_after: None,
    };
    let out = p.run(&req, &[], &mut watch).unwrap();
    // 4 steps, a preview after each but the last, one pixel per un-patchified latent pixel.
    assert_eq!(watch.previews, vec![(1, 16, 24), (2, 16, 24), (3, 16, 24)]);
    // Seeded noise: the same seed gives the same image.
    let again = p.run(&req, &[], &mut ()).unwrap();
    assert_eq!(out.image.pixels, again.image.pixels);

    let mut stop = Watch {
        previews: Vec::new(),
        stop_after: Some(2),
    };
    assert!(matches!(
        p.run(&req, &[], &mut stop),
        Err(kiln_engine::Error::Interrupted)
    ));
}

/// The same weights declared undistilled (`is_distilled: false`): the base model's true
/// classifier-free guidance against the empty prompt, at its default guidance of 4.
#[test]
fn klein_base_guidance_matches_diffusers() {
    let r = Reference::load("klein");
    let src = fixtures().join("klein-diffusers");
    let dir = klein_except("model_index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap())
            .unwrap();
    index["is_distilled"] = false.into();
    std::fs::write(dir.path().join("model_index.json"), index.to_string()).unwrap();
    let p = Flux2Pipeline::load(dir.path(), &f32_options(), &mut |_| {}).unwrap();
    assert_eq!(
        p.model().variant(),
        Flux2Variant::Klein { distilled: false }
    );

    let (w, h) = (r.u32("width"), r.u32("height"));
    let req = reference_request(&r, Some(r.u32("base_steps")), None);
    let out = p.run(&req, &[], &mut ()).unwrap();
    assert_eq!(
        out.applied.guidance,
        r.json["base_guidance"].as_f64().map(|g| g as f32)
    );
    let final_err = max_abs(
        &p.unpack_latents(&out.final_latents, w, h).unwrap(),
        r.t("base_final_latents"),
    );
    let want_px = r
        .t("base_image")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let image_err = max_pixel_diff(&out.image.pixels, &want_px);
    eprintln!("klein base: final latents {final_err:e}, image {image_err}/255");
    assert!(final_err <= TOL, "final latents");
    assert!(image_err <= 2, "image");
}

/// klein editing a reference image (of another size than the output), as diffusers'
/// Flux2KleinPipeline(image=...) does it.
#[test]
fn klein_edit_with_a_reference_image_matches_diffusers() {
    assert_edit_matches_reference(&load("klein"));
}

fn assert_edit_matches_reference(p: &Flux2Pipeline) {
    let r = Reference::load("klein");
    let (w, h) = (r.u32("width"), r.u32("height"));
    let ref_dims = r.t("ref_image").dims().to_vec();
    let reference = kiln_core::engine::RgbImage {
        width: ref_dims[1] as u32,
        height: ref_dims[0] as u32,
        pixels: r
            .t("ref_image")
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap(),
    };
    let req = reference_request(&r, None, None);
    let out = p.run(&req, &[reference], &mut ()).unwrap();
    let final_err = max_abs(
        &p.unpack_latents(&out.final_latents, w, h).unwrap(),
        r.t("edit_final_latents"),
    );
    let want_px = r
        .t("edit_image")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let image_err = max_pixel_diff(&out.image.pixels, &want_px);
    // The reference moves the tiny random model's final latents by about 0.04 (its image by
    // 2/255): far beyond the tolerance, so the latents show whether it was taken into account.
    let effect = max_abs(r.t("edit_final_latents"), r.t("final_latents"));
    assert!(
        effect > 100.0 * TOL,
        "the reference changes little: {effect}"
    );
    eprintln!("klein edit: final latents {final_err:e}, image {image_err}/255");
    assert!(final_err <= TOL, "final latents");
    assert!(image_err <= 2, "image");
}

/// BFL's single files: the klein transformer in BFL's names and its autoencoder as BFL's
/// `ae.safetensors` (written by `make_flux2_fixtures.py`, its names checked there against
/// diffusers' own conversion), beside the text encoder's and tokenizer's folders, with no
/// `model_index.json` and no scheduler. The tiny model's settings BFL's files cannot carry are
/// in `kiln.json`.
fn klein_bfl_layout(transformer_name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let link = |from: PathBuf, name: &str| {
        std::os::unix::fs::symlink(from, dir.path().join(name)).unwrap()
    };
    link(bfl_transformer_file(), transformer_name);
    link(
        fixtures().join("klein-bfl/ae.safetensors"),
        "ae.safetensors",
    );
    for part in ["text_encoder", "tokenizer"] {
        link(fixtures().join("klein-diffusers").join(part), part);
    }
    std::fs::write(
        dir.path().join("kiln.json"),
        r#"{"text_encoder_out_layers": [1, 2, 3], "autoencoder_norm_groups": 8}"#,
    )
    .unwrap();
    dir
}

#[test]
fn klein_bfl_single_files_match_diffusers() {
    let dir = klein_bfl_layout("flux-2-klein-tiny.safetensors");
    let p = Flux2Pipeline::load(dir.path(), &f32_options(), &mut |_| {}).unwrap();
    assert_eq!(p.model().variant(), Flux2Variant::Klein { distilled: true });
    assert!(
        p.describe()
            .starts_with("FLUX.2 klein (distilled), BFL single files,"),
        "{}",
        p.describe()
    );
    let diffusers = load("klein");
    // Both configurations are read from the tensors: the same as diffusers' config.json files.
    assert_eq!(
        p.model().transformer_config(),
        diffusers.model().transformer_config()
    );
    assert_eq!(p.model().vae_config(), diffusers.model().vae_config());
    assert_matches_reference("klein", &p, None);
    // The encoder's names too (reference images).
    assert_edit_matches_reference(&p);

    // Nothing in klein's weights tells the undistilled base; BFL's file name does.
    let base = klein_bfl_layout("flux-2-klein-base-tiny.safetensors");
    let p = Flux2Pipeline::load(base.path(), &f32_options(), &mut |_| {}).unwrap();
    assert_eq!(
        p.model().variant(),
        Flux2Variant::Klein { distilled: false }
    );

    // A BFL folder without its autoencoder says so.
    std::fs::remove_file(base.path().join("ae.safetensors")).unwrap();
    let err = Flux2Pipeline::load(base.path(), &f32_options(), &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("without ae.safetensors"), "{err}");
}

#[test]
fn a_left_padding_tokenizer_is_refused_by_name() {
    let src = fixtures().join("klein-diffusers/tokenizer");
    let dir = klein_except("tokenizer");
    let tdir = dir.path().join("tokenizer");
    std::fs::create_dir(&tdir).unwrap();
    std::os::unix::fs::symlink(src.join("tokenizer.json"), tdir.join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg["padding_side"] = "left".into();
    std::fs::write(tdir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let err = match Flux2Pipeline::load(dir.path(), &f32_options(), &mut |_| {}) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a left-padding tokenizer was accepted"),
    };
    assert!(err.contains("padding_side"), "{err}");
}

/// Prompt expansion, greedy, against transformers' `generate` on the same chat-framed
/// prompt: the same prompt tokens, the same new tokens one for one, the same text.
#[test]
fn prompt_expansion_matches_transformers_token_for_token() {
    for config in ["klein", "flux2-dev"] {
        let r = Reference::load(config);
        let p = load(config);
        assert!(p.model().can_expand_prompts(), "{config} ships its LM head");
        let chat = p.model().expansion_chat_text(prompt(&r));
        assert_eq!(chat, r.json["expansion_chat_text"].as_str().unwrap());
        assert_eq!(
            p.model().text_ids(&chat).unwrap(),
            r.ids("expansion_prompt_ids"),
            "{config} prompt tokens"
        );
        let max = r.u32("expansion_max_new_tokens") as usize;
        let e = p
            .model()
            .rewrite_prompt(prompt(&r), max, TokenChoice::Greedy, &mut || false)
            .unwrap()
            .unwrap();
        assert_eq!(e.tokens, r.ids("expansion_ids"), "{config} new tokens");
        assert_eq!(e.text, r.json["expansion_text"].as_str().unwrap());
        eprintln!("{config}: {} tokens match", e.tokens.len());
    }
}

/// Sampling at the reference's temperature is seeded: the same seed writes the same tokens.
#[test]
fn sampled_prompt_expansion_is_seeded() {
    let p = load("klein");
    let sampled = |seed| {
        p.model()
            .rewrite_prompt(
                "a lighthouse in a storm",
                32,
                TokenChoice::Sampled {
                    temperature: EXPANSION_TEMPERATURE,
                    seed,
                },
                &mut || false,
            )
            .unwrap()
            .unwrap()
            .tokens
    };
    assert_eq!(sampled(7), sampled(7));
    assert!(!sampled(7).is_empty());
}

/// A checkpoint whose text encoder is the bare model (no `lm_head.weight`, embeddings not
/// tied) encodes prompts as before and says it cannot expand them.
#[test]
fn a_text_encoder_without_its_head_cannot_expand_prompts() {
    let dir = klein_except("text_encoder");
    let src = fixtures().join("klein-diffusers/text_encoder");
    let tdir = dir.path().join("text_encoder");
    std::fs::create_dir(&tdir).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::os::unix::fs::symlink(src.join(f), tdir.join(f)).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(tensors.remove("lm_head.weight").is_some());
    candle_core::safetensors::save(&tensors, tdir.join("model.safetensors")).unwrap();

    let headless = Flux2Pipeline::load(dir.path(), &f32_options(), &mut |_| {}).unwrap();
    assert!(!headless.model().can_expand_prompts());
    assert_eq!(
        headless
            .model()
            .rewrite_prompt("a fox", 8, TokenChoice::Greedy, &mut || false)
            .unwrap(),
        None
    );
    // Encoding reads the same layers as with the head.
    let with_head = load("klein");
    let a = headless.encode_prompt("a fox", 16).unwrap().embeds;
    let b = with_head.encode_prompt("a fox", 16).unwrap().embeds;
    assert_eq!(max_abs(&a, &b), 0.0);
}
