//! The engines as the worker drives them, on the tiny fixtures: defaults, raw mode, seeds,
//! previews, interruption, errors (FLUX.1, then FLUX.2 klein).

use kiln_core::engine::{Engine, EngineError, StepEvent, StepObserver};
use kiln_core::image_file::encode_image;
use kiln_core::params::{
    GenerationParams, ImageSize, OutputFormat, OutputSize, Prompt, RouteOptions,
};
use kiln_engine::flux2::{TokenChoice, EXPANSION_MAX_NEW_TOKENS, EXPANSION_TEMPERATURE};
use kiln_engine::{CheckpointFiles, Error, Flux1Engine, Flux2Engine, ModelConfig, RawModeConfig};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn config(checkpoint: &str) -> ModelConfig {
    ModelConfig::new(fixture(checkpoint))
}

fn params(seed: u32) -> GenerationParams {
    GenerationParams {
        prompt: Prompt::parse("a lighthouse in a storm", 1000).unwrap(),
        size: OutputSize::Pixels(ImageSize {
            width: 32,
            height: 16,
        }),
        seed,
        num_inference_steps: None,
        guidance_scale: None,
        output_format: OutputFormat::Png,
        options: RouteOptions::Flux11Pro { raw: false },
        reference_images: Vec::new(),
    }
}

/// Records steps and previews; stops after `stop_after` steps if set.
#[derive(Default)]
struct Recorder {
    steps: Vec<(u32, u32)>,
    previews: Vec<(u32, u32, u32)>,
    stop_after: Option<u32>,
}

impl StepObserver for Recorder {
    fn on_step(&mut self, e: StepEvent<'_>) -> ControlFlow<()> {
        self.steps.push((e.step, e.total));
        if let Some(p) = e.preview {
            assert_eq!(p.pixels.len(), (p.width * p.height * 3) as usize);
            self.previews.push((e.step, p.width, p.height));
        }
        match self.stop_after {
            Some(n) if e.step >= n => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    }
}

#[test]
fn defaults_steps_previews_and_reproducible_seeds() {
    let mut cfg = config("schnell-diffusers");
    cfg.preview_interval = Some(1);
    let mut loaded = Vec::new();
    let engine = Flux1Engine::load(cfg, &mut |p| loaded.push(p.component)).unwrap();
    for c in [
        "tokenizers",
        "text_encoder",
        "text_encoder_2",
        "transformer",
        "vae",
    ] {
        assert!(loaded.contains(&c), "no progress for {c}: {loaded:?}");
    }
    assert!(
        engine
            .describe()
            .contains("FLUX.1 schnell, diffusers layout"),
        "{}",
        engine.describe()
    );

    let mut rec = Recorder::default();
    let a = engine.generate(&params(7), &[], &mut rec).unwrap();
    assert_eq!(a.applied.num_inference_steps, 4, "schnell's default");
    assert_eq!(a.applied.guidance, None);
    assert_eq!(rec.steps, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    // Latent-resolution previews (VAE scale 4) on every step but the last.
    assert_eq!(rec.previews, vec![(1, 8, 4), (2, 8, 4), (3, 8, 4)]);
    assert_eq!((a.image.width, a.image.height), (32, 16));

    let b = engine
        .generate(&params(7), &[], &mut Recorder::default())
        .unwrap();
    assert_eq!(a.image, b.image, "same seed, same device: same pixels");
    assert_eq!(
        encode_image(&a.image, OutputFormat::Png).unwrap(),
        encode_image(&b.image, OutputFormat::Png).unwrap()
    );
    let c = engine
        .generate(&params(8), &[], &mut Recorder::default())
        .unwrap();
    assert_ne!(a.image, c.image, "another seed, another image");
}

/// A CUDA device in a build without CUDA is refused when the checkpoint loads, saying how to
/// get one, before any weights are read.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_cuda_device_without_cuda_is_refused_at_load() {
    let mut cfg = config("schnell-diffusers");
    cfg.device = Some(kiln_engine::DeviceSpec::Cuda(0));
    let err = match Flux1Engine::load(cfg, &mut |_| {}) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("loaded on CUDA without CUDA"),
    };
    assert!(
        err.contains("device cuda:0") && err.contains("--features cuda"),
        "{err}"
    );
}

