//! Starting kiln (as a process or in-process) and talking to it.

use kiln::app::Application;
use kiln::config::Settings;
use kiln_api::auth::{hash_token, new_token, token_prefix};
use kiln_core::catalog::Route;
use kiln_testkit::ScriptedEngine;
use kiln_worker::{EngineSet, Slot};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const PRO: &str = "blackforestlabs/flux-1-1-pro/text-to-image";
pub const FLEX: &str = "blackforestlabs/flux-2/flex/text-to-image";
pub const EDIT: &str = "blackforestlabs/flux-2/flex/edit";

/// The FLUX.1 engine's tiny schnell-like checkpoint (diffusers layout), made by
/// `tools/reference` with random weights: real loading and inference, in about a second.
pub fn tiny_checkpoint() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiln-engine/tests/fixtures/schnell-diffusers")
}

/// A configuration file serving the FLUX 1.1 route from the tiny checkpoint.
pub fn write_config(dir: &Path, steps: u32, extra: &str) -> PathBuf {
    write_config_for(dir, &tiny_checkpoint(), steps, extra)
}

/// A configuration file serving the FLUX 1.1 route from `checkpoint`.
pub fn write_config_for(dir: &Path, checkpoint: &Path, steps: u32, extra: &str) -> PathBuf {
    let path = dir.join("kiln.toml");
    let config = format!(
        "[models.\"{PRO}\"]\ncheckpoint = {:?}\nsteps = {steps}\n{extra}",
        checkpoint.display().to_string()
    );
    std::fs::write(&path, config).unwrap();
    path
}

/// A configuration file serving the FLUX.2 routes (text-to-image and edit) from the engine's
/// `{fixture}-diffusers` checkpoint (`klein`, `flux2-dev`), with `extra` configuration.
pub fn write_flux2_config(dir: &Path, fixture: &str, extra: &str) -> PathBuf {
    let checkpoint = tiny_checkpoint().join(format!("../{fixture}-diffusers"));
    let path = dir.join("kiln.toml");
    let config = format!(
        "[models.\"{FLEX}\"]\ncheckpoint = {:?}\n{extra}",
        checkpoint.display().to_string()
    );
    std::fs::write(&path, config).unwrap();
    path
}

/// The tiny checkpoint as users keep BFL single files: `transformer` (a `flux1-*.safetensors` or
/// `*.gguf` file of the fixtures) and `ae.safetensors` beside the text encoders' folders.
pub fn bfl_checkpoint(dir: &Path, transformer: &str) -> PathBuf {
    let fixtures = tiny_checkpoint().join("..");
    let root = dir.join("bfl");
    std::fs::create_dir(&root).unwrap();
    let link =
        |from: PathBuf, name: &str| std::os::unix::fs::symlink(from, root.join(name)).unwrap();
    let transformer = fixtures.join(transformer);
    link(
        transformer.clone(),
        transformer.file_name().unwrap().to_str().unwrap(),
    );
    link(
        fixtures.join("schnell-bfl/ae.safetensors"),
        "ae.safetensors",
    );
    for part in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"] {
        link(fixtures.join("schnell-diffusers").join(part), part);
    }
    root
}

/// A `kiln` process. Killed (SIGKILL) when dropped.
pub struct KilnProcess {
    child: Child,
    /// Its log so far (it logs JSON): one value per line.
    log: Shared<Vec<Value>>,
    /// `http://127.0.0.1:PORT` once a `serve` process listens.
    pub base: String,
    /// The key a first start printed, if it did.
    pub first_key: Option<String>,
}

/// Environment variables for a child `kiln` (beside the test's own, which it inherits).
pub type Env = [(String, String)];

fn kiln_command(config: &Path, data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .env("KILN_LOG_FORMAT", "json")
        .env("RUST_LOG", "info,sqlx=warn")
        .stdin(Stdio::null());
    command
}

impl KilnProcess {
    /// `kiln serve` on a free loopback port, waiting until it listens.
    pub fn serve(config: &Path, data_dir: &Path, extra: &[&str]) -> Self {
        let mut command = kiln_command(config, data_dir);
        command.args(["serve", "--bind", "127.0.0.1:0"]).args(extra);
        Self::serving(command)
    }

