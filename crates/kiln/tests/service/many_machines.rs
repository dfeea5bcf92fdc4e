//! Many machines (issue 15 items 5-7): API nodes (`kiln serve --workers 0`) and workers
//! (`kiln worker`) as separate processes, each with a data directory of its own, sharing one
//! PostgreSQL database (`store.url`) and one S3-compatible bucket (`blobs.url`, the in-process
//! s3s-fs server of kiln-testkit). The happy path, the clear errors of a start that cannot
//! reach or read its stores, and a chaos run: workers SIGKILLed and SIGSTOPped mid-job and an
//! API node SIGKILLed under load, after which every accepted request has ended exactly once.
//!
//! Each test skips (printing SKIPPED) when PostgreSQL does not answer on 127.0.0.1:5432, except
//! under CI, where it fails. The database is inspected with `psql` where the test needs what
//! the API does not show (which worker holds a job, how many times it was claimed).

use crate::harness::{input, kiln_run_within, walk, write_config, Client, Env, KilnProcess, PRO};
use kiln_testkit::postgres::{fresh_database, TestDatabase};
use kiln_testkit::s3::S3Server;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The URL-signing key every API node of a cluster shares.
const SIGNING_KEY: &str = "8c3f0a5e1d7b294c6e0f8a3b5d7c9e1f2a4b6c8d0e1f3a5b7c9d1e3f5a7b9c0d";
/// The shortest lease kiln takes: a dead or frozen worker's job is taken over within seconds.
const LEASE_SECS: u64 = 3;

/// One PostgreSQL database and one bucket, and the configuration every node of the cluster
/// reads (the tiny FLUX.1 checkpoint, `steps` steps).
pub(crate) struct Cluster {
    db: TestDatabase,
    s3: S3Server,
    /// The objects' prefix in the bucket (`blobs.url = s3://BUCKET/PREFIX`), if any.
    prefix: Option<&'static str>,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Cluster {
    /// `None` when PostgreSQL does not answer (the test skips; not under CI).
    async fn start(steps: u32, prefix: Option<&'static str>) -> Option<Cluster> {
        Self::start_with(steps, prefix, "").await
    }

    /// As [`Cluster::start`], with `model` (lines of the model's table) added to the model's
    /// configuration.
    pub(crate) async fn start_with(
        steps: u32,
        prefix: Option<&'static str>,
        model: &str,
    ) -> Option<Cluster> {
        let db = fresh_database().await?;
        let s3 = S3Server::start();
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            steps,
            &format!(
                "{model}[limits]\nrate_limit_per_minute = 0\n[workers]\npoll_interval_ms = 100\n"
            ),
        );
        Some(Cluster {
            db,
            s3,
            prefix,
            dir,
            config,
        })
    }

    fn blobs_url(&self) -> String {
        match self.prefix {
            Some(prefix) => format!("s3://{}/{prefix}", self.s3.bucket()),
            None => format!("s3://{}", self.s3.bucket()),
        }
    }

    /// What every node gets: the stores, the S3 credentials, the lease and its retries.
    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .s3
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        for (key, value) in [
            ("KILN_STORE__URL", self.db.url().to_string()),
            ("KILN_BLOBS__URL", self.blobs_url()),
            ("KILN_WORKERS__LEASE_SECS", LEASE_SECS.to_string()),
            // Enough that a job retaken after a kill, a freeze or a late beat on a busy machine
            // still ends succeeded.
            ("KILN_WORKERS__MAX_ATTEMPTS", "20".to_string()),
        ] {
            env.push((key.to_string(), value));
        }
        env
    }

    /// An API node's environment: the cluster's, the shared signing key, its own public URL.
    fn api_env(&self, port: u16) -> Vec<(String, String)> {
        let mut env = self.env();
        env.push(("KILN_SIGNING_KEY".into(), SIGNING_KEY.into()));
        env.push(("KILN_PUBLIC_URL".into(), format!("http://127.0.0.1:{port}")));
        env
    }

    /// A node's own (empty) data directory.
    fn data_dir(&self, node: &str) -> PathBuf {
        let dir = self.dir.path().join(node);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `kiln serve --workers 0` on `127.0.0.1:{port}`.
    pub(crate) fn api_node(&self, node: &str, port: u16) -> KilnProcess {
        KilnProcess::serve_with_env(
            &self.config,
            &self.data_dir(node),
            &format!("127.0.0.1:{port}"),
            &["--workers", "0"],
            &self.api_env(port),
        )
    }

    /// `kiln worker` (no signing key: workers sign nothing).
    pub(crate) fn worker(&self, node: &str, metrics: bool) -> KilnProcess {
        KilnProcess::worker_with_env(&self.config, &self.data_dir(node), &self.env(), metrics)
    }

    /// `kiln ARGS` run to its end (at most a minute) from `node`'s data directory.
    pub(crate) fn run(&self, node: &str, args: &[&str]) -> (bool, String, String) {
        let (status, stdout, stderr) = kiln_run_within(
            &self.config,
            &self.data_dir(node),
            args,
            &self.env(),
            Duration::from_secs(60),
        );
        let status = status.unwrap_or_else(|| panic!("kiln {args:?} did not end: {stderr}"));
        (status.success(), stdout, stderr)
    }

    /// The bucket's object key of the result file a URL (`…/files/KEY?…`) names.
    fn object_of(&self, url: &str) -> String {
        let key = blob_key(url);
        match self.prefix {
            Some(prefix) => format!("{prefix}/{key}"),
            None => key,
        }
    }

    /// Rows of a query on the cluster's database, through `psql`, fields split.
    async fn sql(&self, query: &str) -> Vec<Vec<String>> {
        psql(self.db.url(), query).await
    }
}

