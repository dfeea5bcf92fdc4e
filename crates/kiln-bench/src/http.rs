//! `kiln-bench http`: the HTTP service's throughput, measured against the built `kiln` binary.
//!
//! It starts `kiln serve` as a child process (the shipped binary, its allocator, logging and
//! configuration as users run it) on a loopback port with a fresh data directory, one worker
//! slot serving the demo checkpoint and no rate limit, makes an API key with `kiln keys create`,
//! and then, from this process on the same machine (sharing its cores, as a load balancer's
//! health checks and clients on the host would):
//!
//! 1. `GET /healthz` and then `GET /v1/requests/{id}/status` (of a finished request) from
//!    `--poll-connections` keep-alive connections, each for `--seconds` after a 1-second warm-up:
//!    requests per second, p50 and p99 latency, and status's rate over healthz's;
//! 2. durable submits (`POST /v1/models/…`, each answered after its commit) from
//!    `--submit-clients` keep-alive connections while the worker generates the queued jobs.
//!
//! Each connection sends its next request when the previous answer has been read in full, so
//! the load is closed-loop and bounded by the connection count and the duration.

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The route the submits go to (served by the demo checkpoint in a default `kiln serve`).
pub(crate) const SUBMIT_PATH: &str = "/v1/models/blackforestlabs/flux-1-1-pro/text-to-image";
pub(crate) const SUBMIT_BODY: &str =
    r#"{"prompt": "a red circle in the top left on a blue background"}"#;
const WARM_UP: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub struct HttpArgs {
    /// The `kiln` binary to measure (default: the one beside this executable, i.e.
    /// target/release/kiln after `cargo build --release -p kiln`).
    #[arg(long)]
    kiln: Option<PathBuf>,
    /// How long each measured phase runs, in seconds (after a 1-second warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Keep-alive connections polling `/healthz` and a request's status.
    #[arg(long, default_value_t = 64)]
    poll_connections: usize,
    /// Clients submitting at once.
    #[arg(long, default_value_t = 32)]
    submit_clients: usize,
    /// Threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also append the results as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// A request every connection of a phase sends over and over.
#[derive(Clone)]
pub(crate) struct Call {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) token: Option<String>,
    pub(crate) body: Option<&'static str>,
}

/// What one phase measured.
struct Load {
    what: String,
    connections: usize,
    ok: u64,
    failed: u64,
    seconds: f64,
    /// The latencies of the successful requests, sorted.
    latencies: Vec<Duration>,
}

