//! The playground page in a real headless Chromium (Debian's `chromium`, driven by
//! `playwright-core` from npm, `tests/browser/`) against real `kiln serve` processes with the
//! embedded defaults: one that generates (the demo checkpoint), and an API node with no workers
//! whose requests stay queued (for cancelling one). The browser script's checks are listed in
//! `tests/browser/playground.mjs`; its screenshots are kept in `target/playground/`.
//!
//! Without Node.js, the npm package or the browser the test says it was skipped, except under
//! CI (`CI` set), whose `.ci/run` installs them and where it must not skip.

use crate::harness::KilnProcess;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where the browser script and its `node_modules` live.
fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// The Chromium binary: `CHROMIUM` if set, else Debian's.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    path.exists().then_some(path)
}

/// What is missing for the browser test, if anything.
fn missing_tools() -> Option<String> {
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Some("Node.js (node) is not installed".into());
    }
    if !browser_dir().join("node_modules/playwright-core").is_dir() {
        return Some(
            "playwright-core is not installed (npm ci --prefix crates/kiln/tests/browser)".into(),
        );
    }
    if chromium().is_none() {
        return Some("Chromium is not installed (apt-get install chromium)".into());
    }
    None
}

fn first_key(kiln: &KilnProcess) -> &str {
    kiln.first_key
        .as_deref()
        .expect("a first start prints a key")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_playground_works_in_a_real_browser() {
    if let Some(missing) = missing_tools() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{missing}, and CI must run this test (.ci/run installs it)"
        );
        println!("SKIPPED: {missing}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The embedded defaults, as a new user meets them: the demo checkpoint serves every route.
    let config = dir.path().join("kiln.toml");
    std::fs::write(&config, "").unwrap();
    let kiln = KilnProcess::serve(&config, &dir.path().join("data"), &[]);
    let queue_only =
        KilnProcess::serve(&config, &dir.path().join("queue-only"), &["--workers", "0"]);
    // The FLUX.2 routes (edit among them) on the engine's tiny klein fixture.
    let edit_dir = dir.path().join("edit");
    std::fs::create_dir(&edit_dir).unwrap();
    let edit_config = crate::harness::write_flux2_config(&edit_dir, "klein", "");
    let edit = KilnProcess::serve(&edit_config, &edit_dir.join("data"), &[]);
    let png = dir.path().join("reference.png");
    image::RgbImage::from_pixel(48, 48, image::Rgb([20, 90, 200]))
        .save(&png)
        .unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../playground");
    std::fs::create_dir_all(&out).unwrap();
    let mut command = tokio::process::Command::new("node");
    command
        .arg(browser_dir().join("playground.mjs"))
        .current_dir(browser_dir())
        .env("CHROMIUM", chromium().unwrap())
        .env("KILN_URL", &kiln.base)
        .env("KILN_KEY", first_key(&kiln))
        .env("KILN_QUEUE_URL", &queue_only.base)
        .env("KILN_QUEUE_KEY", first_key(&queue_only))
        .env("KILN_EDIT_URL", &edit.base)
        .env("KILN_EDIT_KEY", first_key(&edit))
        .env("PNG_FILE", &png)
        .env("OUT_DIR", &out)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(600), command.output())
        .await
        .expect("the browser checks finish within 10 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}\nscreenshots: {}", out.display());
    assert!(output.status.success(), "a browser check failed (above)");
    assert!(stdout.contains("all playground checks passed"));
    for shot in ["playground-result.png", "playground-phone-dark.png"] {
        assert!(out.join(shot).is_file(), "{shot} was taken");
    }
}