/// Runs `query` with `psql` on `url`: its rows, tab-separated fields split.
async fn psql(url: &str, query: &str) -> Vec<Vec<String>> {
    let (url, query) = (url.to_string(), query.to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .args([url.as_str(), "-qAtX", "-F", "\t", "-c", query.as_str()])
            .output()
    })
    .await
    .unwrap()
    .expect("psql (PostgreSQL's client) is needed to look into the test database");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// A port free on loopback now, for a node whose public URL must be known before it starts.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `KEY` of `http://HOST/files/KEY?expires=…&sig=…`.
fn blob_key(url: &str) -> String {
    let path = url.split('?').next().unwrap();
    let (_, key) = path
        .rsplit_once("/files/")
        .unwrap_or_else(|| panic!("not a file URL: {url}"));
    key.to_string()
}

/// `url` with its scheme and authority replaced by `base`'s (the same file, from another node).
fn rebased(url: &str, base: &str) -> String {
    let after_scheme = url.find("://").unwrap() + 3;
    let path_start = after_scheme + url[after_scheme..].find('/').unwrap();
    format!("{base}{}", &url[path_start..])
}

fn decoded_size(bytes: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(bytes).expect("a decodable image");
    (img.width(), img.height())
}

/// A node on shared stores keeps neither images nor a store of its own on its disk.
fn assert_no_local_results(cluster: &Cluster, nodes: &[&str]) {
    for node in nodes {
        let dir = cluster.dir.path().join(node);
        for file in walk(&dir) {
            let name = file.file_name().unwrap().to_string_lossy().to_lowercase();
            let image = [".jpeg", ".jpg", ".png", ".webp", ".bin"]
                .iter()
                .any(|ext| name.ends_with(ext));
            let local_store = name.starts_with("kiln.db");
            let under_files = file.strip_prefix(&dir).unwrap().starts_with("files");
            assert!(
                !(image || local_store || under_files),
                "{node} keeps {} on its own disk (its stores are PostgreSQL and S3)",
                file.display()
            );
        }
    }
}

/// The worker's id (`HOST-PID-SLOT`) for the one slot of the `kiln worker` with process id `pid`.
fn worker_pattern(pid: u32) -> String {
    format!("%-{pid}-0")
}

