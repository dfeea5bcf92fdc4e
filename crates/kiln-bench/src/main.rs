//! `kiln-bench`: times kiln's engine and diffusers (PyTorch) on the same machine, in the same
//! run, with the same shapes, weights, inputs and threads, and prints the figures, their ratio,
//! the achieved GFLOP/s against the machine's measured f32 matrix-product peak, and the peak
//! memory of each. See BENCHMARKS.md for how to read it.
//!
//! Every workload runs in a process of its own (this binary's `child` command, and
//! `tools/bench/diffusers_bench.py` for diffusers), so that each peak-memory figure is that
//! workload's alone: the peak is reset once the weights are loaded and read after the last run.

mod gguf;
mod http;
mod previews;
mod queue;
mod streams;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use kiln_engine::bench::{
    write_checkpoint, CheckpointPaths, MatrixProduct, TransformerCall, VaeDecode,
};
use kiln_engine::{DeviceSpec, EngineOptions, Flux1Pipeline, PipelineRequest, Precision};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "kiln-bench",
    about = "kiln's engine against diffusers on this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Mode>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where the random full-size checkpoint (2.2 GB, written once) and the outputs go.
    #[arg(long, default_value = "target/kiln-bench")]
    work: PathBuf,
    /// Timed runs of each workload, after one untimed warm-up run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only these workloads (default: all).
    #[arg(long, value_enum)]
    only: Vec<Workload>,
    /// The Python with torch and diffusers (default: $KILN_BENCH_PYTHON, else
    /// /tmp/venv-ref/bin/python if present, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Time kiln alone.
    #[arg(long)]
    no_peer: bool,
    /// Also append the results as a Markdown table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Where both run: `cpu`, or `cuda:N` (a build with `--features cuda`; diffusers on the same
    /// GPU, peak memory read from nvidia-smi for both).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// `f32` (the CPU's default) or `bf16` (CUDA's), for both.
    #[arg(long)]
    precision: Option<Precision>,
}

impl RunArgs {
    fn options(&self) -> EngineOptions {
        EngineOptions {
            device: self.device,
            precision: self.precision,
        }
    }
}

#[derive(Subcommand)]
enum Mode {
    /// The HTTP service's throughput: `/healthz` and status polls, and durable submits while a
    /// worker runs, against the built `kiln` binary (see src/http.rs).
    Http(http::HttpArgs),
    /// The queue's speed on SQLite and PostgreSQL: jobs per second through the worker pool
    /// with a no-op engine and through the store alone, submits per second, and the time from
    /// submit to an idle worker's claim, woken by events or by polling (see src/queue.rs).
    Queue(queue::QueueArgs),
    /// What open status streams cost one API node: memory per stream, CPU while idle and per
    /// queue change, fan-out time, against clients polling status (see src/streams.rs).
    Streams(streams::StreamsArgs),
    /// What live previews add to a generation of the demo checkpoint (see src/previews.rs).
    Previews(previews::PreviewsArgs),
    /// kiln's GGUF path against stable-diffusion.cpp on one Q8_0 file of the random
    /// checkpoint: time per step and peak memory (see src/gguf.rs).
    Gguf(gguf::GgufArgs),
    /// Run one workload in this process and print its measurement as JSON (used by the
    /// benchmark itself).
    Child {
        #[arg(value_enum)]
        workload: Workload,
        #[arg(long)]
        work: PathBuf,
        #[arg(long)]
        runs: usize,
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        #[arg(long)]
        precision: Option<Precision>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    /// A 4096^3 f32 matrix product: the machine's peak for the other rows' percentages.
    #[value(name = "matmul-4096")]
    Matmul4096,
    /// One FLUX.1 transformer call, full width, 1 double + 1 single block, 512x512, 512 text tokens.
    #[value(name = "transformer-512")]
    Transformer512,
    /// The same at 1024x1024.
    #[value(name = "transformer-1024")]
    Transformer1024,
    /// One FLUX.1 VAE decode to 1024x1024.
    #[value(name = "vae-decode-1024")]
    VaeDecode1024,
    /// A 1024x1024 generation's heavy half: one transformer call and the decode, in one process.
    #[value(name = "generation-1024")]
    Generation1024,
    /// One generation of the demo checkpoint (64x64, its 8 steps, guidance against the empty prompt).
    #[value(name = "demo-generation")]
    DemoGeneration,
    /// `transformer-512` with the transformer read from the Q8_0 GGUF copy of its weights
    /// (`kiln-bench gguf` writes it and compares it with stable-diffusion.cpp).
    #[value(name = "transformer-512-q8")]
    Transformer512Q8,
    /// The GGUF transformer's call and the 512x512 decode in one process (`kiln-bench gguf`'s
    /// peak memory, comparable with a one-step stable-diffusion.cpp run).
    #[value(name = "generation-512-q8")]
    Generation512Q8,
}

const ALL: [Workload; 6] = [
    Workload::Matmul4096,
    Workload::Transformer512,
    Workload::Transformer1024,
    Workload::VaeDecode1024,
    Workload::Generation1024,
    Workload::DemoGeneration,
];
const SIDES: [usize; 2] = [512, 1024];
const DEMO_PROMPT: &str = "a red circle in the top left on a blue background";

impl Workload {
    fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .expect("every workload has a name")
            .get_name()
            .to_string()
    }

