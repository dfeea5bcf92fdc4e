//! kiln's GGUF path against stable-diffusion.cpp (ggml), the CPU program users pick for
//! quantized FLUX, on one and the same Q8_0 file (issue 19, item 4).
//!
//! `tools/bench/write_gguf.py` writes the random full-size checkpoint again as a city96-style
//! GGUF (BFL's names, Q8_0) with BFL's `ae.safetensors`; then, in processes of their own:
//! - kiln times one transformer call read from that GGUF (`transformer-512-q8`, the median of
//!   `--runs`), and a one-step generation's heavy half for its peak memory
//!   (`generation-512-q8`: the call and the 512x512 decode);
//! - `sd-cli` generates 512x512 from the same files twice, with 1 and with 1 + `--runs` Euler
//!   steps: its per-step time is the difference of the two "sampling completed" times over
//!   `--runs` (its loading, text conditioning and decode cancel out); its peak is the one-step
//!   run's whole-process resident peak, which, like kiln's, holds one step and the decode.
//!
//! stable-diffusion.cpp is not part of kiln: it is built beside it (see tools/bench/README.md)
//! and found at `--sdcpp`, else `$KILN_BENCH_SDCPP`; without it the run says it was skipped.
//! It runs without text encoders (the zero conditioning, as the benchmark times the
//! transformer), with its own noise: the two sides' outputs are not compared.

use crate::{child_command, cpu_summary, measure, print_report, python, Measurement, Workload};
use anyhow::{bail, Context};
use kiln_engine::bench::{write_checkpoint, TEXT_TOKENS};
use kiln_engine::{DeviceSpec, EngineOptions};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The GGUF file and VAE that `tools/bench/write_gguf.py` writes under the work folder.
pub(crate) fn gguf_file(work: &Path) -> PathBuf {
    work.join("gguf").join("flux1-bench-Q8_0.gguf")
}

fn vae_file(work: &Path) -> PathBuf {
    work.join("gguf").join("ae.safetensors")
}

