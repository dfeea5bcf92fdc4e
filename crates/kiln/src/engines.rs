//! Loads the engines the configuration names, once, to keep them resident. A text-to-image
//! route with no checkpoint configured is served by the demo checkpoint, or (with
//! `serve_demo = false`, or when the demo checkpoint cannot be had) has no engine: the API then
//! refuses its submits with a clear error, and workers do not claim it. The FLUX.2 [flex] edit
//! route is served by the FLUX.2 checkpoint of the text-to-image route, and only by it (the demo
//! checkpoint cannot condition on images).

use crate::config::Settings;
use crate::demo;
use kiln_core::catalog::Route;
use kiln_core::engine::Engine;
use kiln_engine::{Family, Flux1, Flux2, LoadProgress, ModelConfig, ModelEngine};
use kiln_worker::EngineSet;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
#[error("loading the checkpoint for {route}: {source}")]
pub struct EngineLoadError {
    route: Route,
    source: kiln_engine::Error,
}

/// Loads the engine of every served route: its configured checkpoint, or the demo checkpoint
/// (loaded once, shared by the routes it serves). Blocking (reads and maps gigabytes): call it
/// off the async threads. Progress goes to the log, a line per component.
pub fn load_engines(settings: &Settings) -> Result<EngineSet, EngineLoadError> {
    let mut loader = Loader::new(settings);
    let mut engines = EngineSet::new();
    for route in settings.served_routes() {
        if let Some(engine) = loader.engine_for(route, &mut log_progress(route))? {
            engines = engines.with(route, engine);
        }
    }
    Ok(engines)
}

/// Loads only `route`'s engine (what `kiln generate --model` runs), reporting each component's
/// progress to `progress`. `None`: nothing serves the route.
pub fn load_engine(
    settings: &Settings,
    route: Route,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<Option<Arc<dyn Engine>>, EngineLoadError> {
    if !settings.served_routes().contains(&route) {
        return Ok(None);
    }
    Loader::new(settings).engine_for(route, progress)
}

/// Loads each checkpoint at most once, however many routes it serves.
struct Loader<'a> {
    settings: &'a Settings,
    /// `None` until first needed; then the demo engine, or `None` inside when it cannot be had.
    demo: Option<Option<Arc<ModelEngine<Flux1>>>>,
    /// The FLUX.2 checkpoint serves both FLUX.2 [flex] routes.
    flux2: Option<Arc<ModelEngine<Flux2>>>,
}

impl<'a> Loader<'a> {
    fn new(settings: &'a Settings) -> Self {
        Self {
            settings,
            demo: None,
            flux2: None,
        }
    }

    fn engine_for(
        &mut self,
        route: Route,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Option<Arc<dyn Engine>>, EngineLoadError> {
        let models = &self.settings.models;
        let engine: Arc<dyn Engine> = match (route, &models.flux11_pro, &models.flux2_flex) {
            (Route::Flux11ProTextToImage, Some(config), _) => {
                Arc::new(load::<Flux1>(route, config.clone(), progress)?)
            }
            (Route::Flux2FlexTextToImage | Route::Flux2FlexEdit, _, Some(config)) => {
                if self.flux2.is_none() {
                    let engine = load::<Flux2>(route, config.clone(), progress)?;
                    self.flux2 = Some(Arc::new(engine));
                }
                self.flux2.clone().expect("loaded above")
            }
            _ => match self.demo(route, progress)? {
                Some(engine) => engine,
                None => return Ok(None),
            },
        };
        Ok(Some(engine))
    }

    fn demo(
        &mut self,
        route: Route,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Option<Arc<dyn Engine>>, EngineLoadError> {
        if self.demo.is_none() {
            let loaded = match demo_dir(self.settings) {
                Some(dir) => Some(Arc::new(load::<Flux1>(
                    route,
                    ModelConfig::new(dir),
                    progress,
                )?)),
                None => None,
            };
            self.demo = Some(loaded);
        }
        let engine = self.demo.clone().flatten();
        if engine.is_some() {
            tracing::warn!(
                %route,
                "no checkpoint is configured for this route: it is served by kiln's small demo \
                 checkpoint, trained on simple shapes (see its MODEL_CARD.md); configure \
                 [models.\"{route}\"] to serve a real model"
            );
        }
        Ok(engine.map(|e| e as Arc<dyn Engine>))
    }
}

/// The demo checkpoint's directory: the configured one, or the binary's embedded copy written
/// into the data directory. `None` (with a warning) when it cannot be had: the routes it would
/// serve are then refused, and the rest of kiln runs.
fn demo_dir(settings: &Settings) -> Option<PathBuf> {
    let dir = match &settings.demo_checkpoint {
        Some(dir) if dir.is_dir() => dir.clone(),
        Some(dir) => {
            tracing::warn!(
                demo_checkpoint = %dir.display(),
                "the configured demo checkpoint is not there: routes without a checkpoint of \
                 their own will be refused"
            );
            return None;
        }
        None => match demo::install(&demo::install_dir(&settings.data_dir)) {
            Ok(dir) => dir,
            Err(error) => {
                tracing::warn!(
                    error = %error,
                    cause = %std::error::Error::source(&error).map(|c| c.to_string()).unwrap_or_default(),
                    "the embedded demo checkpoint could not be written: routes without a \
                     checkpoint of their own will be refused"
                );
                return None;
            }
        },
    };
    // Canonical, so logs show a plain path, not `crates/kiln/../..`.
    Some(dir.canonicalize().unwrap_or(dir))
}

fn load<F: Family>(
    route: Route,
    config: ModelConfig,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<ModelEngine<F>, EngineLoadError> {
    tracing::info!(%route, checkpoint = %config.checkpoint.display(), "loading checkpoint");
    let engine =
        ModelEngine::load(config, progress).map_err(|source| EngineLoadError { route, source })?;
    log_loaded(route, &engine);
    Ok(engine)
}

fn log_loaded(route: Route, engine: &dyn Engine) {
    tracing::info!(%route, engine = %engine.describe(), "checkpoint loaded");
}

/// Logs each component once it is fully loaded.
fn log_progress(route: Route) -> impl FnMut(LoadProgress) {
    move |p: LoadProgress| {
        if p.done == p.total {
            tracing::info!(%route, component = p.component, "loaded");
        }
    }
}