    /// Whether both sides compute the same tensor from the same inputs (the matrix product's
    /// operands and the demo's noise come from each side's own generator).
    fn comparable(self) -> bool {
        !matches!(self, Workload::Matmul4096 | Workload::DemoGeneration)
    }

    /// Whether `tools/bench/diffusers_bench.py` runs this workload (the GGUF ones have
    /// stable-diffusion.cpp as their peer, in `kiln-bench gguf`).
    fn diffusers_runs(self) -> bool {
        !matches!(self, Workload::Transformer512Q8 | Workload::Generation512Q8)
    }
}

/// One side's figures for one workload; the same JSON the Python peer prints.
#[derive(Serialize, Deserialize, Debug)]
struct Measurement {
    seconds: Vec<f64>,
    flops: Option<f64>,
    peak_bytes: u64,
    threads: usize,
}

impl Measurement {
    fn median(&self) -> f64 {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    }

    fn gflops(&self) -> Option<f64> {
        self.flops.map(|f| f / self.median() / 1e9)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Mode::Http(args)) = &cli.command {
        // The service runs in its own process; this one only sends requests.
        return http::run(args);
    }
    if let Some(Mode::Queue(args)) = &cli.command {
        return queue::run(args);
    }
    if let Some(Mode::Previews(args)) = &cli.command {
        return previews::run(args);
    }
    if let Some(Mode::Streams(args)) = &cli.command {
        return streams::run(args);
    }
    if let Some(Mode::Gguf(args)) = &cli.command {
        return gguf::run(args);
    }
    // The engine runs as it does in the service.
    kiln::allocator::reuse_freed_memory();
    let matrix_products = kiln_engine::load_cpu_kernels();
    match cli.command {
        Some(Mode::Child {
            workload,
            work,
            runs,
            device,
            precision,
        }) => {
            let m = child(workload, &work, runs, &EngineOptions { device, precision })?;
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        Some(
            Mode::Http(_) | Mode::Queue(_) | Mode::Streams(_) | Mode::Previews(_) | Mode::Gguf(_),
        ) => {
            unreachable!("handled above")
        }
        None => benchmark(&cli.run, &matrix_products),
    }
}

fn output_path(work: &Path, side: &str, workload: Workload) -> PathBuf {
    work.join("outputs")
        .join(side)
        .join(format!("{}.safetensors", workload.name()))
}

/// Loads, resets the peak, warms up, times `runs` runs and saves the last output.
fn child(
    workload: Workload,
    work: &Path,
    runs: usize,
    options: &EngineOptions,
) -> anyhow::Result<Measurement> {
    let rt = options.runtime()?;
    let device = rt.device.clone();
    let paths = CheckpointPaths::new(work);
    let (run, flops): (Box<dyn Fn() -> anyhow::Result<Tensor>>, Option<f64>) = match workload {
        Workload::Matmul4096 => {
            let m = MatrixProduct::new(4096, &rt)?;
            let f = m.flops();
            (Box::new(move || Ok(m.run()?)), Some(f))
        }
        Workload::Transformer512 | Workload::Transformer1024 => {
            let side = if workload == Workload::Transformer512 {
                512
            } else {
                1024
            };
            let t = TransformerCall::load(&paths, side, &rt)?;
            let f = t.flops();
            (Box::new(move || Ok(t.run()?)), Some(f))
        }
        Workload::VaeDecode1024 => {
            let v = VaeDecode::load(&paths, 1024, &rt)?;
            let f = v.flops()?;
            (Box::new(move || Ok(v.run()?)), Some(f))
        }
        Workload::Transformer512Q8 => {
            let t = TransformerCall::load_gguf(&gguf::gguf_file(work), &paths, 512, &rt)?;
            let f = t.flops();
            (Box::new(move || Ok(t.run()?)), Some(f))
        }
        Workload::Generation1024 | Workload::Generation512Q8 => {
            let (t, side) = if workload == Workload::Generation1024 {
                (TransformerCall::load(&paths, 1024, &rt)?, 1024)
            } else {
                let file = gguf::gguf_file(work);
                (TransformerCall::load_gguf(&file, &paths, 512, &rt)?, 512)
            };
            let v = VaeDecode::load(&paths, side, &rt)?;
            let f = t.flops() + v.flops()?;
            (Box::new(move || Ok(v.decode_packed(&t.run()?)?)), Some(f))
        }
        Workload::DemoGeneration => {
            let dir = Path::new(kiln::config::BUNDLED_DEMO_CHECKPOINT);
            let p = Flux1Pipeline::load(dir, options, &mut |_| {})?;
            let req = PipelineRequest {
                prompt: DEMO_PROMPT.into(),
                width: 64,
                height: 64,
                steps: None,
                guidance: None,
                seed: 0,
                max_sequence_length: None,
                initial_latents: None,
                preview_interval: 0,
            };
            (
                Box::new(move || Ok(p.run(&req, &[], &mut ())?.final_latents)),
                None,
            )
        }
    };
    reset_peak_memory()?;
    run()?;
    device.synchronize()?;
    let mut seconds = Vec::with_capacity(runs);
    let mut out = None;
    for _ in 0..runs {
        let t0 = Instant::now();
        out = Some(run()?);
        // A GPU's work is queued: the time is until it is done.
        device.synchronize()?;
        seconds.push(t0.elapsed().as_secs_f64());
    }
    let peak_bytes = peak_memory()?;
    if let Some(out) = out {
        let path = output_path(work, "kiln", workload);
        std::fs::create_dir_all(path.parent().unwrap())?;
        out.to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .save_safetensors("output", &path)?;
    }
    Ok(Measurement {
        seconds,
        flops,
        peak_bytes,
        threads: candle_core::utils::get_num_threads(),
    })
}

/// Resets the kernel's record of this process's peak resident memory (Linux 4.0+).
fn reset_peak_memory() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
        .context("resetting the peak memory (/proc/self/clear_refs)")
}