/// The job the worker process `pid` holds now, if any.
async fn running_job_of(cluster: &Cluster, pid: u32) -> Option<String> {
    let rows = cluster
        .sql(&format!(
            "SELECT id FROM jobs WHERE state = 'running' AND worker LIKE '{}'",
            worker_pattern(pid)
        ))
        .await;
    rows.into_iter().next().map(|r| r[0].clone())
}

/// Waits (at most `timeout`) until the worker process `pid` starts a job other than the one it
/// held when called, and returns its id: a job it has only just claimed, so still mid-run.
async fn fresh_job_of(cluster: &Cluster, pid: u32, timeout: Duration) -> String {
    let before = running_job_of(cluster, pid).await;
    let deadline = Instant::now() + timeout;
    loop {
        let now = running_job_of(cluster, pid).await;
        if let Some(id) = now {
            if Some(&id) != before.as_ref() {
                return id;
            }
        }
        assert!(
            Instant::now() < deadline,
            "worker {pid} started no new job within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that job `id` is running, held by the worker process `pid` (which was just `what`).
async fn assert_held_by(cluster: &Cluster, id: &str, pid: u32, what: &str) {
    let rows = cluster
        .sql(&format!("SELECT state, worker FROM jobs WHERE id = '{id}'"))
        .await;
    assert!(
        rows.len() == 1 && rows[0][0] == "running" && rows[0][1].ends_with(&format!("-{pid}-0")),
        "the worker was {what} mid-job: {id} is {rows:?}"
    );
}

/// Waits until the worker's log says its one slot has started (its engine is loaded).
async fn wait_slot_started(worker: &KilnProcess) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while worker.logged("worker slot started").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the worker never started its slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `job ended` lines of a worker's log: (request id, outcome).
fn jobs_ended(worker: &KilnProcess) -> Vec<(String, String)> {
    worker
        .logged("job ended")
        .iter()
        .map(|line| {
            let id = line["span"]["request_id"]
                .as_str()
                .unwrap_or_else(|| panic!("a job line names its request: {line}"));
            (
                id.to_string(),
                line["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The log lines a worker wrote in the span of job `id`.
fn lines_of_job(worker: &KilnProcess, id: &str) -> Vec<Value> {
    worker
        .log_lines()
        .into_iter()
        .filter(|l| l["span"]["request_id"] == id)
        .collect()
}

/// Item 5: an API node and a worker, each on a machine of its own in all but name (own data
/// directory, nothing shared but PostgreSQL and the bucket), serve a request end to end.
#[tokio::test(flavor = "multi_thread")]
async fn an_api_node_and_a_worker_share_only_postgresql_and_the_bucket() {
    let Some(cluster) = Cluster::start(2, None).await else {
        return;
    };
    // Keys live in the store: made from one machine, listed from another.
    let (ok, token, err) = cluster.run("admin", &["keys", "create", "--name", "ci"]);
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert!(token.starts_with("kiln_"), "{token}");
    let (ok, list, err) = cluster.run("elsewhere", &["keys", "list"]);
    assert!(ok && list.contains("ci"), "{list}{err}");
    assert!(
        !list.contains(&token),
        "the list never shows tokens: {list}"
    );

    let port = free_port();
    let api = cluster.api_node("api", port);
    assert_eq!(api.base, format!("http://127.0.0.1:{port}"));
    assert_eq!(api.first_key, None, "the store has a key, so none is made");
    let listening = &api.logged("kiln is listening")[0];
    assert!(
        listening["store"]
            .as_str()
            .unwrap()
            .starts_with("postgres://"),
        "{listening}"
    );
    assert!(
        listening["blob_store"]
            .as_str()
            .unwrap()
            .starts_with("s3://"),
        "{listening}"
    );
    let worker = cluster.worker("worker", true);

    let client = Client::new(&api.base, &token);
    let result = client
        .run(
            PRO,
            input("a red circle on a blue background"),
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(result["status"], "succeeded", "{result}");
    let url = result["output"]["image"].as_str().unwrap();
    assert!(
        url.starts_with(&api.base),
        "the API node's public URL: {url}"
    );
    let (code, content_type, bytes) = client.download(url).await;
    assert_eq!((code, content_type.as_deref()), (200, Some("image/jpeg")));
    assert_eq!(decoded_size(&bytes), (256, 256));
    assert_eq!(
        cluster.s3.object_keys(),
        vec![cluster.object_of(url)],
        "the image is the bucket's one object"
    );
    assert_no_local_results(&cluster, &["admin", "elsewhere", "api", "worker"]);

    // The worker, which has no API port, answers an orchestrator's probes on its own.
    let ready = reqwest::get(format!("{}/readyz", worker.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    let live = reqwest::get(format!("{}/healthz", worker.base))
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let rows = cluster
        .sql("SELECT state, attempts, worker FROM jobs")
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0], "succeeded", "{rows:?}");
    assert_eq!(rows[0][1], "1", "claimed once: {rows:?}");
    assert!(
        rows[0][2].ends_with(&format!("-{}-0", worker.pid())),
        "the worker process ran it: {rows:?}"
    );
}

/// Starts `kiln ARGS` with `env` and expects it to stop (within `within`) with an error naming
/// `setting`: its stderr.
fn assert_start_fails(
    config: &Path,
    data_dir: &Path,
    args: &[&str],
    env: &Env,
    setting: &str,
    within: Duration,
) -> String {
    let started = Instant::now();
    let (status, _, stderr) = kiln_run_within(config, data_dir, args, env, within);
    let status = status.unwrap_or_else(|| {
        panic!("kiln {args:?} ({env:?}) was still starting after {within:?}: {stderr}")
    });
    assert!(
        !status.success(),
        "kiln {args:?} ({env:?}) started: {stderr}"
    );
    assert!(
        stderr.contains(setting),
        "the error names {setting} ({env:?}, {:?}): {stderr}",
        started.elapsed()
    );
    assert!(!stderr.contains("kiln is listening"), "{stderr}");
    stderr
}

/// Item 6: a store or blob store that kiln cannot read or reach stops the start at once, with
/// an error that names the setting to fix.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_on_stores_it_cannot_use_fails_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 2, "");
    let data = dir.path().join("data");
    let serve = ["serve", "--bind", "127.0.0.1:0", "--workers", "0"];
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let a_minute = Duration::from_secs(60);

    let stderr = assert_start_fails(
        &config,
        &data,
        &serve,
        &env(&[("KILN_STORE__URL", "mysql://root:hunter2@db/kiln")]),
        "store.url",
        a_minute,
    );
    assert!(
        !stderr.contains("hunter2"),
        "no password in the error: {stderr}"
    );
    assert_start_fails(
        &config,
        &data,
        &serve,
        &env(&[("KILN_BLOBS__URL", "ftp://x")]),
        "blobs.url",
        a_minute,
    );
    // Nothing listens on port 1: refused at once, and the start must not retry for long.
    let nobody = env(&[
        ("KILN_STORE__URL", "postgres://postgres@127.0.0.1:1/x"),
        ("KILN_SIGNING_KEY", SIGNING_KEY),
    ]);
    for args in [&serve[..], &["worker"][..]] {
        assert_start_fails(
            &config,
            &data,
            args,
            &nobody,
            "store.url",
            Duration::from_secs(15),
        );
    }
    assert!(
        walk(&data).iter().all(|f| !f.ends_with("kiln.db")),
        "a failed start on another store made no SQLite file: {:?}",
        walk(&data)
    );

    // A shared store needs the shared signing key; a worker signs nothing and needs none.
    let Some(db) = fresh_database().await else {
        return;
    };
    let stderr = assert_start_fails(
        &config,
        &data,
        &serve,
        &env(&[("KILN_STORE__URL", db.url())]),
        "signing_key",
        a_minute,
    );
    assert!(
        stderr.contains("KILN_SIGNING_KEY"),
        "how to set it: {stderr}"
    );
    let tables = psql(
        db.url(),
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .await;
    assert_eq!(
        tables,
        vec![vec!["0".to_string()]],
        "a start refused for its configuration creates no schema on the way out"
    );
}

/// How the chaos run's submitters did.
#[derive(Default)]
struct Submissions {
    /// Request ids, in the order accepted.
    accepted: Vec<String>,
    /// Submits that had to go to the other node (their first node died under them).
    failed_over: usize,
}

/// Submits `input` under `key` to `clients[first]`, and to the other node whenever one does not
/// answer (it was killed): the same `Idempotency-Key` makes a retry of a submit the dead node
/// had accepted answer that request, not queue another. Returns (request id, failed over).
async fn submit_anywhere(
    clients: &[Client; 2],
    first: usize,
    input: &Value,
    key: &str,
) -> (String, bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut node, mut failed_over) = (first, false);
    loop {
        match clients[node].try_submit_idempotent(PRO, input, key).await {
            Ok((200, body)) if body["request_id"].is_string() => {
                return (
                    body["request_id"].as_str().unwrap().to_string(),
                    failed_over,
                )
            }
            // No answer, or an answer cut off: the node died mid-request.
            Ok((200, _)) | Err(_) => {}
            Ok((code, body)) => panic!("a live node refused a valid submit: {code} {body}"),
        }
        assert!(Instant::now() < deadline, "no node accepted submit {key}");
        failed_over = true;
        node = 1 - node;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Item 7, the chaos test: PostgreSQL and the S3 server, 2 API nodes, 3 workers; clients submit
/// across both API nodes; one worker SIGKILLed mid-job, one API node SIGKILLed under load, one
/// worker SIGSTOPped past its lease (until another worker holds its job) and then continued.
/// Every accepted request ends exactly once, succeeded; every image downloads from either API
/// node; no result image on any node's disk; the bucket holds exactly the requests' images; the
/// frozen worker's late writes are refused.
#[tokio::test(flavor = "multi_thread")]
async fn chaos_killed_and_frozen_nodes_lose_no_request_and_complete_none_twice() {
    let Some(cluster) = Cluster::start(4, Some("results")).await else {
        return;
    };
    let (ok, token, err) = cluster.run("admin", &["keys", "create", "--name", "chaos"]);
    assert!(ok, "{err}");
    let token = token.trim().to_string();

    let ports = [free_port(), free_port()];
    let mut api_a = cluster.api_node("api-a", ports[0]);
    let api_b = cluster.api_node("api-b", ports[1]);
    let mut w1 = cluster.worker("worker-1", false);
    let w2 = cluster.worker("worker-2", false);
    let w3 = cluster.worker("worker-3", false);
    for worker in [&w1, &w2, &w3] {
        wait_slot_started(worker).await;
    }
    let clients = [
        Client::new(&api_a.base, &token),
        Client::new(&api_b.base, &token),
    ];
    let (accepted_so_far, submitters) = spawn_submitters(&clients);
    kill_under_load(&mut api_a, &accepted_so_far).await;

    // Worker 1 is killed just after it claims a job.
    let killed_job = fresh_job_of(&cluster, w1.pid(), Duration::from_secs(60)).await;
    w1.sigkill();
    eprintln!("chaos: worker 1 killed running {killed_job}");
    assert_held_by(&cluster, &killed_job, w1.pid(), "killed").await;
    let frozen_job = freeze_past_its_lease(&cluster, &w3).await;

    let accepted = all_accepted(submitters).await;
    // Every accepted request ends, through the surviving node.
    let survivor = &clients[1];
    let mut images: HashMap<String, String> = HashMap::new();
    for id in &accepted {
        let result = survivor.wait_result(id, Duration::from_secs(300)).await;
        assert_eq!(result["status"], "succeeded", "{id}: {result}");
        let url = result["output"]["image"].as_str().unwrap().to_string();
        assert!(url.starts_with(&api_b.base), "{url}");
        images.insert(id.clone(), url);
    }
    assert_late_writes_refused(&w3, &frozen_job).await;
    assert_each_ended_once(&accepted, [&w1, &w2, &w3], &killed_job);
    assert_store_agrees(&cluster, &[&killed_job, &frozen_job]).await;

    // Node A back (same port, same data directory): every image downloads from either node.
    drop(api_a);
    let api_a = cluster.api_node("api-a", ports[0]);
    for (id, url) in &images {
        for base in [&api_b.base, &api_a.base] {
            let url = rebased(url, base);
            let (code, content_type, bytes) = survivor.download(&url).await;
            assert_eq!(
                (code, content_type.as_deref()),
                (200, Some("image/jpeg")),
                "{id}: {url}"
            );
            assert_eq!(decoded_size(&bytes), (256, 256), "{id}");
        }
    }

    // The bucket holds exactly the succeeded requests' images: no orphan (a killed or fenced
    // worker's upload), none missing.
    let expected: BTreeSet<String> = images.values().map(|u| cluster.object_of(u)).collect();
    let objects: BTreeSet<String> = cluster.s3.object_keys().into_iter().collect();
    assert_eq!(objects, expected, "the bucket's objects are the results'");
    assert_no_local_results(
        &cluster,
        &[
            "admin", "api-a", "api-b", "worker-1", "worker-2", "worker-3",
        ],
    );
}

const CLIENTS: usize = 4;
const PER_CLIENT: usize = 12;
const TOTAL: usize = CLIENTS * PER_CLIENT;

/// Four clients, twelve requests each, alternating nodes, at a pace that keeps submits coming
/// while the nodes are killed; each also polls the status of what it submitted. Returns the
/// running count of accepted submits and the clients' tasks.
fn spawn_submitters(
    clients: &[Client; 2],
) -> (Arc<AtomicUsize>, Vec<tokio::task::JoinHandle<Submissions>>) {
    let accepted_so_far = Arc::new(AtomicUsize::new(0));
    let mut submitters = vec![];
    for c in 0..CLIENTS {
        let (clients, accepted_so_far) = (clients.clone(), accepted_so_far.clone());
        submitters.push(tokio::spawn(async move {
            let mut done = Submissions::default();
            for i in 0..PER_CLIENT {
                let node = (c + i) % 2;
                let body = input(&format!("chaos {c}-{i}: a small coloured shape"));
                let key = format!("chaos-{c}-{i}");
                let (id, failed_over) = submit_anywhere(&clients, node, &body, &key).await;
                accepted_so_far.fetch_add(1, SeqCst);
                done.failed_over += usize::from(failed_over);
                let status = format!("/v1/requests/{id}/status");
                let _ = clients[node]
                    .try_call(reqwest::Method::GET, &status, None)
                    .await;
                done.accepted.push(id);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            done
        }));
    }
    (accepted_so_far, submitters)
}

/// Kills API node `api` under load: a third of the submits in, the rest still to come.
async fn kill_under_load(api: &mut KilnProcess, accepted_so_far: &AtomicUsize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted_so_far.load(SeqCst) < TOTAL / 3 {
        assert!(Instant::now() < deadline, "the submits stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    api.sigkill();
    let accepted_at_kill = accepted_so_far.load(SeqCst);
    eprintln!("chaos: API node A killed after {accepted_at_kill} accepted");
    assert!(
        accepted_at_kill < TOTAL,
        "the API node died under load ({accepted_at_kill} of {TOTAL} accepted)"
    );
}

/// Freezes `worker` just after it claims a job, past its lease and until another worker holds
/// that job, then continues it (its heartbeat and completion must then be refused). Returns the
/// job.
async fn freeze_past_its_lease(cluster: &Cluster, worker: &KilnProcess) -> String {
    let frozen_job = fresh_job_of(cluster, worker.pid(), Duration::from_secs(60)).await;
    worker.signal(libc::SIGSTOP);
    let frozen_at = Instant::now();
    eprintln!("chaos: worker 3 stopped running {frozen_job}");
    assert_held_by(cluster, &frozen_job, worker.pid(), "frozen").await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let holder = cluster
            .sql(&format!(
                "SELECT state, worker FROM jobs WHERE id = '{frozen_job}'"
            ))
            .await;
        let retaken = holder
            .first()
            .is_some_and(|row| !row[1].ends_with(&format!("-{}-0", worker.pid())));
        if retaken && frozen_at.elapsed() >= Duration::from_secs(LEASE_SECS) * 5 / 2 {
            eprintln!("chaos: {frozen_job} is now {holder:?}; continuing worker 3");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no worker took over the frozen worker's job: {holder:?}"
        );
    }
    worker.signal(libc::SIGCONT);
    frozen_job
}

/// Every client's accepted request ids: all submits accepted, each once, some after failing
/// over to the surviving node.
async fn all_accepted(submitters: Vec<tokio::task::JoinHandle<Submissions>>) -> Vec<String> {
    let mut submissions = Submissions::default();
    for s in submitters {
        let done = s.await.unwrap();
        submissions.accepted.extend(done.accepted);
        submissions.failed_over += done.failed_over;
    }
    let accepted = submissions.accepted;
    assert_eq!(
        accepted.len(),
        TOTAL,
        "every submit was accepted by some node"
    );
    let distinct: BTreeSet<&String> = accepted.iter().collect();
    assert_eq!(distinct.len(), TOTAL, "one request per submit");
    assert!(
        submissions.failed_over >= 1,
        "some submits found node A dead and went to B"
    );
    accepted
}

/// The frozen worker, continued, found the job was no longer its own and wrote nothing.
async fn assert_late_writes_refused(worker: &KilnProcess, frozen_job: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let frozen_end = loop {
        let ended = jobs_ended(worker);
        if let Some((_, outcome)) = ended.iter().find(|(id, _)| *id == frozen_job) {
            break outcome.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the continued worker never ended {frozen_job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        ["lease_lost", "complete_failed"].contains(&frozen_end.as_str()),
        "the frozen worker's run of {frozen_job} ended {frozen_end}"
    );
    let refused = lines_of_job(worker, frozen_job);
    assert!(
        refused.iter().any(|l| {
            l["message"] == "lease lost (another worker took the job); stopping the engine"
                || l["message"] == "could not complete the job; discarding its image"
        }),
        "the frozen worker logged its refused write: {refused:?}"
    );
}

/// Exactly once: across all workers' logs, one terminal end (succeeded) per request, none for
/// anything else; the killed worker's job was not ended by it.
fn assert_each_ended_once(accepted: &[String], workers: [&KilnProcess; 3], killed_job: &str) {
    let mut terminal: HashMap<String, Vec<String>> = HashMap::new();
    for worker in workers {
        for (id, outcome) in jobs_ended(worker) {
            if outcome == "succeeded" || outcome == "failed" {
                terminal.entry(id).or_default().push(outcome);
            }
        }
    }
    for id in accepted {
        assert_eq!(
            terminal.get(id),
            Some(&vec!["succeeded".to_string()]),
            "{id} ended once"
        );
    }
    assert_eq!(
        terminal.len(),
        TOTAL,
        "no job ended that no client asked for"
    );
    assert!(
        !jobs_ended(workers[0])
            .iter()
            .any(|(id, _)| id == killed_job),
        "the killed worker never ended {killed_job}"
    );
}

/// The store agrees: one row per request, all succeeded; the jobs of the killed and the frozen
/// worker (`retaken`) were claimed again.
async fn assert_store_agrees(cluster: &Cluster, retaken: &[&str]) {
    let rows = cluster.sql("SELECT id, state, attempts FROM jobs").await;
    assert_eq!(rows.len(), TOTAL, "one job per request in the store");
    for row in &rows {
        assert_eq!(row[1], "succeeded", "{row:?}");
        if retaken.contains(&row[0].as_str()) {
            let attempts: u32 = row[2].parse().unwrap();
            assert!(attempts >= 2, "{} was claimed again: {row:?}", row[0]);
        }
    }
}
