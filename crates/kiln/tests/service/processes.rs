//! The shipped `kiln` binary as users run it: first start, keys, SIGTERM, SIGKILL under load,
//! and a worker process killed mid-job. The engine is the real FLUX.1 engine on a tiny checkpoint.

use crate::harness::{
    bfl_checkpoint, input, kiln_run, kiln_run_with_env, walk, write_config, write_config_for,
    Client, KilnProcess, EDIT, FLEX, PRO,
};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

fn decoded_size(bytes: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(bytes).expect("a decodable image");
    (img.width(), img.height())
}

#[tokio::test(flavor = "multi_thread")]
async fn first_start_makes_a_key_serves_an_image_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 2, "");
    let data = dir.path().join("data");
    let mut kiln = KilnProcess::serve(&config, &data, &[]);
    let token = kiln.first_key.clone().expect("a first start prints a key");
    let client = Client::new(&kiln.base, &token);

    let (code, health) = client.call(reqwest::Method::GET, "/healthz", None).await;
    assert_eq!(code, 200, "{health}");
    let (code, submitted) = client
        .submit(PRO, input("a red circle on a blue background"))
        .await;
    assert_eq!(code, 200, "{submitted}");
    let id = submitted["request_id"].as_str().unwrap();
    assert_eq!(
        submitted["result_url"],
        format!("{}/v1/requests/{id}/result", kiln.base)
    );
    let result = client.wait_result(id, Duration::from_secs(60)).await;
    assert_eq!(result["status"], "succeeded", "{result}");
    let meta = &result["metadata"];
    assert_eq!(
        (meta["width"].as_u64(), meta["height"].as_u64()),
        (Some(256), Some(256))
    );
    assert_eq!(
        meta["num_inference_steps"], 2,
        "the model configuration's steps"
    );
    assert!(
        meta["engine"].as_str().unwrap().contains("FLUX.1"),
        "{meta}"
    );
    let url = result["output"]["image"].as_str().unwrap();
    assert_eq!(result["output"]["images"][0], url);
    let (code, content_type, bytes) = client.download(url).await;
    assert_eq!((code, content_type.as_deref()), (200, Some("image/jpeg")));
    assert_eq!(decoded_size(&bytes), (256, 256));

    let status = kiln.sigterm(Duration::from_secs(30));
    assert!(status.success(), "a graceful stop exits 0: {status:?}");

    let again = KilnProcess::serve(&config, &data, &[]);
    assert_eq!(
        again.first_key, None,
        "the key is shown only on the first start"
    );
    let (code, _) = Client::new(&again.base, &token).result(id).await;
    assert_eq!(code, 200, "the record outlives the restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_created_listed_and_revoked_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 2, "");
    let data = dir.path().join("data");
    let (ok, token, _) = kiln_run(&config, &data, &["keys", "create", "--name", "ci"]);
    assert!(ok);
    let token = token.trim().to_string();
    assert!(token.starts_with("kiln_"), "{token}");
    let (ok, _, err) = kiln_run(&config, &data, &["keys", "create", "--name", "ci"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, list, _) = kiln_run(&config, &data, &["keys", "list"]);
    assert!(
        ok && list.contains("ci") && !list.contains(&token),
        "the list never shows tokens: {list}"
    );

    let kiln = KilnProcess::serve(&config, &data, &[]);
    assert_eq!(kiln.first_key, None, "keys exist, so none is made");
    let client = Client::new(&kiln.base, &token);
    let (code, _) = client.submit(PRO, input("a green square")).await;
    assert_eq!(code, 200);

    let (ok, out, _) = kiln_run(&config, &data, &["keys", "revoke", "ci"]);
    assert!(ok, "{out}");
    // The server trusts a token's lookup for its key cache's TTL, so a revocation by another
    // process is refused within that long (plus slack for a busy machine), not at once.
    let deadline = std::time::Instant::now() + kiln_api::auth::KEY_CACHE_TTL * 3;
    loop {
        let (code, body) = client.submit(PRO, input("a green square")).await;
        if code == 401 {
            assert_eq!(body["error_code"], Value::from(401001), "{body}");
            break;
        }
        assert_eq!(code, 200, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked key still works"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_under_load_loses_no_accepted_request() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 2, "[limits]\nrate_limit_per_minute = 0\n");
    let data = dir.path().join("data");
    let mut kiln = KilnProcess::serve(&config, &data, &[]);
    let client = Client::new(&kiln.base, kiln.first_key.as_deref().unwrap());

    // Four clients submit as fast as they can, 30 requests in all; the server is killed once 12
    // are accepted, while the others are in flight.
    let budget = Arc::new(AtomicUsize::new(30));
    let accepted_so_far = Arc::new(AtomicUsize::new(0));
    let mut submitters = vec![];
    for c in 0..4 {
        let (client, budget, accepted_so_far) =
            (client.clone(), budget.clone(), accepted_so_far.clone());
        submitters.push(tokio::spawn(async move {
            let mut accepted = vec![];
            while budget
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let path = format!("/v1/models/{PRO}");
                match client
                    .try_call(
                        reqwest::Method::POST,
                        &path,
                        Some(&input(&format!("shape {c}"))),
                    )
                    .await
                {
                    Ok((200, body)) => {
                        accepted.push(body["request_id"].as_str().unwrap().to_string());
                        accepted_so_far.fetch_add(1, SeqCst);
                    }
                    Ok((code, body)) => {
                        panic!("a live server refused a valid submit: {code} {body}")
                    }
                    Err(_) => break, // the connection died with the server
                }
            }
            accepted
        }));
    }
    while accepted_so_far.load(SeqCst) < 12 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    kiln.sigkill();
    let mut accepted = vec![];
    for s in submitters {
        accepted.extend(s.await.unwrap_or_default());
    }
    assert!(
        (12..30).contains(&accepted.len()),
        "the kill landed mid-load: {} accepted",
        accepted.len()
    );

    let kiln = KilnProcess::serve(&config, &data, &[]);
    let client = Client::new(&kiln.base, &client.token);
    let mut images = HashSet::new();
    for id in &accepted {
        let result = client.wait_result(id, Duration::from_secs(300)).await;
        assert_eq!(result["status"], "succeeded", "{id}: {result}");
        images.insert(result["output"]["image"].as_str().unwrap().to_string());
    }
    assert_eq!(images.len(), accepted.len(), "one image per request");
    let some = images.iter().next().unwrap();
    let (code, _, bytes) = client.download(some).await;
    assert_eq!((code, decoded_size(&bytes)), (200, (256, 256)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_process_killed_mid_job_leaves_the_job_to_another_which_completes_it_once() {
    let dir = tempfile::tempdir().unwrap();
    // Slow jobs (many steps) and a short lease, so the kill lands mid-job and the retake is quick.
    let config = write_config(
        dir.path(),
        60,
        "[workers]\nlease_secs = 3\npoll_interval_ms = 100\n",
    );
    let data = dir.path().join("data");
    let api = KilnProcess::serve(&config, &data, &["--workers", "0"]);
    let client = Client::new(&api.base, api.first_key.as_deref().unwrap());
    let (code, submitted) = client.submit(PRO, input("a yellow triangle")).await;
    assert_eq!(code, 200, "{submitted}");
    let id = submitted["request_id"].as_str().unwrap();
    assert_eq!(
        client.status(id).await["queue_position"],
        0,
        "no worker yet: first in line"
    );

    let mut doomed = KilnProcess::worker(&config, &data);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = client.status(id).await;
        if status["status"] == "in_progress"
            && status["progress"]["step"].as_u64().unwrap_or(0) >= 1
        {
            assert_eq!(status["progress"]["total"], 60, "{status}");
            assert!(status.get("queue_position").is_none(), "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never got going: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    doomed.sigkill();
    assert_eq!(
        client.status(id).await["status"],
        "in_progress",
        "still leased to the dead worker"
    );
    assert_eq!(client.cancel(id).await["outcome"], "not_cancellable");

    let _survivor = KilnProcess::worker(&config, &data);
    let result = client.wait_result(id, Duration::from_secs(180)).await;
    assert_eq!(result["status"], "succeeded", "{result}");
    // The image, and the job's last preview (kept with the record until purge); the dead
    // worker's preview was replaced by the survivor's and deleted, not left behind.
    let files: Vec<_> = walk(&data.join("files"));
    let image = result["output"]["image"].as_str().unwrap();
    let image_key = image.split('?').next().unwrap().rsplit('/').next().unwrap();
    let images = files.iter().filter(|f| f.ends_with(image_key)).count();
    assert_eq!(
        (files.len(), images),
        (2, 1),
        "one image and one preview: {files:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_runs_bfl_single_files_and_gguf_transformers() {
    for (transformer, layout) in [
        ("schnell-bfl/flux1-tiny-schnell.safetensors", "BFL"),
        ("schnell-gguf/flux1-tiny-schnell-Q8_0.gguf", "GGUF"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = bfl_checkpoint(dir.path(), transformer);
        let config = write_config_for(dir.path(), &checkpoint, 2, "");
        let kiln = KilnProcess::serve(&config, &dir.path().join("data"), &[]);
        let client = Client::new(&kiln.base, kiln.first_key.as_deref().unwrap());
        let result = client
            .run(PRO, input("a blue star"), Duration::from_secs(60))
            .await;
        assert_eq!(result["status"], "succeeded", "{layout}: {result}");
        let engine = result["metadata"]["engine"].as_str().unwrap();
        assert!(engine.contains(layout), "{layout} named in {engine}");
        let (code, _, bytes) = client
            .download(result["output"]["image"].as_str().unwrap())
            .await;
        assert_eq!((code, decoded_size(&bytes)), (200, (256, 256)), "{layout}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_separate_worker_exports_its_step_and_job_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 3, "");
    let data = dir.path().join("data");
    let api = KilnProcess::serve(&config, &data, &["--workers", "0"]);
    let worker = KilnProcess::worker_with_metrics(&config, &data);
    let client = Client::new(&api.base, api.first_key.as_deref().unwrap());
    let result = client
        .run(PRO, input("a purple circle"), Duration::from_secs(60))
        .await;
    assert_eq!(result["status"], "succeeded", "{result}");

    let text = reqwest::get(format!("{}/metrics", worker.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains(PRO))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} for {PRO} in:\n{text}"))
    };
    assert_eq!(
        sample("kiln_step_duration_seconds_count"),
        3.0,
        "one observation per step"
    );
    assert_eq!(sample("kiln_job_duration_seconds_count"), 1.0);
    assert_eq!(sample("kiln_jobs_finished_total{model=\"blackforestlabs/flux-1-1-pro/text-to-image\",outcome=\"succeeded\"}"), 1.0);
}

/// The binary as `cargo install` or a copy leaves it: alone in a directory of its own, started
/// from an empty directory with no configuration at all.
fn packaged_binary(root: &Path) -> (PathBuf, PathBuf) {
    let bin = root.join("bin");
    let cwd = root.join("empty");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    let kiln = bin.join("kiln");
    std::fs::copy(env!("CARGO_BIN_EXE_kiln"), &kiln).unwrap();
    (kiln, cwd)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copied_binary_serves_the_embedded_demo_checkpoint_from_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (binary, cwd) = packaged_binary(dir.path());
    let mut command = std::process::Command::new(&binary);
    command
        .current_dir(&cwd)
        .env_remove("KILN_CONFIG")
        .env_remove("KILN_DATA_DIR")
        .env("KILN_LOG_FORMAT", "json")
        .env("RUST_LOG", "info,sqlx=warn")
        .stdin(std::process::Stdio::null())
        .args(["serve", "--bind", "127.0.0.1:0"]);
    let kiln = KilnProcess::serving(command);
    let client = Client::new(&kiln.base, kiln.first_key.as_deref().unwrap());
    assert!(
        cwd.join("kiln-data/demo-checkpoint/model_index.json")
            .is_file(),
        "the embedded checkpoint is written into the data directory"
    );
    let prompt = "a red circle in the top left on a blue background";
    for (model, input, size) in [
        (
            FLEX,
            json!({"prompt": prompt, "image_size": "square"}),
            (512, 512),
        ),
        (PRO, json!({"prompt": prompt}), (1344, 768)),
    ] {
        let result = client.run(model, input, Duration::from_secs(120)).await;
        assert_eq!(result["status"], "succeeded", "{model}: {result}");
        let engine = result["metadata"]["engine"].as_str().unwrap();
        assert!(engine.contains("kiln demo checkpoint"), "{model}: {engine}");
        let tree = dir.path().to_str().unwrap();
        assert!(
            !result.to_string().contains(tree),
            "no server path reaches the client: {result}"
        );
        let notes = result["metadata"]["notes"].to_string();
        assert!(
            notes.contains("demo checkpoint") && notes.contains("upscaled"),
            "{model}: {notes}"
        );
        let (code, _, bytes) = client
            .download(result["output"]["image"].as_str().unwrap())
            .await;
        assert_eq!((code, decoded_size(&bytes)), (200, size), "{model}");
    }
    assert_operator_logs(&kiln);
}

/// The startup summary names what serves each route and where things are kept; every request
/// has an access-log line, with its key's name and without a file URL's signature.
fn assert_operator_logs(kiln: &KilnProcess) {
    let routes = kiln.logged("route");
    assert_eq!(routes.len(), 3, "one line per route: {routes:?}");
    let served_by = |id: &str| {
        let line = routes.iter().find(|r| r["route"] == id).unwrap();
        line["served_by"].as_str().unwrap().to_string()
    };
    assert!(
        served_by(PRO).contains("kiln demo checkpoint"),
        "{routes:?}"
    );
    assert!(served_by(EDIT).contains("refused"), "{routes:?}");
    let listening = &kiln.logged("kiln is listening")[0];
    for field in ["public_url", "store", "blob_store"] {
        assert!(listening[field].is_string(), "{field}: {listening}");
    }

    let requests = kiln.logged("request");
    let submit = requests
        .iter()
        .find(|r| r["method"] == "POST" && r["path"] == format!("/v1/models/{FLEX}"))
        .unwrap_or_else(|| panic!("no access-log line for the submit: {requests:?}"));
    assert_eq!(submit["status"], 200, "{submit}");
    assert_eq!(submit["key"], "default", "{submit}");
    assert!(submit["request_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert!(submit["duration_ms"]
        .as_str()
        .unwrap()
        .parse::<f64>()
        .is_ok());
    let download = requests
        .iter()
        .find(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/files/")))
        .unwrap_or_else(|| panic!("no access-log line for the download: {requests:?}"));
    assert_eq!(
        (&download["status"], &download["key"]),
        (&json!(200), &json!("-"))
    );
    assert!(
        !requests.iter().any(|r| r.to_string().contains("sig=")),
        "signatures stay out of the log"
    );
}

#[test]
fn generate_loads_only_the_checkpoint_of_its_route() {
    let dir = tempfile::tempdir().unwrap();
    // The other route's checkpoint is not even there: loading it would fail.
    let config = write_config_for(dir.path(), Path::new("/nonexistent/checkpoint"), 2, "");
    let out = dir.path().join("circle.png");
    let (ok, _, stderr) = kiln_run(
        &config,
        &dir.path().join("data"),
        &[
            "generate",
            "--model",
            FLEX,
            "--input",
            r#"{"prompt": "a red circle", "image_size": "square"}"#,
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("loaded FLUX.1 schnell, diffusers layout, kiln demo checkpoint"),
        "{stderr}"
    );
    assert!(!stderr.contains("nonexistent"), "{stderr}");
    let (width, height) = decoded_size(&std::fs::read(&out).unwrap());
    assert_eq!((width, height), (512, 512), "the square preset");
}

#[test]
fn kiln_config_prints_the_settings_in_force_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 3, "\n[limits]\nmax_queued = 77\n");
    let secret = "5e".repeat(32);
    let env = [
        ("KILN_SIGNING_KEY", secret.as_str()),
        ("KILN_MODELS__FLUX_2_FLEX__CHECKPOINT", "/models/klein"),
    ];
    let (ok, text, stderr) = kiln_run_with_env(&config, dir.path(), &["config"], &env);
    assert!(ok, "{stderr}");
    let printed: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(
        printed["limits"]["max_queued"].as_integer(),
        Some(77),
        "{text}"
    );
    assert_eq!(printed["signing_key"].as_str(), Some("<redacted>"));
    assert!(!text.contains(&secret));
    assert_eq!(
        printed["models"][PRO]["steps"].as_integer(),
        Some(3),
        "{text}"
    );
    assert_eq!(
        printed["models"][FLEX]["checkpoint"].as_str(),
        Some("/models/klein")
    );
}

/// On a CPU without bf16 instructions (`KILN_BF16_KERNEL=none` makes this one such a CPU), a
/// configured bf16 is refused when the configuration is read, naming the table, while an API
/// node (no worker slots) does not care what its own CPU has.
#[test]
fn bf16_on_a_cpu_without_bf16_instructions_is_refused_when_the_configuration_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 3, "");
    let env = [
        ("KILN_BF16_KERNEL", "none"),
        ("KILN_MODELS__FLUX_1_1_PRO__PRECISION", "bf16"),
    ];
    let (ok, _, stderr) = kiln_run_with_env(&config, dir.path(), &["config"], &env);
    assert!(!ok, "bf16 was accepted: {stderr}");
    assert!(
        stderr.contains(&format!("models.\"{PRO}\".precision"))
            && stderr.contains("AMX-BF16 or AVX512-BF16"),
        "{stderr}"
    );
    let api_only = [env[0], env[1], ("KILN_WORKERS__SLOTS", "0")];
    let (ok, _, stderr) = kiln_run_with_env(&config, dir.path(), &["config"], &api_only);
    assert!(ok, "an API node refused: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_flux2_routes_run_a_configured_flux2_klein_checkpoint() {
    // The edit below fetches a result of this same server, on loopback.
    let (_dir, kiln, client) = serve_flux2("klein", "[fetch]\nallow = [\"127.0.0.0/8\"]\n");
    let input = serde_json::json!({
        "prompt": "a red fox in the snow",
        "image_size": {"width": 80, "height": 64},
        "num_inference_steps": 3,
        "output_format": "png",
    });
    let result = client.run(FLEX, input, Duration::from_secs(60)).await;
    assert_eq!(result["status"], "succeeded", "{result}");
    let meta = &result["metadata"];
    assert!(
        meta["engine"].as_str().unwrap().contains("FLUX.2 klein"),
        "{meta}"
    );
    assert_eq!(meta["num_inference_steps"], 3);
    // The route expands prompts by default: the text encoder's rewrite is what was drawn.
    let notes = meta["notes"].to_string();
    assert!(
        notes.contains("prompt expanded by the text encoder")
            && notes.contains("the original: a red fox in the snow"),
        "{notes}"
    );
    assert_ne!(meta["prompt"], "a red fox in the snow", "{meta}");
    let (code, content_type, bytes) = client
        .download(result["output"]["image"].as_str().unwrap())
        .await;
    assert_eq!((code, content_type.as_deref()), (200, Some("image/png")));
    assert_eq!(decoded_size(&bytes), (80, 64));

    // The edit route, served by the same checkpoint: the image just made (by its URL) and a
    // small image inline (a data URI) condition a new one, whose size is the first's.
    let (code, models) = client.call(reqwest::Method::GET, "/v1/models", None).await;
    assert_eq!(code, 200);
    assert!(models.to_string().contains(EDIT), "{models}");
    let inline = png_data_uri(32, [200, 30, 30]);
    let first_image = result["output"]["image"].as_str().unwrap();
    let edit = serde_json::json!({
        "prompt": "the fox in red",
        "image_urls": [first_image, inline],
        "num_inference_steps": 2,
        "enable_prompt_expansion": false,
        "output_format": "png",
    });
    let edited = client.run(EDIT, edit, Duration::from_secs(60)).await;
    assert_eq!(edited["status"], "succeeded", "{edited}");
    let notes = edited["metadata"]["notes"].to_string();
    assert!(
        notes.contains("2 reference image(s)")
            && notes.contains("image size 80x64 from the first reference image"),
        "{notes}"
    );
    let (code, _, bytes) = client
        .download(edited["output"]["image"].as_str().unwrap())
        .await;
    assert_eq!((code, decoded_size(&bytes)), (200, (80, 64)));

    // An image that cannot be had ends the job failed, saying which and why.
    let missing = format!("{}/files/no-such-file.png", kiln.base);
    let inputs =
        serde_json::json!({"prompt": "x", "image_urls": [png_data_uri(16, [0, 0, 0]), missing]});
    let failed = client.run(EDIT, inputs, Duration::from_secs(60)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "invalid_input");
    // Which image and a fixed reason; the server's status goes to the worker's log.
    assert_eq!(
        failed["error"]["message"],
        format!(
            "reference image 2 ({}/files/no-such-file.png) could not be fetched",
            kiln.base
        )
    );
}

/// `kiln serve` with the engine's `{fixture}-diffusers` checkpoint configured for the FLUX.2
/// route (and `extra` configuration), and a client with its first key.
fn serve_flux2(fixture: &str, extra: &str) -> (tempfile::TempDir, KilnProcess, Client) {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::harness::write_flux2_config(dir.path(), fixture, extra);
    let kiln = KilnProcess::serve(&config, &dir.path().join("data"), &[]);
    let client = Client::new(&kiln.base, kiln.first_key.as_deref().unwrap());
    (dir, kiln, client)
}

/// A square PNG of one colour as a data URI.
fn png_data_uri(side: u32, rgb: [u8; 3]) -> String {
    use base64::Engine as _;
    let mut png = Vec::new();
    image::RgbImage::from_pixel(side, side, image::Rgb(rgb))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_flux2_route_runs_a_configured_flux2_dev_checkpoint() {
    let (_dir, _kiln, client) = serve_flux2("flux2-dev", "");
    let input = serde_json::json!({
        "prompt": "a lighthouse in a storm",
        "image_size": {"width": 64, "height": 80},
        "num_inference_steps": 2,
        "guidance_scale": 4,
        "enable_prompt_expansion": false,
    });
    let result = client.run(FLEX, input, Duration::from_secs(60)).await;
    assert_eq!(result["status"], "succeeded", "{result}");
    let meta = &result["metadata"];
    assert!(
        meta["engine"].as_str().unwrap().contains("FLUX.2 dev"),
        "{meta}"
    );
    assert_eq!(
        (
            meta["guidance"].as_f64(),
            meta["num_inference_steps"].as_u64()
        ),
        (Some(4.0), Some(2))
    );
    let (code, _, bytes) = client
        .download(result["output"]["image"].as_str().unwrap())
        .await;
    assert_eq!((code, decoded_size(&bytes)), (200, (64, 80)));
}

/// Slow clients cannot starve the service of descriptors. Under a descriptor limit of 256 (soft
/// and hard, so kiln cannot raise it), 300 connections that each send half a request head
/// leave `/healthz` answering within the header timeout, and a job submitted before them
/// stores its image and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn half_open_connections_cannot_exhaust_the_descriptors_of_a_running_job() {
    use std::os::unix::process::CommandExt;
    use tokio::io::AsyncWriteExt;

    let header_timeout = Duration::from_secs(3);
    let dir = tempfile::tempdir().unwrap();
    let limits = format!(
        "[limits]\nheader_timeout_secs = {}\n",
        header_timeout.as_secs()
    );
    let config = write_config(dir.path(), 2, &limits);
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("KILN_LOG_FORMAT", "json")
        .env("RUST_LOG", "info,sqlx=warn")
        .stdin(std::process::Stdio::null());
    // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let kiln = KilnProcess::serving(command);
    let cap = kiln
        .logged("connection cap: lowered to fit the descriptor limit (raise `ulimit -n` for more)");
    assert_eq!(cap.len(), 1, "the cap is logged once");
    assert_eq!(cap[0]["descriptor_limit"], 256);
    assert_eq!(
        cap[0]["max_connections"],
        256 - 64,
        "64 descriptors kept back"
    );
    let client = Client::new(&kiln.base, kiln.first_key.as_deref().unwrap());
    let (code, submitted) = client.submit(PRO, input("a lighthouse at dusk")).await;
    assert_eq!(code, 200, "{submitted}");

    let address = kiln.base.trim_start_matches("http://");
    let mut held = Vec::new();
    for _ in 0..300 {
        let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\nX-Slow: ")
            .await
            .unwrap();
        held.push(slow);
    }
    let started = std::time::Instant::now();
    let (code, health) = client.call(reqwest::Method::GET, "/healthz", None).await;
    assert_eq!(code, 200, "{health}");
    let waited = started.elapsed();
    assert!(
        waited < header_timeout * 2 + Duration::from_secs(5),
        "/healthz took {waited:?} behind the slow clients"
    );
    let id = submitted["request_id"].as_str().unwrap();
    let result = client.wait_result(id, Duration::from_secs(60)).await;
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(held.len(), 300);
}

/// `metrics.bind` takes `/metrics` off the API port onto its own address; the access log names
/// our request id and, beside it, the client's own.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_bind_moves_metrics_off_the_api_port_and_the_log_keeps_a_clients_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 2, "[metrics]\nbind = \"127.0.0.1:0\"\n");
    let kiln = KilnProcess::serve(&config, &dir.path().join("data"), &[]);
    let listening = kiln.logged("kiln is listening");
    let metrics_address = listening[0]["metrics_address"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(format!("http://{metrics_address}"), kiln.base);
    let http = reqwest::Client::new();
    let on_api_port = http
        .get(format!("{}/metrics", kiln.base))
        .header("x-request-id", "client-trace-7")
        .send()
        .await
        .unwrap();
    assert_eq!(on_api_port.status(), 404);
    let ours = on_api_port.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(ours, "client-trace-7");
    let scraped = http
        .get(format!("http://{metrics_address}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(scraped.text().await.unwrap().contains("kiln_queue_depth"));

    // The access line is written after the answer: give the log reader a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let lines = kiln.logged("request");
        if let Some(line) = lines.into_iter().find(|l| l["request_id"] == ours.as_str()) {
            break line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access line for {ours}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["client_request_id"], "client-trace-7", "{line}");
    assert_eq!(line["status"], 404, "{line}");
}

/// `workers.devices` places the slots: a GPU this build cannot open stops kiln at start with
/// the reason (never at the first job). On the CPU, two slots share `memory_budget_gib`: an
/// image whose estimated need is over it fails with the sizes and what to do, and one within it
/// is generated.
#[tokio::test(flavor = "multi_thread")]
async fn slots_are_placed_on_their_devices_within_the_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 2, "");
    if !cfg!(feature = "cuda") {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .args(["--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("gpu"))
            .args(["serve", "--bind", "127.0.0.1:0"])
            .env("KILN_WORKERS__DEVICES", "[\"cpu\", \"cuda:1\"]")
            .env("KILN_WORKERS__SLOTS", "2")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let out = exits_within(command, Duration::from_secs(120));
        assert!(!out.status.success(), "kiln started without the GPU");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cuda:1") && stderr.contains("built without CUDA"),
            "{stderr}"
        );
    }

    let serve = |budget: &str| {
        let env = [
            ("KILN_WORKERS__DEVICES", "[\"cpu\"]"),
            ("KILN_WORKERS__SLOTS", "2"),
            ("KILN_WORKERS__MEMORY_BUDGET_GIB", budget),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let data = dir.path().join(format!("data-{budget}"));
        KilnProcess::serve_with_env(&config, &data, "127.0.0.1:0", &[], &env)
    };
    let small = serve("0.25");
    let client = Client::new(&small.base, small.first_key.as_deref().unwrap());
    let failed = client
        .run(PRO, input("a blue star"), Duration::from_secs(60))
        .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "invalid_input", "{failed}");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("needs about")
            && message.contains("may use 256 MiB (workers.memory_budget_gib)")
            && message.contains("a smaller image size fits"),
        "{message}"
    );
    drop(small);

    let roomy = serve("1");
    let client = Client::new(&roomy.base, roomy.first_key.as_deref().unwrap());
    let done = client
        .run(PRO, input("a blue star"), Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

/// Waits for `command` to exit, killing it (and failing) if it runs past `limit`.
fn exits_within(mut command: std::process::Command, limit: Duration) -> std::process::Output {
    let mut child = command.spawn().unwrap();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}