/// This process's peak resident memory since the last reset.
fn peak_memory() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kb * 1024)
}

fn python(given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KILN_BENCH_PYTHON").map(PathBuf::from))
        .or_else(|| Some(PathBuf::from("/tmp/venv-ref/bin/python")).filter(|p| p.exists()))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// A script of `tools/bench/`: in the checkout this runs from (a built binary copied to
/// another machine with the repository), else where it was built.
fn tool_script(name: &str) -> PathBuf {
    let here = Path::new("tools/bench").join(name);
    if here.is_file() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools/bench")
        .join(name)
}

/// This binary's `child` command for one workload.
fn child_command(
    w: Workload,
    runs: usize,
    work: &Path,
    device: DeviceSpec,
    precision: Option<Precision>,
) -> anyhow::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["child", &w.name(), "--runs", &runs.to_string()])
        .args(["--device", &device.to_string(), "--work"])
        .arg(work);
    if let Some(p) = precision {
        cmd.args(["--precision", p.as_str()]);
    }
    Ok(cmd)
}

/// PyTorch's name for a device.
fn torch_device(device: DeviceSpec) -> String {
    match device {
        DeviceSpec::Cpu => "cpu".into(),
        DeviceSpec::Cuda(n) => format!("cuda:{n}"),
    }
}

