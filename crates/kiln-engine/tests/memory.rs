//! The memory estimate a worker reserves against ([`Engine::job_memory`]) bounds what a real
//! generation takes. Alone in its test binary, so that the process's peak is this test's: it
//! loads a checkpoint, generates once small (every weight page touched), resets the
//! kernel's peak-RSS counter, generates large, and compares the peak's growth with the
//! estimate. Linux only (`/proc/self/clear_refs`); elsewhere it says it was skipped.

use kiln_core::engine::Engine;
use kiln_core::params::{
    GenerationParams, ImageSize, OutputFormat, OutputSize, Prompt, RouteOptions,
};
use kiln_engine::{Flux1Engine, ModelConfig};
use std::path::Path;

fn params(side: u32, steps: u32) -> GenerationParams {
    GenerationParams {
        prompt: Prompt::parse("a red circle on a blue square", 1000).unwrap(),
        size: OutputSize::Pixels(ImageSize {
            width: side,
            height: side,
        }),
        seed: 7,
        num_inference_steps: Some(steps),
        guidance_scale: None,
        output_format: OutputFormat::Png,
        options: RouteOptions::Flux11Pro { raw: false },
        reference_images: Vec::new(),
    }
}

/// A `/proc/self/status` field in bytes (its values are in kB).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn a_generations_memory_stays_within_its_estimate() {
    // Writing 5 resets the peak resident set (VmHWM) to the current one (Linux 4.0 and later).
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        eprintln!("SKIPPED: no /proc/self/clear_refs to reset the peak resident set");
        return;
    }
    // The tiny FLUX.1 fixture: no size limit of its own (the demo checkpoint generates small
    // and upscales), so the decode runs at the full 512x512.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schnell-diffusers");
    let engine = Flux1Engine::load(ModelConfig::new(dir), &mut |_| {}).unwrap();
    engine.generate(&params(64, 1), &[], &mut ()).unwrap();

    let large = params(512, 1);
    let estimate = engine.job_memory(&large, &[]).unwrap();
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_bytes("VmRSS:");
    engine.generate(&large, &[], &mut ()).unwrap();
    let growth = status_bytes("VmHWM:").saturating_sub(before);
    let mib = |b: u64| b >> 20;
    eprintln!(
        "512x512 on the tiny FLUX.1 fixture: the peak grew {} MiB, estimate {} MiB",
        mib(growth),
        mib(estimate)
    );
    assert!(
        growth <= estimate,
        "the generation grew {} MiB, over its estimate of {} MiB",
        mib(growth),
        mib(estimate)
    );
    // An estimate far over the real need would idle a GPU that could take another job.
    assert!(
        growth * 3 >= estimate,
        "the estimate ({} MiB) is over 3x the generation's growth ({} MiB)",
        mib(estimate),
        mib(growth)
    );
}
