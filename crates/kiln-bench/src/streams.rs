//! `kiln-bench streams`: what open status streams cost an API node.
//!
//! It starts `kiln serve --workers 0` as a child process (no engine: submitted requests stay
//! queued, so every stream stays open), submits `--streams` requests, and then, from this
//! process on the same machine:
//!
//! 1. opens one `GET /v1/requests/{id}/status/stream` per request, each on its own connection,
//!    and reads each stream's first event: the server's resident memory before and after, per
//!    stream;
//! 2. leaves them open for `--seconds`: the server's CPU time while nothing changes (each
//!    stream gets its keep-alive comment every 15 s);
//! 3. cancels the request at the head of the queue `--cancels` times, one a second: every
//!    other stream's queue position changes, so each cancel is one event to every open stream.
//!    Reported: the server's CPU time per cancel, and how long after the cancel's answer the
//!    last stream had its new event (the fan-out time);
//! 4. the peer, in the same run: the same number of clients polling `GET …/status` once a
//!    second each (what a client without the stream does) for `--seconds`: the server's CPU
//!    time, and the streams' idle cost over the polling's as a ratio.
//!
//! Memory and CPU are read from `/proc/{pid}` of the server process (Linux only).

use crate::http::{kiln_binary, Call, Connection, Server, SUBMIT_BODY, SUBMIT_PATH};
use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(clap::Args)]
pub struct StreamsArgs {
    /// The `kiln` binary to measure (default: the one beside this executable).
    #[arg(long)]
    kiln: Option<PathBuf>,
    /// Status streams open at once (one request each).
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// How long the idle and the polling phases each last, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Requests cancelled at the head of the queue, one a second.
    #[arg(long, default_value_t = 10)]
    cancels: usize,
    /// Threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also append the results as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// The server process's resident memory (bytes) and CPU time (seconds) so far.
#[derive(Debug, Clone, Copy)]
struct Usage {
    rss: u64,
    cpu: f64,
}

fn usage(pid: u32) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let fields: Vec<&str> = stat[stat.rfind(')').context("bad stat")? + 2..]
        .split(' ')
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(Usage {
        rss: rss_kib * 1024,
        cpu: ticks / clock_ticks_per_second(),
    })
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// What the run measured.
struct Measured {
    streams: usize,
    before_open: Usage,
    after_open: Usage,
    idle_cpu: f64,
    cancels: usize,
    cancel_cpu: f64,
    /// Per cancel: the time until the last stream had its new event.
    fan_out: Vec<Duration>,
    events_during_cancels: u64,
    polling_cpu: f64,
    polls: u64,
    seconds: u64,
}

pub fn run(args: &StreamsArgs) -> anyhow::Result<()> {
    let kiln = kiln_binary(args.kiln.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let connections = (args.streams * 2 + 64).to_string();
    let server = Server::start(
        &kiln,
        &[
            ("KILN_WORKERS__SLOTS", "0"),
            ("KILN_LIMITS__MAX_CONNECTIONS", &connections),
        ],
    )?;
    let measured = runtime.block_on(measure(args, &server))?;
    drop(server);
    crate::print_report(&report(&kiln, args, &measured), args.markdown.as_deref())
}

async fn measure(args: &StreamsArgs, server: &Server) -> anyhow::Result<Measured> {
    let pid = server.child.id();
    let ids = submit_all(server, args.streams).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_open = usage(pid)?;
    let (events, mut received) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, id) in ids.iter().enumerate() {
        let (address, token, id, events) = (
            server.address,
            server.token.clone(),
            id.clone(),
            events.clone(),
        );
        tasks.spawn(async move { follow(address, &token, &id, index, events).await });
    }
    drop(events);
    let mut first = vec![false; ids.len()];
    let mut seen = 0;
    while seen < ids.len() {
        let (index, _) = received.recv().await.context("streams ended early")?;
        if !std::mem::replace(&mut first[index], true) {
            seen += 1;
        }
    }
    eprintln!("{} streams open", ids.len());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_open = usage(pid)?;
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let idle_cpu = usage(pid)?.cpu - after_open.cpu;
    while received.try_recv().is_ok() {}
    let (fan_out, events_during_cancels, cancel_cpu) =
        cancel_head(server, &ids, args.cancels, &mut received).await?;
    tasks.abort_all();
    drop(received);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_polling = usage(pid)?.cpu;
    let polls = poll_all(server, &ids, Duration::from_secs(args.seconds)).await?;
    let polling_cpu = usage(pid)?.cpu - before_polling;
    Ok(Measured {
        streams: ids.len(),
        before_open,
        after_open,
        idle_cpu,
        cancels: args.cancels,
        cancel_cpu,
        fan_out,
        events_during_cancels,
        polling_cpu,
        polls,
        seconds: args.seconds,
    })
}

/// Submits `n` requests from a few connections; their ids in queue order.
async fn submit_all(server: &Server, n: usize) -> anyhow::Result<Vec<String>> {
    let mut conn = Connection::open(server.address).await?;
    let submit = Call {
        method: Method::POST,
        path: SUBMIT_PATH.into(),
        token: Some(server.token.clone()),
        body: Some(SUBMIT_BODY),
    };
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let (code, body) = conn.send(server.address, &submit).await?;
        anyhow::ensure!(code == 200, "submit answered {code}: {body:?}");
        let answer: serde_json::Value = serde_json::from_slice(&body)?;
        ids.push(answer["request_id"].as_str().context("no id")?.to_string());
    }
    Ok(ids)
}

