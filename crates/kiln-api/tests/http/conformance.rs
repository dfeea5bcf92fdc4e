//! The OpenAPI document against the server that publishes it: schemathesis (PyPI) generates
//! requests from `/openapi.json`, valid and invalid, sends them with a valid token, and runs all
//! of its checks on the answers (declared statuses, headers and content types, bodies matching
//! their schemas, valid input accepted and invalid input refused, 405s with a true `Allow`, ...).
//!
//! schemathesis is a Python tool: where it is not installed the test says so and passes, except
//! under CI (`CI` set), which installs it (`.ci/run`) and must not skip.

use crate::harness::TestServer;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const SCHEMATHESIS: &str = "schemathesis";
/// Examples per operation and phase: enough to reach every keyword of the schemas (the coverage
/// phase is exhaustive over them anyway), few enough for a few minutes on two cores.
const MAX_EXAMPLES: &str = "40";
/// A fixed seed: a failure in CI reproduces locally with the same command.
const SEED: &str = "20261203";
/// Far beyond a normal run; a hung tool must not hang the suite.
const TIMEOUT: Duration = Duration::from_secs(900);

fn installed() -> bool {
    Command::new(SCHEMATHESIS)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure_with_all_checks() {
    if !installed() {
        assert!(
            std::env::var_os("CI").is_none(),
            "schemathesis is not installed, and CI must run this test (.ci/run installs it)"
        );
        println!("SKIPPED: schemathesis is not installed (pip install schemathesis)");
        return;
    }
    // No workers run here, so every accepted submit stays queued: the queue must hold them all,
    // and a `Prefer: wait` submit (the document's example asks 30 s) would be held to its end.
    let server = TestServer::start_with(|s| {
        s.max_queued = 1_000_000;
        s.max_prefer_wait = Duration::from_secs(1);
    })
    .await;
    let output = run_schemathesis(&server).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        output.status.success(),
        "schemathesis found failures ({}); its report is above",
        output.status
    );
    // "Test cases:" then e.g. "1154 generated, 1154 passed, 10 skipped" ("..., 3 found 3 unique
    // failures" when any fail); the closing rule names failures and errors, if any.
    let cases = stdout.lines().find(|l| l.contains(" generated, "));
    assert!(
        cases.is_some_and(|l| l.contains(" passed") && !l.contains("found")),
        "unexpected test case count: {cases:?}"
    );
    let closing = stdout.lines().rev().find(|l| !l.trim().is_empty());
    assert!(
        closing.is_some_and(|l| !l.contains("failure") && !l.contains("error")),
        "unexpected summary: {closing:?}"
    );
}

/// Runs the tool against the server's own document, in a scratch directory (it may write its
/// example database and reports where it runs).
async fn run_schemathesis(server: &TestServer) -> Output {
    let scratch = tempfile::TempDir::new().unwrap();
    let mut command = tokio::process::Command::new(SCHEMATHESIS);
    command
        .current_dir(scratch.path())
        .args(["run", &server.url("/openapi.json")])
        .args(["--checks", "all"])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", server.token),
        ])
        .args(["--max-examples", MAX_EXAMPLES, "--seed", SEED])
        // One worker: schemathesis's workers are threads, and CPython 3.11 up to at least 3.11.7
        // (this machine kind's) keeps the AST builder's recursion counter per interpreter, so two
        // threads parsing at once (hypothesis parses lambda sources to describe strategies) fail
        // with "SystemError: AST constructor recursion depth mismatch": a tool crash that CI
        // reported as an error on an operation, not a finding about the API.
        .args(["--workers", "1", "--generation-database", "none"])
        .args(["--no-color", "--output-truncate", "false"])
        .kill_on_drop(true)
        .stdin(Stdio::null());
    tokio::time::timeout(TIMEOUT, command.output())
        .await
        .expect("schemathesis finishes in time")
        .expect("schemathesis runs")
}