impl Load {
    fn per_second(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    fn percentile_ms(&self, p: usize) -> f64 {
        let n = self.latencies.len();
        if n == 0 {
            return f64::NAN;
        }
        self.latencies[(n * p / 100).min(n - 1)].as_secs_f64() * 1e3
    }
}

pub fn run(args: &HttpArgs) -> anyhow::Result<()> {
    let kiln = kiln_binary(args.kiln.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let server = Server::start(&kiln, &[("KILN_WORKERS__SLOTS", "1")])?;
    let loads = runtime.block_on(measure(args, &server))?;
    drop(server);
    let report = report(&kiln, args, &loads);
    crate::print_report(&report, args.markdown.as_deref())
}

/// The `kiln` binary to measure: `given`, or the one beside this executable.
pub(crate) fn kiln_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let kiln = match given {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()?.with_file_name("kiln"),
    };
    anyhow::ensure!(
        kiln.is_file(),
        "no kiln binary at {} (build it: cargo build --release -p kiln, or pass --kiln)",
        kiln.display()
    );
    Ok(kiln)
}

/// The three phases, in order, on one server.
async fn measure(args: &HttpArgs, server: &Server) -> anyhow::Result<Vec<Load>> {
    let duration = Duration::from_secs(args.seconds);
    let token = Some(server.token.clone());
    let id = finished_request(server).await?;
    let healthz = Call {
        method: Method::GET,
        path: "/healthz".into(),
        token: None,
        body: None,
    };
    let status = Call {
        method: Method::GET,
        path: format!("/v1/requests/{id}/status"),
        token: token.clone(),
        body: None,
    };
    let submit = Call {
        method: Method::POST,
        path: SUBMIT_PATH.into(),
        token,
        body: Some(SUBMIT_BODY),
    };
    let polls = args.poll_connections;
    let phases = [
        ("`GET /healthz`", healthz, polls),
        ("`GET /v1/requests/{id}/status`", status, polls),
        (
            "`POST /v1/models/…` (durable submit, worker running)",
            submit,
            args.submit_clients,
        ),
    ];
    let mut loads = vec![];
    for (what, call, connections) in phases {
        load(server.address, &call, connections, WARM_UP).await?;
        let mut measured = load(server.address, &call, connections, duration).await?;
        measured.what = what.into();
        eprintln!(
            "{what}: {:.0} requests/s, p99 {:.1} ms",
            measured.per_second(),
            measured.percentile_ms(99)
        );
        loads.push(measured);
    }
    Ok(loads)
}

/// Submits one request and waits until the worker has finished it (`completed`); returns its id.
async fn finished_request(server: &Server) -> anyhow::Result<String> {
    let mut conn = Connection::open(server.address).await?;
    let submit = Call {
        method: Method::POST,
        path: SUBMIT_PATH.into(),
        token: Some(server.token.clone()),
        body: Some(SUBMIT_BODY),
    };
    let (code, body) = conn.send(server.address, &submit).await?;
    anyhow::ensure!(code == 200, "submit answered {code}: {body:?}");
    let answer: serde_json::Value = serde_json::from_slice(&body)?;
    let id = answer["request_id"]
        .as_str()
        .context("no request_id")?
        .to_string();
    let poll = Call {
        method: Method::GET,
        path: format!("/v1/requests/{id}/status"),
        token: submit.token,
        body: None,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, body) = conn.send(server.address, &poll).await?;
        let status: serde_json::Value = serde_json::from_slice(&body)?;
        match status["status"].as_str() {
            Some("completed") => return Ok(id),
            Some("in_queue" | "in_progress") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            _ => bail!("the first request did not finish: {status}"),
        }
    }
}

/// `connections` connections sending `call` for `duration`.
async fn load(
    address: SocketAddr,
    call: &Call,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Load> {
    let start = Instant::now();
    let deadline = start + duration;
    let call = Arc::new(call.clone());
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move { one_connection(address, &call, deadline).await })
        })
        .collect();
    let (mut ok, mut failed, mut latencies) = (0, 0, vec![]);
    for task in tasks {
        let (times, failures) = task.await??;
        ok += times.len() as u64;
        failed += failures;
        latencies.extend(times);
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort();
    Ok(Load {
        what: String::new(),
        connections,
        ok,
        failed,
        seconds,
        latencies,
    })
}

/// One keep-alive connection's loop: the latencies of its 2xx answers, and how many others.
async fn one_connection(
    address: SocketAddr,
    call: &Call,
    deadline: Instant,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let mut conn = Connection::open(address).await?;
    let (mut times, mut failed) = (Vec::new(), 0);
    while Instant::now() < deadline {
        let sent = Instant::now();
        let (code, _) = conn.send(address, call).await?;
        if (200..300).contains(&code) {
            times.push(sent.elapsed());
        } else {
            failed += 1;
        }
    }
    Ok((times, failed))
}

/// An HTTP/1.1 keep-alive connection.
pub(crate) struct Connection {
    pub(crate) sender: http1::SendRequest<Full<Bytes>>,
}

