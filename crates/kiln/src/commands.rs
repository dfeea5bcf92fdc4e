//! The commands of the `kiln` binary. Each reads the same [`Settings`].

use crate::app::{open_stores, spawn_sweeper, worker_settings, Application, Stores};
use crate::config::Settings;
use crate::engines::{load_engine, load_slots};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_api::auth::{hash_token, new_token, token_prefix};
use kiln_api::inputs::parse_input;
use kiln_core::catalog::{ModelFamily, Route};
use kiln_core::engine::{AppliedSettings, RgbImage, StepEvent, StepObserver};
use kiln_core::image_file::encode_image;
use kiln_core::params::OutputFormat;
use kiln_engine::{
    checkpoint_family, write_latents, EngineOptions, Family, Flux1, Flux2, LoadProgress, Pipeline,
    PipelineOutput, PipelineRequest,
};
use kiln_worker::{run_pool, ReferenceFetcher};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// `kiln serve`: the HTTP API with an in-process worker pool.
pub async fn serve(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    // An API node (no worker slots) runs no model, so it loads none.
    let slots = load_slots_blocking(&settings).await?;
    if settings.workers.slots > 0 && kiln_worker::Slot::served_routes(&slots).is_empty() {
        tracing::warn!(
            "no model has a checkpoint configured and serve_demo is off: submits will be refused \
             until one is (see README, \"Models\")"
        );
    }
    let app = Application::build(settings, slots).await?;
    bootstrap_first_key(app.stores()).await?;
    app.run(shutdown).await
}

/// Loads the slots' engines on a blocking thread: the async threads keep serving signals
/// meanwhile.
async fn load_slots_blocking(settings: &Settings) -> anyhow::Result<Vec<kiln_worker::Slot>> {
    let settings = settings.clone();
    Ok(tokio::task::spawn_blocking(move || load_slots(&settings)).await??)
}

/// On a first start (no key at all), creates one and shows it once.
async fn bootstrap_first_key(stores: &Stores) -> anyhow::Result<()> {
    if stores.keys.key_count().await? > 0 {
        return Ok(());
    }
    let token = create_key(stores, "default").await?;
    tracing::info!(
        key = "default",
        "first start: created an API key (its token is on stdout, shown once)"
    );
    println!(
        "\nkiln: first start, so an API key named 'default' was created. It is shown only this once:\n\n    \
         {token}\n\nUse it as `Authorization: Bearer <key>`. Manage keys with `kiln keys create|list|revoke`.\n"
    );
    Ok(())
}

async fn create_key(stores: &Stores, name: &str) -> anyhow::Result<String> {
    let token = new_token();
    stores
        .keys
        .insert_key(name, &hash_token(&token), &token_prefix(&token))
        .await?;
    Ok(token)
}

