//! `kiln`: parses the command line, installs the shutdown signal, runs one command.

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln::commands::{self, DirectRequest, GenerateRequest, KeysAction};
use kiln::config::{FlagOverrides, Settings};
use kiln::telemetry::{self, Output};
use kiln_engine::{read_latents, DeviceSpec, EngineOptions, PipelineRequest, Precision};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "A self-hosted image-generation API for FLUX models"
)]
struct Cli {
    /// A TOML configuration file (default: $KILN_CONFIG, else ./kiln.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the database, images and signing key live (KILN_DATA_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API with in-process workers.
    Serve {
        /// Address to listen on (KILN_BIND; default 127.0.0.1:8080).
        #[arg(long)]
        bind: Option<SocketAddr>,
        /// Base of the URLs in answers (KILN_PUBLIC_URL; default http://{bind}).
        #[arg(long)]
        public_url: Option<String>,
        /// In-process worker slots (0: API only, with separate `kiln worker`s).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Run workers only (no HTTP listener) against the configured store.
    Worker {
        /// Worker slots in this process.
        #[arg(long)]
        slots: Option<usize>,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Generate one image locally, without a server: through a route (`--model ID`, the input
    /// validated like the API does) or straight from a checkpoint (`--model-dir DIR`).
    #[command(group = clap::ArgGroup::new("target").required(true).args(["model", "model_dir"]))]
    Generate(GenerateArgs),
    /// Print the configuration in force (defaults, file, KILN_… environment) as TOML, with
    /// secrets redacted.
    Config,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A route id, e.g. blackforestlabs/flux-1-1-pro/text-to-image, run by its configured checkpoint.
    #[arg(long)]
    model: Option<String>,
    /// The route's input as JSON, exactly as POSTed to the API (with --model).
    #[arg(long, requires = "model", conflicts_with = "prompt")]
    input: Option<String>,
    /// The prompt (with --model: shorthand for --input '{"prompt": TEXT}').
    #[arg(long)]
    prompt: Option<String>,
    /// The image file to write (.jpeg/.jpg or .png decides the format).
    #[arg(short, long, default_value = "out.jpeg")]
    output: PathBuf,
    /// A FLUX.1 or FLUX.2 checkpoint directory (diffusers folder, BFL files, or GGUF transformer).
    #[arg(long, value_name = "DIR")]
    model_dir: Option<PathBuf>,
    /// Pixels; a multiple of the checkpoint's VAE scale factor times 2 (with --model-dir).
    #[arg(long, default_value_t = 1024, requires = "model_dir")]
    width: u32,
    #[arg(long, default_value_t = 1024, requires = "model_dir")]
    height: u32,
    /// Default: the checkpoint's (FLUX.1 dev 28, schnell 4; FLUX.2 klein 4, klein base and dev 50).
    #[arg(long, requires = "model_dir")]
    steps: Option<u32>,
    /// Default: the checkpoint's (FLUX.1 dev 3.5, FLUX.2 klein base and dev 4; schnell and
    /// distilled klein have none).
    #[arg(long, requires = "model_dir")]
    guidance: Option<f32>,
    #[arg(long, default_value_t = 0, requires = "model_dir")]
    seed: u64,
    /// Text tokens (default FLUX.1 dev 512, schnell 256; FLUX.2 512).
    #[arg(long, requires = "model_dir")]
    max_sequence_length: Option<usize>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu", requires = "model_dir")]
    device: DeviceSpec,
    /// `f32`, `bf16` or `f16` (default: f32 on CPU, bf16 on CUDA).
    #[arg(long, requires = "model_dir")]
    precision: Option<Precision>,
    /// Initial latents (safetensors, tensor `latents`), as diffusers' `latents=` takes them:
    /// packed for FLUX.1, patchified for FLUX.2.
    #[arg(long, value_name = "FILE", requires = "model_dir")]
    latents: Option<PathBuf>,
    /// Write the final packed latents before the VAE (safetensors, tensor `latents`).
    #[arg(long, value_name = "FILE", requires = "model_dir")]
    dump_latents: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; its token is printed once.
    Create {
        #[arg(long)]
        name: String,
    },
    /// List keys (never their tokens).
    List,
    /// Revoke a key by name.
    Revoke { name: String },
}

fn main() -> ExitCode {
    kiln::allocator::reuse_freed_memory();
    // Which library it is goes into the engine's log line when a checkpoint loads.
    let _ = kiln_engine::load_cpu_kernels();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole cause chain; a backtrace helps developers, not operators.
            let error: &(dyn std::error::Error + 'static) = error.as_ref();
            eprintln!("error: {}", kiln_core::report::Chain(error));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut flags = FlagOverrides {
        data_dir: cli.data_dir.clone(),
        ..Default::default()
    };
    match &cli.command {
        Command::Serve {
            bind,
            public_url,
            workers,
        } => {
            flags.bind = *bind;
            flags.public_url = public_url.clone();
            flags.worker_slots = *workers;
        }
        Command::Worker { slots } => flags.worker_slots = *slots,
        Command::Keys { .. } | Command::Generate(_) | Command::Config => {}
    }
    let settings = Settings::load(cli.config.as_deref(), &flags)?;
    // Before the runtime, so that the log writer outlives it: what its tasks log while it
    // shuts down still reaches stderr.
    let _log = match cli.command {
        Command::Serve { .. } | Command::Worker { .. } => {
            telemetry::init(settings.log_format, "info,sqlx=warn", Output::Background)
        }
        Command::Keys { .. } | Command::Generate(_) => {
            telemetry::init(settings.log_format, "warn", Output::Direct)
        }
        Command::Config => telemetry::LogGuard::none(),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Serve { .. } => {
            runtime.block_on(async { commands::serve(settings, shutdown_on_signal()).await })
        }
        Command::Worker { .. } => {
            runtime.block_on(async { commands::worker(settings, shutdown_on_signal()).await })
        }
        Command::Keys { action } => {
            let action = match action {
                KeysCommand::Create { name } => KeysAction::Create { name },
                KeysCommand::List => KeysAction::List,
                KeysCommand::Revoke { name } => KeysAction::Revoke { name },
            };
            runtime.block_on(commands::keys(settings, action))
        }
        Command::Config => commands::print_config(&settings),
        Command::Generate(args) => generate(settings, args),
    }
}

fn generate(settings: Settings, args: GenerateArgs) -> anyhow::Result<()> {
    if let Some(model_dir) = args.model_dir {
        let prompt = args.prompt.context("--model-dir needs --prompt")?;
        let pipeline = PipelineRequest {
            prompt,
            width: args.width,
            height: args.height,
            steps: args.steps,
            guidance: args.guidance,
            seed: args.seed,
            max_sequence_length: args.max_sequence_length,
            initial_latents: args.latents.as_deref().map(read_latents).transpose()?,
            preview_interval: 0,
        };
        return commands::generate_direct(DirectRequest {
            model_dir,
            options: EngineOptions {
                device: args.device,
                precision: args.precision,
            },
            pipeline,
            dump_latents: args.dump_latents,
            output: args.output,
        });
    }
    let route = args.model.context("--model or --model-dir is required")?;
    let input = match (args.input, args.prompt) {
        (Some(json), _) => match kiln_api::inputs::parse_json(json.as_bytes()) {
            Ok(input) => input,
            Err(kiln_api::inputs::JsonError::Syntax(e)) => {
                anyhow::bail!("--input is not valid JSON: {e}")
            }
            Err(kiln_api::inputs::JsonError::DuplicateKey(path)) => {
                anyhow::bail!("--input gives `{path}` more than once")
            }
        },
        (None, Some(prompt)) => serde_json::json!({ "prompt": prompt }),
        (None, None) => anyhow::bail!("--model needs --input JSON or --prompt TEXT"),
    };
    commands::generate(
        settings,
        GenerateRequest {
            route,
            input,
            output: args.output,
        },
    )
}

/// A token cancelled on SIGINT or SIGTERM. Call it inside the runtime: it spawns the watcher.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let terminate = async {
            #[cfg(unix)]
            if let Ok(mut sigterm) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                sigterm.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
        tracing::info!("shutdown signal received: draining");
        trigger.cancel();
    });
    token
}