#[derive(clap::Args)]
pub struct GgufArgs {
    /// The benchmark's work folder (as the main benchmark's `--work`).
    #[arg(long, default_value = "target/kiln-bench")]
    work: PathBuf,
    /// Timed transformer calls for kiln; extra sampling steps for stable-diffusion.cpp.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// stable-diffusion.cpp's `sd-cli` (default: $KILN_BENCH_SDCPP).
    #[arg(long)]
    sdcpp: Option<PathBuf>,
    /// The Python that writes the GGUF file (torch, diffusers and gguf; as the main benchmark).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Also append the table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// stable-diffusion.cpp's figures: seconds per step and the one-step run's peak.
struct SdCpp {
    per_step: f64,
    peak_bytes: u64,
}

pub fn run(args: &GgufArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    eprintln!(
        "writing (once) the checkpoint and its GGUF copy under {}",
        args.work.display()
    );
    write_checkpoint(&args.work, &crate::SIDES)?;
    write_gguf(args)?;
    let kiln = |w: Workload, runs: usize| -> anyhow::Result<Measurement> {
        eprintln!("{}: kiln", w.name());
        let cmd = child_command(w, runs, &args.work, DeviceSpec::Cpu, None)?;
        measure(cmd, &format!("kiln {}", w.name()))
    };
    let step = kiln(Workload::Transformer512Q8, args.runs)?;
    let whole = kiln(Workload::Generation512Q8, 1)?;
    let dense = kiln(Workload::Transformer512, args.runs)?;
    let sdcpp = args
        .sdcpp
        .clone()
        .or_else(|| std::env::var_os("KILN_BENCH_SDCPP").map(PathBuf::from));
    let peer = match sdcpp {
        Some(exe) => Some(run_sdcpp(&exe, args, step.threads)?),
        None => {
            eprintln!(
                "stable-diffusion.cpp: SKIPPED (no --sdcpp or $KILN_BENCH_SDCPP; see tools/bench/README.md)"
            );
            None
        }
    };
    let report = render(&step, &whole, &dense, peer.as_ref());
    print_report(&report, args.markdown.as_deref())
}

fn write_gguf(args: &GgufArgs) -> anyhow::Result<()> {
    let python = python(args.python.as_deref());
    let out = Command::new(&python)
        .arg(crate::tool_script("write_gguf.py"))
        .arg("--work")
        .arg(&args.work)
        .output()
        .with_context(|| format!("starting {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "tools/bench/write_gguf.py failed (it needs torch, diffusers and gguf: see tools/bench/README.md):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn run_sdcpp(exe: &Path, args: &GgufArgs, threads: usize) -> anyhow::Result<SdCpp> {
    eprintln!("stable-diffusion.cpp: 1 step");
    let (one, peak_bytes) = sdcpp_sampling(exe, args, threads, 1)?;
    eprintln!("stable-diffusion.cpp: {} steps", 1 + args.runs);
    let (more, _) = sdcpp_sampling(exe, args, threads, 1 + args.runs)?;
    Ok(SdCpp {
        per_step: (more - one) / args.runs as f64,
        peak_bytes,
    })
}

/// One `sd-cli` generation of `steps` steps: its "sampling completed" seconds and the
/// process's peak resident memory.
fn sdcpp_sampling(
    exe: &Path,
    args: &GgufArgs,
    threads: usize,
    steps: usize,
) -> anyhow::Result<(f64, u64)> {
    let out_dir = args.work.join("outputs").join("sdcpp");
    std::fs::create_dir_all(&out_dir)?;
    let mut cmd = Command::new(exe);
    cmd.arg("--diffusion-model")
        .arg(gguf_file(&args.work))
        .arg("--vae")
        .arg(vae_file(&args.work))
        .args(["-p", "a benchmark", "-W", "512", "-H", "512"])
        .args([
            "--steps",
            &steps.to_string(),
            "--cfg-scale",
            "1",
            "--guidance",
            "3.5",
        ])
        .args(["--seed", "0", "-t", &threads.to_string(), "--diffusion-fa"])
        .arg("-o")
        .arg(out_dir.join(format!("steps-{steps}.png")));
    let (log, peak) = run_with_peak(cmd)?;
    let seconds = log
        .lines()
        .filter_map(|l| l.split_once("sampling completed, taking "))
        .filter_map(|(_, rest)| rest.trim().trim_end_matches('s').parse::<f64>().ok())
        .next_back()
        .with_context(|| format!("sd-cli printed no sampling time:\n{log}"))?;
    Ok((seconds, peak))
}

/// Runs `cmd` to its end; its output (stdout and stderr) and its peak resident set, read from
/// the kernel's accounting of the reaped child (`wait4`).
fn run_with_peak(mut cmd: Command) -> anyhow::Result<(String, u64)> {
    let log = tempfile::NamedTempFile::new()?;
    // One open file for both streams (a duplicate shares the offset), so neither overwrites
    // the other's lines.
    let file = log.reopen()?;
    cmd.stdout(file.try_clone()?).stderr(file);
    let child = cmd.spawn().context("starting sd-cli")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain out-parameters for a child of this process that nothing else waits for.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let got = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let text = std::fs::read_to_string(log.path())?;
    if got != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("sd-cli failed (wait status {status}):\n{text}");
    }
    // Linux reports ru_maxrss in KiB.
    Ok((text, usage.ru_maxrss as u64 * 1024))
}

fn render(
    step: &Measurement,
    whole: &Measurement,
    dense: &Measurement,
    peer: Option<&SdCpp>,
) -> String {
    let mib = |b: u64| format!("{:.0}", b as f64 / (1 << 20) as f64);
    let ratio = |s: f64| peer.map_or("-".into(), |p| format!("**{:.2}**", s / p.per_step));
    let date = time::OffsetDateTime::now_utc().date();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{date}, {}, {} threads: one FLUX.1 transformer call (full width, 1 double + 1 single block) \
         at 512x512 with {TEXT_TOKENS} text tokens, weights from one Q8_0 GGUF file\n",
        cpu_summary(),
        step.threads
    );
    let _ = writeln!(s, "| run | s per step | / stable-diffusion.cpp | peak MiB (one step and the 512x512 decode) |");
    let _ = writeln!(s, "|---|---|---|---|");
    let _ = writeln!(
        s,
        "| kiln, Q8_0 GGUF | {:.2} | {} | {} |",
        step.median(),
        ratio(step.median()),
        mib(whole.peak_bytes)
    );
    match peer {
        Some(p) => {
            let _ = writeln!(
                s,
                "| stable-diffusion.cpp, Q8_0 GGUF, `--diffusion-fa` | {:.2} | 1.00 | {} |",
                p.per_step,
                mib(p.peak_bytes)
            );
        }
        None => {
            let _ = writeln!(s, "| stable-diffusion.cpp | skipped | - | - |");
        }
    }
    let _ = writeln!(
        s,
        "| kiln, the same weights dense in {} (its default here) | {:.2} | {} | - |",
        EngineOptions::default().precision(),
        dense.median(),
        ratio(dense.median())
    );
    s
}