    /// `kiln serve` on `bind` (`127.0.0.1:PORT`) with these environment variables, waiting until
    /// it listens.
    pub fn serve_with_env(
        config: &Path,
        data_dir: &Path,
        bind: &str,
        extra: &[&str],
        env: &Env,
    ) -> Self {
        let mut command = kiln_command(config, data_dir);
        command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["serve", "--bind", bind])
            .args(extra);
        Self::serving(command)
    }

    /// `kiln worker` with these environment variables; with `metrics`, its metrics and health
    /// listener on a free loopback port (`base` is its URL), waited for.
    pub fn worker_with_env(config: &Path, data_dir: &Path, env: &Env, metrics: bool) -> Self {
        let mut command = kiln_command(config, data_dir);
        command.envs(env.iter().map(|(k, v)| (k, v)));
        if metrics {
            command.env("KILN_WORKERS__METRICS_BIND", "127.0.0.1:0");
        }
        command.arg("worker");
        let (mut child, listening, _) = spawn_watched(command);
        let base = if metrics {
            wait_listening(&mut child, &listening)
        } else {
            String::new()
        };
        let log = listening.lock().unwrap().log.clone();
        KilnProcess {
            child,
            log,
            base,
            first_key: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped while we hold it.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(sent, 0, "kill({}, {signal}) failed", self.child.id());
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<Value> {
        self.log.lock().unwrap().clone()
    }

    /// Starts `command` (a `kiln serve` that logs JSON) and waits until it listens.
    pub fn serving(command: Command) -> Self {
        let (mut child, listening, stdout) = spawn_watched(command);
        let log = listening.lock().unwrap().log.clone();
        let base = wait_listening(&mut child, &listening);
        // kiln logs the key's creation (stderr) before it listens, and prints the token on
        // stdout, which another thread reads: wait for that line when a key was made.
        let key_made = listening.lock().unwrap().key_made;
        let deadline = Instant::now() + Duration::from_secs(10);
        let first_key = loop {
            let key = stdout
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.trim().starts_with("kiln_"))
                .map(|l| l.trim().to_string());
            if key.is_some() || !key_made {
                break key;
            }
            assert!(
                Instant::now() < deadline,
                "a key was made but its token never printed"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        KilnProcess {
            child,
            log,
            base,
            first_key,
        }
    }

    /// The log lines so far whose `message` is `message`.
    pub fn logged(&self, message: &str) -> Vec<Value> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|e| e["message"] == message)
            .cloned()
            .collect()
    }

    /// `kiln worker` (no listener).
    pub fn worker(config: &Path, data_dir: &Path) -> Self {
        let mut command = kiln_command(config, data_dir);
        command.arg("worker");
        let (child, listening, _) = spawn_watched(command);
        let log = listening.lock().unwrap().log.clone();
        KilnProcess {
            child,
            log,
            base: String::new(),
            first_key: None,
        }
    }

    /// `kiln worker` with its metrics listener on a free loopback port (`base` is its URL).
    pub fn worker_with_metrics(config: &Path, data_dir: &Path) -> Self {
        let mut command = kiln_command(config, data_dir);
        command
            .env("KILN_WORKERS__METRICS_BIND", "127.0.0.1:0")
            .arg("worker");
        let (mut child, listening, _) = spawn_watched(command);
        let base = wait_listening(&mut child, &listening);
        let log = listening.lock().unwrap().log.clone();
        KilnProcess {
            child,
            log,
            base,
            first_key: None,
        }
    }

    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (within `timeout`).
    pub fn sigterm(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kiln did not stop within {timeout:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KilnProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Shared<T> = Arc<Mutex<T>>;

/// What the log of a starting kiln has said so far.
#[derive(Default)]
struct Startup {
    address: Option<String>,
    key_made: bool,
    log: Shared<Vec<Value>>,
}

/// Waits for the "kiln is listening" log line and returns `http://ADDRESS`.
fn wait_listening(child: &mut Child, listening: &Shared<Startup>) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(address) = listening.lock().unwrap().address.clone() {
            return format!("http://{address}");
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("kiln exited before listening: {status}");
        }
        assert!(Instant::now() < deadline, "kiln did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `command`, echoing its output to the test's (shown on failure), noting what its startup
/// log says (the address a "kiln is listening" line names, whether a first key was made), and
/// keeping stdout's lines.
fn spawn_watched(mut command: Command) -> (Child, Shared<Startup>, Shared<Vec<String>>) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let listening: Shared<Startup> = Arc::default();
    let stdout_lines: Shared<Vec<String>> = Arc::default();
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    {
        let listening = listening.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[kiln] {line}");
                let Ok(event) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let mut startup = listening.lock().unwrap();
                startup.log.lock().unwrap().push(event.clone());
                if event["message"] == "kiln is listening" {
                    startup.address = event["address"].as_str().map(str::to_string);
                }
                if event["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("first start: created an API key"))
                {
                    startup.key_made = true;
                }
            }
        });
    }
    {
        let lines = stdout_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("[kiln stdout] {line}");
                lines.lock().unwrap().push(line);
            }
        });
    }
    (child, listening, stdout_lines)
}

/// Runs `kiln ARGS` to completion: (success, stdout, stderr).
pub fn kiln_run(config: &Path, data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    kiln_run_with_env(config, data_dir, args, &[])
}

