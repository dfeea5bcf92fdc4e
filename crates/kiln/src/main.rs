//! `kiln`: parses the command line, installs the shutdown signal, runs one command.

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln::commands::{self, GenerateRequest, KeysAction};
use kiln::config::{FlagOverrides, Settings};
use kiln::telemetry;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "kiln", version, about = "A self-hosted image-generation API for FLUX models")]
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
    /// Generate one image locally, without a server, validating the input like the API does.
    Generate {
        /// The model id, e.g. blackforestlabs/flux-1-1-pro/text-to-image.
        #[arg(long)]
        model: String,
        /// The input as JSON, exactly as POSTed to the API.
        #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
        input: Option<String>,
        /// Shorthand for --input '{"prompt": TEXT}'.
        #[arg(long)]
        prompt: Option<String>,
        /// The image file to write (.jpeg/.jpg or .png decides the format).
        #[arg(short, long, default_value = "out.jpeg")]
        output: PathBuf,
    },
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut flags = FlagOverrides { data_dir: cli.data_dir.clone(), ..Default::default() };
    match &cli.command {
        Command::Serve { bind, public_url, workers } => {
            flags.bind = *bind;
            flags.public_url = public_url.clone();
            flags.worker_slots = *workers;
        }
        Command::Worker { slots } => flags.worker_slots = *slots,
        Command::Keys { .. } | Command::Generate { .. } => {}
    }
    let settings = Settings::load(cli.config.as_deref(), &flags)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Serve { .. } => {
            telemetry::init(settings.log_format, "info,sqlx=warn");
            runtime.block_on(commands::serve(settings, shutdown_on_signal()))
        }
        Command::Worker { .. } => {
            telemetry::init(settings.log_format, "info,sqlx=warn");
            runtime.block_on(commands::worker(settings, shutdown_on_signal()))
        }
        Command::Keys { action } => {
            telemetry::init(settings.log_format, "warn");
            let action = match action {
                KeysCommand::Create { name } => KeysAction::Create { name },
                KeysCommand::List => KeysAction::List,
                KeysCommand::Revoke { name } => KeysAction::Revoke { name },
            };
            runtime.block_on(commands::keys(settings, action))
        }
        Command::Generate { model, input, prompt, output } => {
            telemetry::init(settings.log_format, "warn");
            let input = match (input, prompt) {
                (Some(json), _) => serde_json::from_str(&json).context("--input is not valid JSON")?,
                (None, Some(prompt)) => serde_json::json!({ "prompt": prompt }),
                (None, None) => unreachable!("clap requires --input or --prompt"),
            };
            commands::generate(settings, GenerateRequest { route: model, input, output })
        }
    }
}

/// A token cancelled on SIGINT or SIGTERM (must be called inside the runtime's context... it
/// spawns its watcher lazily on first poll).
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let terminate = async {
            #[cfg(unix)]
            if let Ok(mut sigterm) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