#[test]
fn configuration_deserializes_with_defaults() {
    let cfg: ModelConfig = serde_json::from_value(serde_json::json!({
        "checkpoint": "/models/flux1-dev",
        "device": "cuda:1",
        "raw": { "guidance": 2.0 },
    }))
    .unwrap();
    assert_eq!(cfg.device, Some(kiln_engine::DeviceSpec::Cuda(1)));
    // The family's interval (4 for FLUX.1) unless the operator sets one.
    assert_eq!(cfg.preview_interval, None);
    assert_eq!(cfg.raw.unwrap().guidance, Some(2.0));
    let bad = serde_json::from_value::<ModelConfig>(
        serde_json::json!({ "checkpoint": "x", "device": "tpu" }),
    );
    assert!(bad
        .unwrap_err()
        .to_string()
        .contains("expected cpu, cuda or cuda:N"));
}

#[test]
fn observer_break_interrupts() {
    let engine = Flux1Engine::load(config("schnell-diffusers"), &mut |_| {}).unwrap();
    let mut rec = Recorder {
        stop_after: Some(2),
        ..Default::default()
    };
    let err = engine.generate(&params(1), &[], &mut rec).unwrap_err();
    assert!(matches!(err, EngineError::Interrupted), "{err:?}");
    assert_eq!(rec.steps.len(), 2);
}

/// Asks to stop at once: between phases, not at a step.
struct StopNow {
    asked: u32,
    steps: u32,
}

impl StepObserver for StopNow {
    fn on_step(&mut self, _: StepEvent<'_>) -> ControlFlow<()> {
        self.steps += 1;
        ControlFlow::Continue(())
    }
    fn stop_requested(&mut self) -> bool {
        self.asked += 1;
        true
    }
}

#[test]
fn a_stop_is_honoured_before_the_first_phase_ends() {
    let engine = Flux1Engine::load(config("schnell-diffusers"), &mut |_| {}).unwrap();
    let mut stop = StopNow { asked: 0, steps: 0 };
    let err = engine.generate(&params(1), &[], &mut stop).unwrap_err();
    assert!(matches!(err, EngineError::Interrupted), "{err:?}");
    assert_eq!(
        (stop.asked, stop.steps),
        (1, 0),
        "stopped before encoding the prompt"
    );
}

#[test]
fn sizes_must_fit_the_vae() {
    let engine = Flux1Engine::load(config("schnell-diffusers"), &mut |_| {}).unwrap();
    let mut p = params(1);
    p.size = OutputSize::Pixels(ImageSize {
        width: 36,
        height: 16,
    });
    let err = engine
        .generate(&p, &[], &mut Recorder::default())
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidInput(m) if m.contains("multiples of 8")),
        "{err:?}"
    );
}

#[test]
fn configured_defaults_and_raw_mode_are_applied_and_reported() {
    let mut cfg = config("schnell-diffusers");
    cfg.steps = Some(3);
    cfg.raw = Some(RawModeConfig {
        checkpoint: Some(fixture("dev-diffusers")),
        steps: Some(2),
        guidance: Some(2.5),
        description: Some("documented in the model card".into()),
    });
    let engine = Flux1Engine::load(cfg, &mut |_| {}).unwrap();
    assert!(
        engine.describe().contains("raw mode: FLUX.1 dev"),
        "{}",
        engine.describe()
    );

    let normal = engine
        .generate(&params(3), &[], &mut Recorder::default())
        .unwrap();
    assert_eq!(
        normal.applied.num_inference_steps, 3,
        "configured default steps"
    );

    let mut raw = params(3);
    raw.options = RouteOptions::Flux11Pro { raw: true };
    raw.size = OutputSize::Pixels(ImageSize {
        width: 16,
        height: 16,
    });
    let out = engine
        .generate(&raw, &[], &mut Recorder::default())
        .unwrap();
    assert_eq!(out.applied.num_inference_steps, 2);
    assert_eq!(
        out.applied.guidance,
        Some(2.5),
        "the raw checkpoint is dev and takes guidance"
    );
    let notes = out.applied.notes.join("; ");
    assert!(
        notes.contains("raw mode: checkpoint")
            && notes.contains("steps 2")
            && notes.contains("guidance 2.5"),
        "{notes}"
    );
    assert!(notes.contains("documented in the model card"), "{notes}");

    // A request's own values win over raw mode's.
    raw.num_inference_steps = Some(1);
    let out = engine
        .generate(&raw, &[], &mut Recorder::default())
        .unwrap();
    assert_eq!(out.applied.num_inference_steps, 1);
}

