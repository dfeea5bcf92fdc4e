//! `kiln generate --model-dir` as one compares it with diffusers: given diffusers' initial
//! latents, the dumped final latents and the image match what diffusers produced for the engine's
//! committed fixture checkpoints (made by `tools/reference/make_fixtures.py` and, for FLUX.2,
//! `make_flux2_fixtures.py`).

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiln-engine/tests/fixtures")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// One fixture's reference run: its settings and diffusers' tensors.
struct Reference {
    json: Value,
    tensors: std::collections::HashMap<String, Tensor>,
}

impl Reference {
    fn load(config: &str) -> Self {
        let fixtures = fixtures();
        let json = serde_json::from_str(
            &std::fs::read_to_string(fixtures.join(format!("{config}-reference.json"))).unwrap(),
        )
        .unwrap();
        let tensors = candle_core::safetensors::load(
            fixtures.join(format!("{config}-reference.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        Self { json, tensors }
    }
}

/// Runs `kiln generate --model-dir` on `config`'s fixture with the reference run's settings
/// and `latents` as the initial noise, writing `out_dir/image.png` and the final latents to
/// `out_dir/latents.safetensors`; returns what it printed on stderr.
fn generate(config: &str, r: &Reference, latents: &Path, out_dir: &Path) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .arg("generate")
        // The references are f32 (the default is bf16 on a CPU with bf16 instructions).
        .args(["--precision", "f32"])
        .arg("--model-dir")
        .arg(fixtures().join(format!("{config}-diffusers")))
        .args(["--prompt", r.json["prompt"].as_str().unwrap()])
        .args(["--width", &r.json["width"].to_string()])
        .args(["--height", &r.json["height"].to_string()])
        .args(["--steps", &r.json["steps"].to_string()])
        .args([
            "--max-sequence-length",
            &r.json["max_sequence_length"].to_string(),
        ])
        .arg("--latents")
        .arg(latents)
        .arg("--dump-latents")
        .arg(out_dir.join("latents.safetensors"))
        .arg("-o")
        .arg(out_dir.join("image.png"));
    if let Some(guidance) = r.json["guidance"].as_f64() {
        command.args(["--guidance", &guidance.to_string()]);
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{config}: {stderr}");
    stderr
}

/// FLUX.1: diffusers' packed `latents=` in; its final latents and image out.
fn generate_like_diffusers(config: &str) {
    let r = Reference::load(config);
    let dir = tempfile::tempdir().unwrap();
    let latents_in = fixtures().join(format!("{config}-latents-in.safetensors"));
    generate(config, &r, &latents_in, dir.path());
    let got = candle_core::safetensors::load(dir.path().join("latents.safetensors"), &Device::Cpu)
        .unwrap();
    let latents_error = max_abs_diff(&got["latents"], &r.tensors["final_latents"]);
    assert!(
        latents_error <= 1e-4,
        "{config}: final latents differ from diffusers by {latents_error}"
    );
    assert_image_matches(&dir.path().join("image.png"), &r.tensors["image"], config);
}

/// FLUX.2: diffusers' `latents=` (patchified, as its FLUX.2 pipelines take them) in, its image
/// out; `variant` is what the loaded checkpoint must say it is.
fn flux2_generate_like_diffusers(config: &str, variant: &str) {
    let r = Reference::load(config);
    let dir = tempfile::tempdir().unwrap();
    let latents_in = dir.path().join("latents-in.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", r.tensors["latents_in"].clone())]),
        &latents_in,
    )
    .unwrap();
    let stderr = generate(config, &r, &latents_in, dir.path());
    assert!(stderr.contains(variant), "{stderr}");
    assert_image_matches(&dir.path().join("image.png"), &r.tensors["image"], config);
}

/// The image kiln wrote is diffusers' `want` (HWC u8) within 2/255 per channel.
fn assert_image_matches(written: &Path, want: &Tensor, what: &str) {
    let image = image::open(written).unwrap().to_rgb8();
    let want_pixels = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!(
        image.as_raw().len(),
        want_pixels.len(),
        "{what}: image size"
    );
    let pixel_error = image
        .as_raw()
        .iter()
        .zip(&want_pixels)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        pixel_error <= 2,
        "{what}: image differs from diffusers by {pixel_error}/255"
    );
}

#[test]
fn dev_checkpoint_reproduces_diffusers_from_its_latents() {
    generate_like_diffusers("dev");
}

#[test]
fn schnell_checkpoint_reproduces_diffusers_from_its_latents() {
    generate_like_diffusers("schnell");
}

#[test]
fn flux2_klein_checkpoint_reproduces_diffusers_from_its_latents() {
    flux2_generate_like_diffusers("klein", "FLUX.2 klein");
}

#[test]
fn flux2_dev_checkpoint_reproduces_diffusers_from_its_latents() {
    flux2_generate_like_diffusers("flux2-dev", "FLUX.2 dev");
}