/// [`kiln_run`] with these environment variables set.
pub fn kiln_run_with_env(
    config: &Path,
    data_dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let mut command = kiln_command(config, data_dir);
    command.envs(env.iter().copied());
    let out = command.args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Runs `kiln ARGS` with these environment variables for at most `timeout`: its exit status
/// (`None`: still running at the deadline, then killed), stdout and stderr.
pub fn kiln_run_within(
    config: &Path,
    data_dir: &Path,
    args: &[&str],
    env: &Env,
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let mut command = kiln_command(config, data_dir);
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let read = |pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(pipe).read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, stdout.join().unwrap(), stderr.join().unwrap())
}

/// A client of one kiln, with one token.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Self {
            base: base.to_string(),
            token: token.to_string(),
            http,
        }
    }

    /// (status, JSON body) of a request with this client's token.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        self.try_call(method, path, body).await.unwrap()
    }

    /// As [`Client::call`], or the transport error (a server that died mid-request).
    pub async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut request = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// A submit carrying an `Idempotency-Key`, or the transport error (a server that died).
    pub async fn try_submit_idempotent(
        &self,
        model: &str,
        input: &Value,
        key: &str,
    ) -> Result<(u16, Value), reqwest::Error> {
        let response = self
            .http
            .post(format!("{}/v1/models/{model}", self.base))
            .bearer_auth(&self.token)
            .header("Idempotency-Key", key)
            .json(input)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    pub async fn submit(&self, model: &str, input: Value) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/models/{model}"),
            Some(&input),
        )
        .await
    }

    pub async fn status(&self, id: &str) -> Value {
        let (code, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/requests/{id}/status"),
                None,
            )
            .await;
        assert_eq!(code, 200, "{body}");
        body
    }

    pub async fn result(&self, id: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/requests/{id}/result"),
            None,
        )
        .await
    }

    pub async fn cancel(&self, id: &str) -> Value {
        let (code, body) = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/requests/{id}/cancel"),
                None,
            )
            .await;
        assert_eq!(code, 202, "{body}");
        body
    }

    /// Submits `input` (which must be accepted) and waits for its job to end: the result.
    pub async fn run(&self, model: &str, input: Value, timeout: Duration) -> Value {
        let (code, submitted) = self.submit(model, input).await;
        assert_eq!(code, 200, "{submitted}");
        self.wait_result(submitted["request_id"].as_str().unwrap(), timeout)
            .await
    }

    /// Polls the result until the job has ended.
    pub async fn wait_result(&self, id: &str, timeout: Duration) -> Value {
        self.wait_status(id, &["succeeded", "failed", "cancelled"], timeout)
            .await
    }

    /// Polls the result until its status is one of `statuses`.
    pub async fn wait_status(&self, id: &str, statuses: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (code, body) = self.result(id).await;
            assert_eq!(code, 200, "{body}");
            if statuses.iter().any(|s| body["status"] == *s) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "request {id} still {} after {timeout:?}",
                body["status"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Downloads a result URL with no token, as real clients do.
    pub async fn download(&self, url: &str) -> (u16, Option<String>, Vec<u8>) {
        let response = reqwest::get(url).await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        (
            status,
            content_type,
            response.bytes().await.unwrap().to_vec(),
        )
    }
}

pub fn input(prompt: &str) -> Value {
    json!({ "prompt": prompt, "image_size": "Custom", "width": 256, "height": 256 })
}

/// An in-process kiln whose workers run the scripted test engine (for tests that must control
/// how long a job takes); stopped when dropped.
pub struct InProcess {
    pub client: Client,
    pub other: Client,
    pub engine: Arc<ScriptedEngine>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl InProcess {
    pub async fn start(configure: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings {
            bind: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            ..Settings::default()
        };
        settings.workers.poll_interval_ms = 20;
        configure(&mut settings);
        let engine = Arc::new(ScriptedEngine::default());
        let engines = EngineSet::new()
            .with(Route::Flux11ProTextToImage, engine.clone())
            .with(Route::Flux2FlexTextToImage, engine.clone());
        let slots = Slot::new(engines).repeat(settings.workers.slots);
        let app = Application::build(settings, slots).await.unwrap();
        let base = format!("http://{}", app.address());
        let mut tokens = vec![];
        for name in ["alice", "bob"] {
            let token = new_token();
            app.stores()
                .keys
                .insert_key(name, &hash_token(&token), &token_prefix(&token))
                .await
                .unwrap();
            tokens.push(token);
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        InProcess {
            client: Client::new(&base, &tokens[0]),
            other: Client::new(&base, &tokens[1]),
            engine,
            shutdown,
            _dir: dir,
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Every file under `dir` (none when it does not exist).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