/// [`measure`], with the peak memory on a GPU read by `nvidia-smi` while the child runs (the
/// same way for kiln and diffusers: device memory in use, the CUDA context included), in place
/// of the host's resident peak.
fn measure_on(cmd: Command, what: &str, device: DeviceSpec) -> anyhow::Result<Measurement> {
    let DeviceSpec::Cuda(gpu) = device else {
        return measure(cmd, what);
    };
    let mut watch = Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-lms",
            "20",
        ])
        .args(["-i", &gpu.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting nvidia-smi to watch the GPU's memory")?;
    let stdout = watch.stdout.take().context("nvidia-smi's output")?;
    let peak = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    });
    let result = measure(cmd, what);
    let _ = watch.kill();
    let _ = watch.wait();
    let peak_mib = peak.join().unwrap_or(0);
    let mut m = result?;
    m.peak_bytes = peak_mib << 20;
    Ok(m)
}

/// Runs a child command and reads its last line as a [`Measurement`].
fn measure(mut cmd: Command, what: &str) -> anyhow::Result<Measurement> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8(out.stdout)?;
    let last = stdout
        .lines()
        .last()
        .with_context(|| format!("{what} printed nothing"))?;
    serde_json::from_str(last).with_context(|| format!("{what} printed {last:?}"))
}

struct Row {
    workload: Workload,
    kiln: Measurement,
    peer: Option<Measurement>,
    /// Largest absolute difference between the outputs, and the largest absolute output.
    difference: Option<(f32, f32)>,
}

fn benchmark(args: &RunArgs, matrix_products: &str) -> anyhow::Result<()> {
    let workloads: Vec<Workload> = if args.only.is_empty() {
        ALL.to_vec()
    } else {
        args.only.clone()
    };
    eprintln!(
        "writing (once) the random full-size checkpoint to {}",
        args.work.display()
    );
    write_checkpoint(&args.work, &SIDES)?;
    let python = python(args.python.as_deref());
    let peer = if args.no_peer {
        None
    } else {
        let probe = Command::new(&python)
            .args(["-c", "import torch, diffusers"])
            .output();
        match probe {
            Ok(o) if o.status.success() => Some(python),
            _ => {
                eprintln!(
                    "diffusers: SKIPPED ({} cannot import torch and diffusers; see tools/bench/README.md)",
                    python.display()
                );
                None
            }
        }
    };
    let mut rows = Vec::new();
    for &w in &workloads {
        eprintln!("{}: kiln", w.name());
        let cmd = child_command(w, args.runs, &args.work, args.device, args.precision)?;
        let kiln = measure_on(cmd, &format!("kiln {}", w.name()), args.device)?;
        let peer = match &peer {
            Some(py) if w.diffusers_runs() => {
                eprintln!("{}: diffusers", w.name());
                let mut cmd = Command::new(py);
                cmd.arg(tool_script("diffusers_bench.py"))
                    .args([
                        &w.name(),
                        "--runs",
                        &args.runs.to_string(),
                        "--threads",
                        &kiln.threads.to_string(),
                    ])
                    .arg("--work")
                    .arg(&args.work)
                    .arg("--demo")
                    .arg(kiln::config::BUNDLED_DEMO_CHECKPOINT)
                    .args(["--device", &torch_device(args.device)])
                    .args(["--dtype", args.options().precision().as_str()]);
                let mut m = measure_on(cmd, &format!("diffusers {}", w.name()), args.device)?;
                // The same work: GFLOP/s from kiln's count.
                m.flops = kiln.flops;
                Some(m)
            }
            _ => None,
        };
        let difference = match (&peer, w.comparable()) {
            (Some(_), true) => Some(compare(&args.work, w)?),
            _ => None,
        };
        rows.push(Row {
            workload: w,
            kiln,
            peer,
            difference,
        });
    }
    let precision = match (args.device, args.options().precision()) {
        (DeviceSpec::Cpu, Precision::Bf16) => {
            format!("bf16 (kiln: {})", args.options().runtime()?.describe())
        }
        (DeviceSpec::Cpu, p) => p.to_string(),
        (DeviceSpec::Cuda(_), p) => format!("{p} on {} (peak: GPU memory in use)", gpu_name()),
    };
    let table = render(&rows, matrix_products, &precision);
    println!("{table}");
    if let Some(path) = &args.markdown {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{table}")?;
    }
    Ok(())
}