#[test]
fn raw_without_configuration_is_noted() {
    let engine = Flux1Engine::load(config("schnell-diffusers"), &mut |_| {}).unwrap();
    let mut p = params(2);
    p.options = RouteOptions::Flux11Pro { raw: true };
    p.num_inference_steps = Some(1);
    p.guidance_scale = Some(5.0);
    let out = engine.generate(&p, &[], &mut Recorder::default()).unwrap();
    let notes = out.applied.notes.join("; ");
    assert!(notes.contains("raw mode requested"), "{notes}");
    assert!(notes.contains("guidance ignored"), "{notes}");
}

#[test]
fn unsupported_directories_are_refused_clearly() {
    let empty = tempfile::tempdir().unwrap();
    let err = CheckpointFiles::detect(empty.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Checkpoint { message, .. } if message.contains("no checkpoint found")),
        "{err}"
    );

    let flux2 = tempfile::tempdir().unwrap();
    std::fs::write(
        flux2.path().join("model_index.json"),
        r#"{"_class_name": "Flux2Pipeline"}"#,
    )
    .unwrap();
    let err = CheckpointFiles::detect(flux2.path()).unwrap_err();
    assert!(err.to_string().contains("not a FLUX.1"), "{err}");

    let half = tempfile::tempdir().unwrap();
    std::fs::write(half.path().join("flux1-dev.safetensors"), b"").unwrap();
    let err = CheckpointFiles::detect(half.path()).unwrap_err();
    assert!(err.to_string().contains("ae.safetensors"), "{err}");
}

#[test]
fn latents_round_trip_through_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("l.safetensors");
    let t =
        kiln_engine::sampling::pack(&kiln_engine::sampling::noise(5, 16, 4, 6).unwrap()).unwrap();
    kiln_engine::write_latents(&path, &t).unwrap();
    let back = kiln_engine::read_latents(&path).unwrap();
    assert_eq!(back.to_vec3::<f32>().unwrap(), t.to_vec3::<f32>().unwrap());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn checkpoint_settings_give_defaults_and_a_maximum_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    copy_dir(&fixture("schnell-diffusers"), &dir);
    edit_json(&dir.join("model_index.json"), |v| {
        v["_kiln"] = serde_json::json!({
            "steps": 2,
            "max_pixels": 256,
            "description": "a test model",
        });
    });
    edit_json(&dir.join("tokenizer_2/tokenizer_config.json"), |v| {
        v["model_max_length"] = 32.into();
    });
    let engine = Flux1Engine::load(ModelConfig::new(&dir), &mut |_| {}).unwrap();
    assert_eq!(engine.pipeline().defaults().steps, 2);
    assert_eq!(engine.pipeline().defaults().max_sequence_length, 32);

    // 32x16 is over 256 pixels: generated at 16x8 (VAE scale 4, multiples of 8), upscaled.
    let mut rec = Recorder::default();
    let big = engine.generate(&params(3), &[], &mut rec).unwrap();
    assert_eq!(big.applied.num_inference_steps, 2);
    assert_eq!(rec.steps, vec![(1, 2), (2, 2)]);
    assert_eq!((big.image.width, big.image.height), (32, 16));
    let notes = big.applied.notes.join("; ");
    assert!(notes.contains("generated at 16x8"), "{notes}");
    assert!(notes.contains("upscaled to 32x16"), "{notes}");
    assert!(notes.contains("max_sequence_length 32"), "{notes}");
    assert_eq!(big.applied.notes[0], "a test model");
    assert!(
        engine.describe().ends_with(": a test model"),
        "{}",
        engine.describe()
    );

    // The same seed at 16x8 itself: no upscaling, and the same picture at a quarter the pixels
    // (the mean colour within a few levels).
    let mut p = params(3);
    p.size = OutputSize::Pixels(ImageSize {
        width: 16,
        height: 8,
    });
    let small = engine.generate(&p, &[], &mut Recorder::default()).unwrap();
    assert!(!small.applied.notes.join("; ").contains("upscaled"));
    assert_eq!((small.image.width, small.image.height), (16, 8));
    let mean = |px: &[u8]| px.iter().map(|&v| v as f64).sum::<f64>() / px.len() as f64;
    assert!((mean(&small.image.pixels) - mean(&big.image.pixels)).abs() < 4.0);
}

