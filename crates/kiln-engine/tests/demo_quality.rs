//! The demo checkpoint (`assets/demo-checkpoint`) draws what held-out prompts ask for.
//!
//! The prompts (`heldout_prompts.json`, written by `tools/demo/train.py`) combine colour, shape
//! and position, or count, colour and shape, in ways the training scenes never did. Each is
//! generated once at the model's own 64x64 and checked by pixel colours, every pixel taken as
//! its nearest palette colour:
//! - object: the named colour covers at least a tenth of the named ninth of the image (3x3
//!   grid) and more of it than of any other ninth;
//! - background: the background colour covers most (60%) of the image outside that ninth;
//! - count: the named colour forms exactly that many blobs of at least 12 pixels.
//!
//! The whole set's pass rate must reach what the shipped checkpoint was measured at, less a
//! margin (see MIN_PASS_RATE). Set `KILN_DEMO_QUALITY_OUT` to a folder to keep the images.

use kiln_core::engine::{Engine, StepEvent, StepObserver};
use kiln_core::image_file::encode_image;
use kiln_core::params::{GenerationParams, ImageSize, OutputFormat, Prompt};
use kiln_engine::{Flux1Config, Flux1Engine};
use serde::Deserialize;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

/// The shipped checkpoint passes 3 of the 76 held-out prompts and the background check of all
/// 76 (see its MODEL_CARD.md); the thresholds allow one prompt fewer, and a few backgrounds.
const MIN_PASS_RATE: f64 = 0.025;
const MIN_BACKGROUND_RATE: f64 = 0.9;
const SIZE: u32 = 64;

fn checkpoint() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo-checkpoint")
}

fn params(
    prompt: &str,
    width: u32,
    height: u32,
    seed: u32,
    steps: Option<u32>,
) -> GenerationParams {
    GenerationParams {
        prompt: Prompt::parse(prompt, 1000).unwrap(),
        size: ImageSize { width, height },
        seed,
        num_inference_steps: steps,
        guidance_scale: None,
        output_format: OutputFormat::Png,
        raw: false,
        enable_prompt_expansion: false,
    }
}

#[derive(Deserialize)]
struct TestSet {
    palette: HashMap<String, [u8; 3]>,
    grid: HashMap<String, [usize; 2]>,
    prompts: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    color: String,
    position: Option<String>,
    background: String,
    count: Option<usize>,
}