/// Opens `id`'s status stream and sends `(index, when)` for every event it brings.
async fn follow(
    address: SocketAddr,
    token: &str,
    id: &str,
    index: usize,
    events: mpsc::UnboundedSender<(usize, Instant)>,
) -> anyhow::Result<()> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::GET)
        .uri(format!("/v1/requests/{id}/status/stream"))
        .header(HOST, address.to_string())
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    anyhow::ensure!(
        response.status() == 200,
        "stream answered {}",
        response.status()
    );
    let mut body = response.into_body();
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            if event.lines().any(|line| line.starts_with("data:")) {
                let _ = events.send((index, Instant::now()));
            }
        }
    }
    Ok(())
}

/// Cancels the request at the head of the queue `cancels` times, one a second; per cancel, the
/// time until every stream still queued had an event; the events counted; the server's CPU.
async fn cancel_head(
    server: &Server,
    ids: &[String],
    cancels: usize,
    received: &mut mpsc::UnboundedReceiver<(usize, Instant)>,
) -> anyhow::Result<(Vec<Duration>, u64, f64)> {
    let pid = server.child.id();
    let mut conn = Connection::open(server.address).await?;
    let before = usage(pid)?.cpu;
    let (mut fan_out, mut events) = (Vec::new(), 0u64);
    for (k, id) in ids.iter().take(cancels).enumerate() {
        let cancel = Call {
            method: Method::POST,
            path: format!("/v1/requests/{id}/cancel"),
            token: Some(server.token.clone()),
            body: None,
        };
        let (code, _) = conn.send(server.address, &cancel).await?;
        anyhow::ensure!(code == 202, "cancel answered {code}");
        let cancelled_at = Instant::now();
        // Every stream behind the cancelled one moves up (the cancelled one ends).
        let mut waiting: std::collections::HashSet<usize> = (k..ids.len()).collect();
        let mut last = cancelled_at;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, received.recv()).await {
                Ok(Some((index, at))) => {
                    events += 1;
                    if waiting.remove(&index) {
                        last = at;
                    }
                }
                _ => break,
            }
        }
        anyhow::ensure!(
            waiting.is_empty(),
            "{} streams had no event within 1 s of cancel {k}",
            waiting.len()
        );
        fan_out.push(last - cancelled_at);
        tokio::time::sleep_until(deadline).await;
        while let Ok((_, _)) = received.try_recv() {
            events += 1;
        }
    }
    Ok((fan_out, events, usage(pid)?.cpu - before))
}