impl Connection {
    pub(crate) async fn open(address: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    /// Sends `call` and reads the whole answer: its status code and body.
    pub(crate) async fn send(
        &mut self,
        address: SocketAddr,
        call: &Call,
    ) -> anyhow::Result<(u16, Bytes)> {
        let mut request = Request::builder()
            .method(call.method.clone())
            .uri(&call.path)
            .header(HOST, address.to_string());
        if let Some(token) = &call.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match call.body {
            Some(body) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Full::new(Bytes::from_static(body.as_bytes()))
            }
            None => Full::new(Bytes::new()),
        };
        self.sender.ready().await?;
        let response = self.sender.send_request(request.body(body)?).await?;
        let code = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((code, body))
    }
}

/// A `kiln serve` child process with its own data directory; killed and removed on drop.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) address: SocketAddr,
    pub(crate) token: String,
    data: PathBuf,
}

impl Server {
    /// `kiln serve` with the benchmark's settings and `env` (worker slots, limits) on top.
    pub(crate) fn start(kiln: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let data = std::env::temp_dir().join(format!("kiln-bench-http-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        let config = data.join("kiln.toml");
        std::fs::write(&config, "")?;
        let command = |args: &[&str]| {
            let mut command = Command::new(kiln);
            command
                .args(args)
                .env_remove("RUST_LOG")
                .env("KILN_CONFIG", &config)
                .env("KILN_DATA_DIR", &data)
                .env("KILN_LOG_FORMAT", "json")
                .env("KILN_LIMITS__MAX_QUEUED", "100000000")
                // One key submits everything: its share of the queue must not stop the run.
                .env("KILN_LIMITS__MAX_QUEUED_PER_KEY", "100000000")
                .env("KILN_LIMITS__RATE_LIMIT_PER_MINUTE", "0")
                .envs(env.iter().copied());
            command
        };
        let created = command(&["keys", "create", "--name", "bench"]).output()?;
        anyhow::ensure!(
            created.status.success(),
            "kiln keys create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let token = String::from_utf8(created.stdout)?
            .lines()
            .find(|line| line.trim().starts_with("kiln_"))
            .context("kiln keys create printed no token")?
            .trim()
            .to_string();
        let mut child = command(&["serve", "--bind", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let address = listening_address(&mut child)?;
        Ok(Self {
            child,
            address,
            token,
            data,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Reads the child's log until "kiln is listening" names its address; a thread keeps draining
/// the log afterwards (a full pipe would block the server).
fn listening_address(child: &mut Child) -> anyhow::Result<SocketAddr> {
    let stderr = child.stderr.take().context("no stderr")?;
    let (found, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // A plain search, not a JSON parse: once serving, kiln writes an access-log line
            // per request, and this thread shares the machine with the server it measures.
            if line.contains(r#""level":"ERROR""#) || line.contains(r#""level":"WARN""#) {
                eprintln!("[kiln] {line}");
            }
            if found.is_some() && line.contains("kiln is listening") {
                let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if let (Some(found), Some(address)) = (found.take(), event["address"].as_str()) {
                    let _ = found.send(address.to_string());
                }
            }
        }
    });
    let address = address
        .recv_timeout(Duration::from_secs(120))
        .context("kiln did not start listening within 120 s")?;
    Ok(address.parse()?)
}

/// The Markdown report: the machine, the command, the table and the ratio.
fn report(kiln: &Path, args: &HttpArgs, loads: &[Load]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nkiln-bench http: {} ({}), {} s per phase, load generator on {} threads of the same machine\n",
        kiln.display(),
        crate::cpu_summary(),
        args.seconds,
        args.threads
    );
    out.push_str("| what | connections | requests/s | p50 ms | p99 ms | non-2xx |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for l in loads {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} |",
            l.what,
            l.connections,
            l.per_second(),
            l.percentile_ms(50),
            l.percentile_ms(99),
            l.failed
        );
    }
    if let [healthz, status, ..] = loads {
        let _ = writeln!(
            out,
            "\nstatus/healthz requests per second: **{:.2}**",
            status.per_second() / healthz.per_second()
        );
    }
    out
}