/// `kiln worker`: workers only, no HTTP listener.
pub async fn worker(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(
        settings.workers.slots > 0,
        "workers.slots is 0: a worker with no slots would do nothing"
    );
    let slots = load_slots_blocking(&settings).await?;
    anyhow::ensure!(
        !kiln_worker::Slot::served_routes(&slots).is_empty(),
        "no model has a checkpoint configured and serve_demo is off, so this worker could take no job (see README, \"Models\")"
    );
    let stores = open_stores(&settings).await?;
    let metrics = match settings.workers.metrics_bind {
        Some(bind) => {
            let listener = tokio::net::TcpListener::bind(bind)
                .await
                .with_context(|| format!("binding {bind}"))?;
            tracing::info!(address = %listener.local_addr()?, what = "worker metrics and health", "kiln is listening");
            Some(tokio::spawn(crate::worker_metrics::serve(
                listener,
                stores.clone(),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let sweeper = spawn_sweeper(&settings, &stores, &shutdown);
    run_pool(
        stores.jobs,
        stores.blobs,
        slots,
        worker_settings(&settings),
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    sweeper.await?;
    if let Some(metrics) = metrics {
        metrics.await?.context("metrics listener")?;
    }
    Ok(())
}

pub enum KeysAction {
    Create { name: String },
    List,
    Revoke { name: String },
}

/// `kiln keys create|list|revoke`.
pub async fn keys(settings: Settings, action: KeysAction) -> anyhow::Result<()> {
    let stores = open_stores(&settings).await?;
    match action {
        KeysAction::Create { name } => {
            anyhow::ensure!(
                !name.trim().is_empty() && name.len() <= 64,
                "--name must be 1 to 64 characters"
            );
            let token = create_key(&stores, &name).await?;
            println!("{token}");
            eprintln!(
                "Created key '{name}'. This is the only time the token is shown: store it now."
            );
        }
        KeysAction::List => {
            println!("{:<24} {:<14} {:<22} REVOKED", "NAME", "PREFIX", "CREATED");
            for key in stores.keys.list_keys().await? {
                let fmt = |t: time::OffsetDateTime| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                };
                println!(
                    "{:<24} {:<14} {:<22} {}",
                    key.name,
                    format!("{}…", key.prefix),
                    fmt(key.created_at),
                    key.revoked_at.map(fmt).unwrap_or_else(|| "-".into())
                );
            }
        }
        KeysAction::Revoke { name } => {
            let key = stores.keys.revoke_key(&name).await?;
            println!(
                "Revoked key '{}'; requests with it now answer 401.",
                key.name
            );
        }
    }
    Ok(())
}

/// What `kiln generate --model ID` is asked to make.
pub struct GenerateRequest {
    pub route: String,
    /// The route's input as JSON (exactly what the API takes).
    pub input: serde_json::Value,
    pub output: PathBuf,
}

/// `kiln generate --model ID --input JSON -o FILE`: one generation, locally, no server.
pub fn generate(settings: Settings, request: GenerateRequest) -> anyhow::Result<()> {
    let route: Route = request.route.parse()?;
    let mut params = parse_input(route, &request.input, settings.limits.max_prompt_chars)?;
    if let Some(format) = format_of_path(&request.output) {
        params.output_format = format;
    }
    let loading = ProgressBar::new_spinner();
    let engine = load_engine(&settings, route, &mut spinner_progress(&loading))?;
    loading.finish_and_clear();
    let engine = engine.with_context(|| {
        format!("no checkpoint serves {route} (none configured, and the demo checkpoint is off or could not be had): set [models.\"{route}\"] checkpoint = \"DIR\" in kiln.toml")
    })?;
    eprintln!("loaded {}", engine.describe());
    let fetcher = ReferenceFetcher::new(settings.fetch.policy());
    let references =
        tokio::runtime::Runtime::new()?.block_on(fetcher.fetch_all(&params.reference_images))?;
    let bar = step_bar();
    let started = Instant::now();
    let generated = engine.generate(&params, &references, &mut BarObserver(bar.clone()))?;
    bar.finish_and_clear();
    write_image(&request.output, &generated.image, params.output_format)?;
    report(
        &request.output,
        &generated.image,
        &generated.applied,
        u64::from(params.seed),
        started,
    );
    Ok(())
}

/// What `kiln generate --model-dir DIR` runs: a checkpoint directly, below the routes' schemas.
pub struct DirectRequest {
    pub model_dir: PathBuf,
    pub options: EngineOptions,
    /// What to run; its `initial_latents` come from `--latents`.
    pub pipeline: PipelineRequest,
    /// Where to write the final packed latents before the VAE (tensor `latents`).
    pub dump_latents: Option<PathBuf>,
    pub output: PathBuf,
}

/// `kiln generate --model-dir DIR ...`: for comparing kiln with other implementations. The
/// directory may hold a FLUX.1 or a FLUX.2 checkpoint, in any layout the engine reads.
pub fn generate_direct(request: DirectRequest) -> anyhow::Result<()> {
    let format = format_of_path(&request.output).unwrap_or_default();
    let loading = ProgressBar::new_spinner();
    let mut on_load = spinner_progress(&loading);
    let bar = step_bar();
    let mut observer = BarObserver(bar.clone());
    let run = match checkpoint_family(&request.model_dir)? {
        ModelFamily::Flux1 => run_direct::<Flux1>,
        ModelFamily::Flux2 => run_direct::<Flux2>,
    };
    let (output, started) = run(&request, &mut on_load, &loading, &mut observer)?;
    bar.finish_and_clear();
    if let Some(path) = &request.dump_latents {
        write_latents(path, &output.final_latents)?;
    }
    write_image(&request.output, &output.image, format)?;
    report(
        &request.output,
        &output.image,
        &output.applied,
        request.pipeline.seed,
        started,
    );
    Ok(())
}

/// Loads the checkpoint of family `F` and runs the request on it: the output and when the
/// generation (not the loading) started.
fn run_direct<F: Family>(
    request: &DirectRequest,
    on_load: &mut dyn FnMut(LoadProgress),
    loading: &ProgressBar,
    observer: &mut dyn StepObserver,
) -> anyhow::Result<(PipelineOutput, Instant)> {
    let pipeline = Pipeline::<F>::load(&request.model_dir, &request.options, on_load)?;
    loading.finish_and_clear();
    eprintln!("loaded {}", pipeline.describe());
    let started = Instant::now();
    Ok((pipeline.run(&request.pipeline, &[], observer)?, started))
}

/// Shows a checkpoint's loading, component by component, on `spinner`.
fn spinner_progress(spinner: &ProgressBar) -> impl FnMut(LoadProgress) + '_ {
    move |p: LoadProgress| {
        spinner.set_message(format!("loading {} {}/{}", p.component, p.done, p.total));
        spinner.tick();
    }
}

/// `kiln config`: the configuration in force (defaults, file, environment), secrets redacted.
pub fn print_config(settings: &Settings) -> anyhow::Result<()> {
    print!("{}", settings.to_toml_redacted()?);
    Ok(())
}

fn step_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {elapsed} ({eta} left)",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

fn write_image(path: &Path, image: &RgbImage, format: OutputFormat) -> anyhow::Result<()> {
    let bytes = encode_image(image, format)?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn report(path: &Path, image: &RgbImage, applied: &AppliedSettings, seed: u64, started: Instant) {
    eprintln!(
        "wrote {} ({}x{}, {} steps, seed {seed}) in {:.1}s",
        path.display(),
        image.width,
        image.height,
        applied.num_inference_steps,
        started.elapsed().as_secs_f64()
    );
    for note in &applied.notes {
        eprintln!("note: {note}");
    }
}

/// The format a file name asks for, when its extension names one.
fn format_of_path(path: &Path) -> Option<OutputFormat> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "png" => Some(OutputFormat::Png),
        "jpg" | "jpeg" => Some(OutputFormat::Jpeg),
        _ => None,
    }
}

struct BarObserver(ProgressBar);

impl StepObserver for BarObserver {
    fn on_step(&mut self, event: StepEvent<'_>) -> ControlFlow<()> {
        self.0.set_length(u64::from(event.total));
        self.0.set_position(u64::from(event.step));
        ControlFlow::Continue(())
    }
}