/// Every request's status polled once a second, each client on its own connection, for
/// `duration`; how many polls were answered.
async fn poll_all(server: &Server, ids: &[String], duration: Duration) -> anyhow::Result<u64> {
    let mut tasks = tokio::task::JoinSet::new();
    let end = tokio::time::Instant::now() + duration;
    for (index, id) in ids.iter().enumerate() {
        let (address, call) = (
            server.address,
            Call {
                method: Method::GET,
                path: format!("/v1/requests/{id}/status"),
                token: Some(server.token.clone()),
                body: None,
            },
        );
        // Spread over the second, as independent clients would be.
        let offset = Duration::from_micros((index as u64 * 1_000_000) / ids.len() as u64);
        tasks.spawn(async move {
            tokio::time::sleep(offset).await;
            let mut conn = Connection::open(address).await?;
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            let mut polls = 0u64;
            while tokio::time::Instant::now() < end {
                ticks.tick().await;
                let (code, _) = conn.send(address, &call).await?;
                anyhow::ensure!(code == 200, "status answered {code}");
                polls += 1;
            }
            anyhow::Ok(polls)
        });
    }
    let mut polls = 0;
    while let Some(joined) = tasks.join_next().await {
        polls += joined??;
    }
    Ok(polls)
}

fn report(kiln: &std::path::Path, args: &StreamsArgs, m: &Measured) -> String {
    let mut out = String::new();
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let grown = m.after_open.rss.saturating_sub(m.before_open.rss);
    let mut fan_out = m.fan_out.clone();
    fan_out.sort();
    let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    let _ = writeln!(
        out,
        "\nkiln-bench streams: {} ({}), {} streams on one API node (`kiln serve --workers 0`, SQLite), load generator on {} threads of the same machine\n",
        kiln.display(),
        crate::cpu_summary(),
        m.streams,
        args.threads
    );
    out.push_str("| what | value |\n|---|---|\n");
    let rows = [
        (
            "server RSS before the streams",
            format!("{:.1} MiB", mib(m.before_open.rss)),
        ),
        (
            "server RSS with the streams open",
            format!("{:.1} MiB", mib(m.after_open.rss)),
        ),
        (
            "memory per open stream",
            format!("{:.1} KiB", grown as f64 / 1024.0 / m.streams as f64),
        ),
        (
            "server CPU, streams open and idle",
            format!(
                "{:.3} s over {} s ({:.2}% of a core)",
                m.idle_cpu,
                m.seconds,
                100.0 * m.idle_cpu / m.seconds as f64
            ),
        ),
        (
            "server CPU per head-of-queue cancel (an event to every stream)",
            format!(
                "{:.1} ms ({} cancels, {} events delivered)",
                1000.0 * m.cancel_cpu / m.cancels as f64,
                m.cancels,
                m.events_during_cancels
            ),
        ),
        (
            "fan-out time of a cancel (last stream's event), p50 / max",
            format!(
                "{:.0} ms / {:.0} ms",
                ms(fan_out.get(fan_out.len() / 2)),
                ms(fan_out.last())
            ),
        ),
        (
            "peer: the same clients polling status once a second",
            format!(
                "{:.3} s over {} s ({:.2}% of a core, {} polls)",
                m.polling_cpu,
                m.seconds,
                100.0 * m.polling_cpu / m.seconds as f64,
                m.polls
            ),
        ),
    ];
    for (what, value) in rows {
        let _ = writeln!(out, "| {what} | {value} |");
    }
    let _ = writeln!(
        out,
        "\nidle streams' CPU over polling's: **{:.3}**",
        m.idle_cpu / m.polling_cpu.max(f64::MIN_POSITIVE)
    );
    out
}
