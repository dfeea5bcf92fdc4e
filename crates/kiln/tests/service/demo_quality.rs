//! The demo checkpoint (`assets/demo-checkpoint`), as a fresh install serves it: `kiln serve` with
//! no configuration, spoken to over HTTP like any client.
//!
//! The held-out prompts (`heldout_prompts.json`, written by `tools/demo/train.py`) combine colour,
//! shape and position, or count, colour and shape, in ways the training scenes never did. Each is
//! generated once through the FLUX.2 [flex] route at the model's own 64x64 (PNG, the checkpoint's
//! 8 steps, seed = the prompt's index) and checked by pixel colours, every pixel taken as its
//! nearest palette colour:
//! - object: the named colour covers at least a tenth of the named ninth of the image (3x3
//!   grid) and more of it than of any other ninth;
//! - background: the background colour covers most (60%) of the image outside that ninth;
//! - count: the named colour forms exactly that many blobs of at least 12 pixels.
//!
//! The whole set's pass rate must reach what the shipped checkpoint was measured at, less a
//! margin (see MIN_PASS_RATE). Set `DEMO_QUALITY_OUT` to a folder to keep the images.

use crate::harness::{Client, KilnProcess, FLEX, PRO};

use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// The shipped checkpoint passes 37 of the 76 held-out prompts and the background check of all
/// 76 (see its MODEL_CARD.md); the thresholds allow four prompts fewer, and a few backgrounds.
/// (`DEMO_QUALITY_OUT`, not `KILN_...`: kiln reads every `KILN_` variable as configuration.)
const MIN_PASS_RATE: f64 = 0.43;
const MIN_BACKGROUND_RATE: f64 = 0.9;
const SIZE: u32 = 64;

fn checkpoint() -> PathBuf {
    PathBuf::from(kiln::config::BUNDLED_DEMO_CHECKPOINT)
}

/// The checkpoint's own defaults (`_kiln` in its `model_index.json`): steps and the
/// classifier-free guidance scale, which a FLUX.2 [flex] request must name (that route's
/// schema has its own defaults for both). The FLUX 1.1 [pro] route takes them as they are.
fn checkpoint_defaults() -> (u64, f64) {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint().join("model_index.json")).unwrap(),
    )
    .unwrap();
    let kiln = &index["_kiln"];
    (
        kiln["steps"].as_u64().unwrap(),
        kiln["true_cfg_scale"].as_f64().unwrap(),
    )
}

/// `kiln serve` as a fresh clone runs it (no checkpoint configured), with the per-token rate
/// limit off so one client may submit the whole set at once.
fn fresh_kiln(dir: &std::path::Path) -> (KilnProcess, Client) {
    let config = dir.join("kiln.toml");
    std::fs::write(
        &config,
        "[limits]
rate_limit_per_minute = 0
",
    )
    .unwrap();
    let kiln = KilnProcess::serve(&config, &dir.join("data"), &[]);
    let client = Client::new(&kiln.base, kiln.first_key.as_deref().unwrap());
    (kiln, client)
}

/// Submits `input` to `model`, waits for it, and returns the result and the decoded image.
async fn generate(
    client: &Client,
    model: &str,
    input: serde_json::Value,
) -> (serde_json::Value, image::RgbImage) {
    let result = client.run(model, input, Duration::from_secs(120)).await;
    assert_eq!(result["status"], "succeeded", "{result}");
    let (code, _, bytes) = client
        .download(result["output"]["image"].as_str().unwrap())
        .await;
    assert_eq!(code, 200);
    (result, image::load_from_memory(&bytes).unwrap().to_rgb8())
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

#[tokio::test(flavor = "multi_thread")]
async fn demo_checkpoint_draws_held_out_prompts() {
    let root = checkpoint();
    let set: TestSet =
        serde_json::from_str(&std::fs::read_to_string(root.join("heldout_prompts.json")).unwrap())
            .unwrap();
    assert!(set.prompts.len() >= 50, "at least 50 held-out prompts");
    let names: Vec<String> = set.palette.keys().cloned().collect();
    let index = |n: &str| names.iter().position(|x| x == n).unwrap();
    let out = std::env::var_os("DEMO_QUALITY_OUT").map(PathBuf::from);

    let dir = tempfile::tempdir().unwrap();
    let (_kiln, client) = fresh_kiln(dir.path());
    let (w, h) = (SIZE as usize, SIZE as usize);
    let (steps, guidance) = checkpoint_defaults();
    let mut tally = Tally::default();
    for (i, case) in set.prompts.iter().enumerate() {
        let input = json!({
            "prompt": case.prompt,
            "image_size": {"width": SIZE, "height": SIZE},
            "seed": i,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "output_format": "png",
        });
        let (_, img) = generate(&client, FLEX, input).await;
        let labels = classify(img.as_raw(), &names, &set.palette);
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
            img.save(dir.join(name)).unwrap();
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
/// 64x64 pixels of area or less and upscaled, and the result says so. (How long 1024x768 takes
/// is measured in BENCHMARKS.md, not asserted here.)
#[tokio::test(flavor = "multi_thread")]
async fn demo_checkpoint_serves_every_preset_size() {
    let dir = tempfile::tempdir().unwrap();
    let (_kiln, client) = fresh_kiln(dir.path());
    let prompt = "a red circle in the top left on a blue background";
    let flux2 = [
        ("square_hd", 1024, 1024),
        ("square", 512, 512),
        ("portrait_4_3", 768, 1024),
        ("portrait_16_9", 576, 1024),
        ("landscape_4_3", 1024, 768),
        ("landscape_16_9", 1024, 576),
    ];
    let flux11 = [
        ("16:9", 1344, 768),
        ("4:3", 1152, 864),
        ("1:1", 1024, 1024),
        ("1:1 (hd)", 1440, 1440),
        ("3:4", 864, 1152),
        ("9:16", 768, 1344),
    ];
    let (default_steps, default_guidance) = checkpoint_defaults();
    // The FLUX.2 [flex] route's own defaults: 28 steps, guidance 3.5.
    let cases = flux2
        .iter()
        .map(|&(preset, w, h)| (FLEX, preset, w, h, 28, 3.5))
        .chain(
            flux11
                .iter()
                .map(|&(preset, w, h)| (PRO, preset, w, h, default_steps, default_guidance)),
        );
    for (model, preset, width, height, steps, guidance) in cases {
        let (result, img) = generate(
            &client,
            model,
            json!({"prompt": prompt, "image_size": preset}),
        )
        .await;
        assert_eq!(img.dimensions(), (width, height), "{model} {preset}");
        let meta = &result["metadata"];
        assert_eq!(meta["num_inference_steps"], steps, "{model} {preset}");
        assert_eq!(meta["guidance"], guidance, "{model} {preset}");
        let notes = meta["notes"].to_string();
        assert!(
            notes.contains(&format!("upscaled to {width}x{height}")),
            "{notes}"
        );
        assert!(notes.contains("demo checkpoint"), "{notes}");
        assert!(
            notes.contains(&format!("true classifier-free guidance {guidance}")),
            "{notes}"
        );
        if (width, height) == (1024, 768) {
            assert!(notes.contains("generated at 64x48"), "{notes}");
        }
    }
}
