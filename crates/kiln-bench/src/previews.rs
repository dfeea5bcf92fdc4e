//! What live previews cost a generation (issue 16: at most 5% of its time).
//!
//! Runs the real FLUX.1 pipeline on the demo checkpoint in this process, at each `--sides`, in
//! three ways, interleaved so that a busy machine's drift hits all three alike:
//! - `off`: no previews (`preview_interval` 0): the baseline;
//! - `kept`: a preview every step (`preview_interval` 1, the worst case; the service's default
//!   is 4), copied by the observer as the worker's does on the engine's thread;
//! - `encoded`: the same, and each preview also scaled to 256 px and encoded as JPEG by the
//!   worker's own [`kiln_worker::encode_preview`], synchronously on the engine's thread: an upper
//!   bound of the worker's side, which encodes at most one preview per heartbeat (one a second),
//!   on another thread.
//!
//! The demo checkpoint caps its generations at 64 x 64 (`_kiln.max_pixels` in its
//! `model_index.json`) and upscales: this benchmark loads a copy without that cap, so that the
//! latents, the previews and the steps have the sizes asked for.
//!
//! The demo checkpoint's transformer is tiny (2 + 4 blocks, width 128), so a step is cheap and
//! the previews' share of it is far larger than with a full-size FLUX model, whose steps take
//! seconds while a preview's cost grows only with the latent's pixels: these ratios are a
//! pessimistic bound.

use anyhow::Context;
use kiln_core::engine::{RgbImage, StepEvent, StepObserver};
use kiln_engine::{EngineOptions, Flux1Pipeline, PipelineRequest};
use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct PreviewsArgs {
    /// Timed generations of each way at each side, after one untimed warm-up each.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The square output sides to generate.
    #[arg(long, value_delimiter = ',', default_values_t = [256, 512, 1024])]
    sides: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Off,
    Kept,
    Encoded,
}

const WAYS: [Way; 3] = [Way::Off, Way::Kept, Way::Encoded];

/// Does with each preview what the way says, and counts what encoding cost.
struct Watch {
    way: Way,
    kept: Option<RgbImage>,
    previews: u32,
    preview_size: (u32, u32),
    encoding: Duration,
    jpeg_bytes: usize,
}

impl StepObserver for Watch {
    fn on_step(&mut self, event: StepEvent<'_>) -> ControlFlow<()> {
        let Some(preview) = event.preview else {
            return ControlFlow::Continue(());
        };
        self.previews += 1;
        self.preview_size = (preview.width, preview.height);
        // What the worker's observer does on the engine's thread.
        self.kept = Some(preview.clone());
        if self.way == Way::Encoded {
            let started = Instant::now();
            let image = self.kept.take().expect("kept just now");
            let jpeg = kiln_worker::encode_preview(image).expect("a preview encodes");
            self.encoding += started.elapsed();
            self.jpeg_bytes = jpeg.len();
        }
        ControlFlow::Continue(())
    }
}

/// One generation's time and what its previews were.
struct Run {
    seconds: f64,
    watch: Watch,
}

fn generate(pipeline: &Flux1Pipeline, side: u32, way: Way) -> anyhow::Result<Run> {
    let request = PipelineRequest {
        prompt: crate::DEMO_PROMPT.into(),
        width: side,
        height: side,
        steps: None,
        guidance: None,
        seed: 0,
        max_sequence_length: None,
        initial_latents: None,
        preview_interval: if way == Way::Off { 0 } else { 1 },
    };
    let mut watch = Watch {
        way,
        kept: None,
        previews: 0,
        preview_size: (0, 0),
        encoding: Duration::ZERO,
        jpeg_bytes: 0,
    };
    let started = Instant::now();
    pipeline.run(&request, &[], &mut watch)?;
    Ok(Run {
        seconds: started.elapsed().as_secs_f64(),
        watch,
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

pub fn run(args: &PreviewsArgs) -> anyhow::Result<()> {
    // The engine runs as it does in the service.
    kiln::allocator::reuse_freed_memory();
    kiln_engine::load_cpu_kernels();
    let copy = tempfile::tempdir()?;
    uncapped_copy(
        Path::new(kiln::config::BUNDLED_DEMO_CHECKPOINT),
        copy.path(),
    )?;
    let pipeline = Flux1Pipeline::load(copy.path(), &EngineOptions::default(), &mut |_| {})
        .context("loading the demo checkpoint")?;
    println!("{}", crate::cpu_summary());
    println!(
        "demo checkpoint (uncapped), FLUX.1 pipeline on the CPU, median of {} runs; previews every step",
        args.runs
    );
    println!(
        "{:>5} {:>8} {:>9} {:>10} {:>10} {:>7} {:>11} {:>7} {:>10} {:>6}",
        "side",
        "previews",
        "preview",
        "off ms",
        "kept ms",
        "kept",
        "encoded ms",
        "encoded",
        "encode ms",
        "bytes"
    );
    for &side in &args.sides {
        for way in WAYS {
            generate(&pipeline, side, way)?;
        }
        let mut seconds: [Vec<f64>; 3] = Default::default();
        let mut last_encoded = None;
        for _ in 0..args.runs {
            for (i, way) in WAYS.into_iter().enumerate() {
                let run = generate(&pipeline, side, way)?;
                seconds[i].push(run.seconds);
                if way == Way::Encoded {
                    last_encoded = Some(run.watch);
                }
            }
        }
        let [off, kept, encoded] = seconds.map(median);
        let watch = last_encoded.context("at least one run")?;
        let per_preview = watch.encoding.as_secs_f64() / f64::from(watch.previews.max(1));
        println!(
            "{:>5} {:>8} {:>9} {:>10.1} {:>10.1} {:>+6.1}% {:>11.1} {:>+6.1}% {:>10.3} {:>6}",
            side,
            watch.previews,
            format!("{}x{}", watch.preview_size.0, watch.preview_size.1),
            off * 1e3,
            kept * 1e3,
            (kept / off - 1.0) * 100.0,
            encoded * 1e3,
            (encoded / off - 1.0) * 100.0,
            per_preview * 1e3,
            watch.jpeg_bytes,
        );
    }
    Ok(())
}

/// Copies the checkpoint in `from` to `to`, without the `_kiln.max_pixels` cap of its
/// `model_index.json`.
fn uncapped_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            uncapped_copy(&entry.path(), &target)?;
        } else if entry.file_name() == "model_index.json" {
            let mut index: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&std::fs::read(entry.path())?)?;
            if let Some(serde_json::Value::Object(kiln)) = index.get_mut("_kiln") {
                kiln.remove("max_pixels");
            }
            std::fs::write(&target, serde_json::to_vec_pretty(&index)?)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