fn compare(work: &Path, w: Workload) -> anyhow::Result<(f32, f32)> {
    let load = |side| -> anyhow::Result<Tensor> {
        let path = output_path(work, side, w);
        let mut t = candle_core::safetensors::load(&path, &Device::Cpu)?;
        t.remove("output")
            .with_context(|| format!("{} holds no output", path.display()))
    };
    let (k, d) = (load("kiln")?, load("diffusers")?);
    if k.dims() != d.dims() {
        bail!(
            "{}: kiln's output is {:?}, diffusers' {:?}",
            w.name(),
            k.dims(),
            d.dims()
        );
    }
    let max_abs =
        |t: &Tensor| -> anyhow::Result<f32> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar()?) };
    Ok((max_abs(&(&k - &d)?)?, max_abs(&d)?))
}

/// The GPU's name as nvidia-smi gives it.
fn gpu_name() -> String {
    Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "an unknown GPU".into())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// A Markdown table; the peak is the fastest matrix product measured in this run.
fn render(rows: &[Row], matrix_products: &str, precision: &str) -> String {
    let peak = rows
        .iter()
        .filter(|r| r.workload == Workload::Matmul4096)
        .flat_map(|r| std::iter::once(&r.kiln).chain(r.peer.as_ref()))
        .filter_map(Measurement::gflops)
        .fold(None, |a: Option<f64>, g| Some(a.map_or(g, |a| a.max(g))));
    let threads = rows.first().map_or(0, |r| r.kiln.threads);
    let date = time::OffsetDateTime::now_utc().date();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{date}, {}, {threads} threads, {}, median of the timed runs",
        cpu_name(),
        precision
    );
    let _ = writeln!(s, "kiln's matrix products: {matrix_products}");
    if let Some(p) = peak {
        let _ = writeln!(
            s,
            "f32 matrix-product peak (fastest 4096^3 product of this run): {p:.0} GFLOP/s"
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "| workload | kiln s | diffusers s | kiln/diffusers | kiln GFLOP/s | diffusers GFLOP/s | kiln peak MiB | diffusers peak MiB | max abs diff (of max abs) |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    let rate = |m: &Measurement| match (m.gflops(), peak) {
        (Some(g), Some(p)) => format!("{g:.0} ({:.0}%)", 100.0 * g / p),
        (Some(g), None) => format!("{g:.0}"),
        _ => "-".into(),
    };
    let mib = |m: &Measurement| format!("{:.0}", m.peak_bytes as f64 / (1 << 20) as f64);
    for r in rows {
        let (peer_s, ratio, peer_rate, peer_mib) = match &r.peer {
            Some(p) => (
                format!("{:.2}", p.median()),
                format!("**{:.2}**", r.kiln.median() / p.median()),
                rate(p),
                mib(p),
            ),
            None => ("skipped".into(), "-".into(), "-".into(), "-".into()),
        };
        let diff = r
            .difference
            .map_or("-".into(), |(d, m)| format!("{d:.1e} (of {m:.1})"));
        let _ = writeln!(
            s,
            "| {} | {:.2} | {peer_s} | {ratio} | {} | {peer_rate} | {} | {peer_mib} | {diff} |",
            &r.workload.name(),
            r.kiln.median(),
            rate(&r.kiln),
            mib(&r.kiln),
        );
    }
    s
}

/// The CPU's model name, its core count and which of avx2/avx512f/amx_tile it has.
pub(crate) fn cpu_summary() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let list: Vec<String> = ["avx2", "avx512f", "amx_tile"]
        .into_iter()
        .map(|f| {
            if has(f) {
                f.to_string()
            } else {
                format!("no {f}")
            }
        })
        .collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let guest = if has("hypervisor") {
        ", virtual machine"
    } else {
        ""
    };
    format!(
        "{}, {cores} cores{guest}, {}",
        field("model name"),
        list.join(", ")
    )
}

/// Prints `report` and appends it to `markdown`, if given (the `--markdown` option).
pub(crate) fn print_report(report: &str, markdown: Option<&Path>) -> anyhow::Result<()> {
    print!("{report}");
    if let Some(path) = markdown {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.write_all(report.as_bytes())?;
    }
    Ok(())
}