#[test]
fn malformed_checkpoint_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    copy_dir(&fixture("schnell-diffusers"), &dir);
    edit_json(&dir.join("model_index.json"), |v| {
        v["_kiln"] = serde_json::json!({ "max_pixel": 256 });
    });
    let err = CheckpointFiles::detect(&dir).unwrap_err();
    assert!(err.to_string().contains("_kiln"), "{err}");
}

#[test]
fn engine_applies_klein_defaults_and_says_what_it_ignored() {
    let engine =
        Flux2Engine::load(ModelConfig::new(fixture("klein-diffusers")), &mut |_| {}).unwrap();
    assert!(engine.describe().starts_with("FLUX.2 klein (distilled)"));
    let mut rec = Recorder::default();
    let plain = engine.generate(&params(3), &[], &mut rec).unwrap();
    assert_eq!(plain.applied.num_inference_steps, 4);
    assert_eq!(plain.applied.guidance, None);
    assert_eq!((plain.image.width, plain.image.height), (32, 16));
    assert_eq!(
        rec.previews.len(),
        3,
        "a preview after every step but the last"
    );

    let asked = GenerationParams {
        guidance_scale: Some(5.0),
        ..params(3)
    };
    let out = engine
        .generate(&asked, &[], &mut Recorder::default())
        .unwrap();
    // Guidance does not reach a distilled model, so the image is the plain one.
    assert_eq!(out.image.pixels, plain.image.pixels);
    let notes = out.applied.notes.join("\n");
    assert!(notes.contains("guidance ignored"), "{notes}");

    // Prompt expansion: the text encoder rewrites the prompt (sampled from the request's
    // seed), the image is made from the rewrite, and the result shows it.
    let expand = GenerationParams {
        options: RouteOptions::Flux2Flex {
            enable_prompt_expansion: true,
        },
        ..params(3)
    };
    let expanded = engine
        .generate(&expand, &[], &mut Recorder::default())
        .unwrap();
    let again = engine
        .generate(&expand, &[], &mut Recorder::default())
        .unwrap();
    assert_eq!(expanded.image.pixels, again.image.pixels);
    assert_ne!(expanded.image.pixels, plain.image.pixels);
    let rewrite = engine
        .pipeline()
        .model()
        .rewrite_prompt(
            "a lighthouse in a storm",
            EXPANSION_MAX_NEW_TOKENS,
            TokenChoice::Sampled {
                temperature: EXPANSION_TEMPERATURE,
                seed: 3,
            },
            &mut || false,
        )
        .unwrap()
        .unwrap();
    // A stop asked for mid-expansion is honoured at the next token, not after all of them.
    let mut asked = 0;
    let stopped = engine.pipeline().model().rewrite_prompt(
        "a lighthouse in a storm",
        EXPANSION_MAX_NEW_TOKENS,
        TokenChoice::Greedy,
        &mut || {
            asked += 1;
            asked > 3
        },
    );
    assert!(
        matches!(stopped, Err(kiln_engine::Error::Interrupted)),
        "{stopped:?}"
    );
    assert_eq!(asked, 4, "three tokens written, stopped before the fourth");
    assert_eq!(expanded.applied.prompt, rewrite.text.trim());
    let notes = expanded.applied.notes.join("\n");
    assert!(
        notes.contains("prompt expanded by the text encoder")
            && notes.contains("the original: a lighthouse in a storm"),
        "{notes}"
    );

    // A deployment that turns expansion off draws the prompt as given, and says so.
    let off = Flux2Engine::load(
        ModelConfig {
            prompt_expansion: Some(false),
            ..ModelConfig::new(fixture("klein-diffusers"))
        },
        &mut |_| {},
    )
    .unwrap();
    let unexpanded = off
        .generate(&expand, &[], &mut Recorder::default())
        .unwrap();
    assert_eq!(unexpanded.image.pixels, plain.image.pixels);
    assert_eq!(unexpanded.applied.prompt, "a lighthouse in a storm");
    assert!(
        unexpanded
            .applied
            .notes
            .iter()
            .any(|n| n.contains("prompt expansion is turned off")),
        "{:?}",
        unexpanded.applied.notes
    );

    // An edit: a reference image conditions the same request.
    let reference = kiln_core::engine::RgbImage {
        width: 64,
        height: 64,
        pixels: (0..64 * 64 * 3).map(|i| (i * 7 % 256) as u8).collect(),
    };
    let edited = engine
        .generate(
            &params(3),
            std::slice::from_ref(&reference),
            &mut Recorder::default(),
        )
        .unwrap();
    assert_ne!(edited.image.pixels, plain.image.pixels);
    assert!(
        edited
            .applied
            .notes
            .iter()
            .any(|n| n == "1 reference image(s)"),
        "{:?}",
        edited.applied.notes
    );

    // `image_size: "auto"`: the first reference's size.
    let auto = GenerationParams {
        size: OutputSize::FirstReference,
        ..params(3)
    };
    let square = GenerationParams {
        size: OutputSize::Pixels(ImageSize {
            width: 64,
            height: 64,
        }),
        ..params(3)
    };
    let explicit = engine
        .generate(
            &square,
            std::slice::from_ref(&reference),
            &mut Recorder::default(),
        )
        .unwrap();
    let same = engine
        .generate(&auto, &[reference], &mut Recorder::default())
        .unwrap();
    assert_eq!((same.image.width, same.image.height), (64, 64));
    assert_eq!(same.image.pixels, explicit.image.pixels);
    // A reference of any shape keeps "auto" within the route's sizes (sides 64 to 2048).
    let strip = kiln_core::engine::RgbImage {
        width: 2064,
        height: 16,
        pixels: vec![128; 2064 * 16 * 3],
    };
    let fitted = engine
        .generate(&auto, &[strip], &mut Recorder::default())
        .unwrap();
    assert_eq!((fitted.image.width, fitted.image.height), (2048, 64));
    let notes = fitted.applied.notes.join("; ");
    assert!(notes.contains("brought to 2048x64"), "{notes}");
    // A reference whose sides are not multiples of the size multiple (4 for this tiny VAE, 16
    // for FLUX.2's) is centre-cropped, and says so. (Larger than a
    // megapixel, it would first be scaled down, which the pipeline's unit tests check: this
    // tiny VAE's attention at that size would take minutes.)
    let odd_reference = kiln_core::engine::RgbImage {
        width: 70,
        height: 50,
        pixels: (0..70 * 50 * 3).map(|i| (i % 253) as u8).collect(),
    };
    let sized = engine
        .generate(&auto, &[odd_reference], &mut Recorder::default())
        .unwrap();
    // 48 pixels is below the route's smallest side (64): raised, the aspect ratio kept.
    assert_eq!((sized.image.width, sized.image.height), (88, 64));
    let notes = sized.applied.notes.join("\n");
    assert!(
        notes.contains("reference image 1 centre-cropped from 70x50 to 68x48")
            && notes.contains("image size 68x48 from the first reference image")
            && notes.contains("brought to 88x64"),
        "{notes}"
    );
    assert!(matches!(
        engine.generate(&auto, &[], &mut Recorder::default()),
        Err(EngineError::InvalidInput(_))
    ));

    let odd = GenerationParams {
        size: OutputSize::Pixels(ImageSize {
            width: 30,
            height: 16,
        }),
        ..params(3)
    };
    assert!(matches!(
        engine.generate(&odd, &[], &mut Recorder::default()),
        Err(EngineError::InvalidInput(_))
    ));
}