struct Quiet;
impl StepObserver for Quiet {
    fn on_step(&mut self, _: StepEvent<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// Each pixel's nearest palette colour, as an index into `names`.
fn classify(pixels: &[u8], names: &[String], palette: &HashMap<String, [u8; 3]>) -> Vec<usize> {
    pixels
        .chunks(3)
        .map(|p| {
            (0..names.len())
                .min_by_key(|&i| {
                    let c = palette[&names[i]];
                    (0..3)
                        .map(|k| (p[k] as i32 - c[k] as i32).pow(2))
                        .sum::<i32>()
                })
                .unwrap()
        })
        .collect()
}

/// Which ninth of a `w x h` image (column, row) a pixel is in.
fn cell(x: usize, y: usize, w: usize, h: usize) -> [usize; 2] {
    [(3 * x / w).min(2), (3 * y / h).min(2)]
}

/// Blobs (4-connected) of `label` of at least `min_area` pixels.
fn blobs(labels: &[usize], w: usize, h: usize, label: usize, min_area: usize) -> usize {
    let mut seen = vec![false; labels.len()];
    let mut count = 0;
    for start in 0..labels.len() {
        if seen[start] || labels[start] != label {
            continue;
        }
        let (mut area, mut stack) = (0, vec![start]);
        seen[start] = true;
        while let Some(i) = stack.pop() {
            area += 1;
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if !seen[j] && labels[j] == label {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if area >= min_area {
            count += 1;
        }
    }
    count
}

#[derive(Default)]
struct Tally {
    object: (usize, usize),
    background: (usize, usize),
    count: (usize, usize),
    all: (usize, usize),
}

fn record(t: &mut (usize, usize), ok: bool) -> bool {
    t.0 += usize::from(ok);
    t.1 += 1;
    ok
}

#[test]
fn demo_checkpoint_draws_held_out_prompts() {
    let root = checkpoint();
    let set: TestSet =
        serde_json::from_str(&std::fs::read_to_string(root.join("heldout_prompts.json")).unwrap())
            .unwrap();
    assert!(set.prompts.len() >= 50, "at least 50 held-out prompts");
    let names: Vec<String> = set.palette.keys().cloned().collect();
    let index = |n: &str| names.iter().position(|x| x == n).unwrap();
    let out = std::env::var_os("KILN_DEMO_QUALITY_OUT").map(PathBuf::from);

    let engine = Flux1Engine::load(Flux1Config::new(&root), &mut |_| {}).unwrap();
    let (w, h) = (SIZE as usize, SIZE as usize);
    let mut tally = Tally::default();
    for (i, case) in set.prompts.iter().enumerate() {
        let params = params(&case.prompt, SIZE, SIZE, i as u32, None);
        let img = engine.generate(&params, &mut Quiet).unwrap().image;
        let labels = classify(&img.pixels, &names, &set.palette);
        let (color, bg) = (index(&case.color), index(&case.background));
        let mut ok = true;
        let named = case.position.as_ref().map(|p| set.grid[p]);
        if let Some(named) = named {
            let mut per_cell = HashMap::<[usize; 2], (usize, usize)>::new();
            let (mut rest, mut rest_bg) = (0, 0);
            for (j, &l) in labels.iter().enumerate() {
                let c = cell(j % w, j / w, w, h);
                let e = per_cell.entry(c).or_default();
                e.0 += usize::from(l == color);
                e.1 += 1;
                if c != named {
                    rest += 1;
                    rest_bg += usize::from(l == bg);
                }
            }
            let (n, total) = per_cell[&named];
            let most = per_cell.iter().all(|(c, v)| *c == named || v.0 < n);
            ok &= record(&mut tally.object, n * 10 >= total && most);
            ok &= record(&mut tally.background, rest_bg * 10 >= rest * 6);
        } else {
            let n_bg = labels.iter().filter(|&&l| l == bg).count();
            ok &= record(&mut tally.background, n_bg * 10 >= labels.len() * 6);
        }
        if let Some(count) = case.count {
            ok &= record(&mut tally.count, blobs(&labels, w, h, color, 12) == count);
        }
        record(&mut tally.all, ok);
        println!("{} {}", if ok { "pass" } else { "FAIL" }, case.prompt);
        if let Some(dir) = &out {
            std::fs::create_dir_all(dir).unwrap();
            let name = format!("{i:03}-{}.png", case.prompt.replace(' ', "_"));
            std::fs::write(
                dir.join(name),
                encode_image(&img, OutputFormat::Png).unwrap(),
            )
            .unwrap();
        }
    }
    let rate = |t: (usize, usize)| t.0 as f64 / t.1.max(1) as f64;
    println!(
        "object {}/{}, background {}/{}, count {}/{}, all {}/{} ({:.2})",
        tally.object.0,
        tally.object.1,
        tally.background.0,
        tally.background.1,
        tally.count.0,
        tally.count.1,
        tally.all.0,
        tally.all.1,
        rate(tally.all)
    );
    assert!(
        rate(tally.background) >= MIN_BACKGROUND_RATE,
        "background pass rate {:.2} below {MIN_BACKGROUND_RATE}",
        rate(tally.background)
    );
    assert!(
        rate(tally.all) >= MIN_PASS_RATE,
        "pass rate {:.2} below {MIN_PASS_RATE}",
        rate(tally.all)
    );
}

/// Every preset of the FLUX.2 [flex] route (at its default 28 steps) and of the FLUX 1.1 [pro]
/// route (at the checkpoint's default steps) comes out at the requested size, generated at
/// 64x64 pixels of area or less and upscaled, and says so. 1024x768 at 28 steps must take at
/// most 20 s on two cores (BENCHMARKS.md has the measured time).
#[test]
fn demo_checkpoint_serves_every_preset_size() {
    let engine = Flux1Engine::load(Flux1Config::new(checkpoint()), &mut |_| {}).unwrap();
    let flux2 = [
        (1024, 1024),
        (512, 512),
        (768, 1024),
        (576, 1024),
        (1024, 768),
        (1024, 576),
    ];
    let flux11 = [
        (1344, 768),
        (1152, 864),
        (1024, 1024),
        (1440, 1440),
        (864, 1152),
        (768, 1344),
    ];
    let sizes = flux2
        .iter()
        .map(|&s| (s, Some(28)))
        .chain(flux11.iter().map(|&s| (s, None)));
    for ((width, height), steps) in sizes {
        let prompt = "a red circle in the top left on a blue background";
        let start = Instant::now();
        let out = engine
            .generate(&params(prompt, width, height, 1, steps), &mut Quiet)
            .unwrap();
        let took = start.elapsed();
        println!(
            "{width}x{height}, {} steps: {took:.2?}",
            out.applied.num_inference_steps
        );
        assert_eq!((out.image.width, out.image.height), (width, height));
        let notes = out.applied.notes.join("; ");
        assert!(
            notes.contains(&format!("upscaled to {width}x{height}")),
            "{notes}"
        );
        if (width, height) == (1024, 768) {
            assert!(notes.contains("generated at 64x48"), "{notes}");
            assert!(took.as_secs_f64() <= 20.0, "1024x768 took {took:.2?}");
        }
    }
}
