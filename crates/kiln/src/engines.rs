//! Loads the engines the configuration names, once, to keep them resident. A text-to-image
//! route with no checkpoint configured is served by the demo checkpoint, or (with
//! `serve_demo = false`) has no engine: the API then refuses its submits with a clear error, and
//! workers do not claim it. The FLUX.2 [flex] edit route is served by the FLUX.2 checkpoint of
//! the text-to-image route, and only by it (the demo checkpoint cannot condition on images).

use crate::config::Settings;
use kiln_core::catalog::Route;
use kiln_core::engine::Engine;
use kiln_engine::{Flux1Config, Flux1Engine, Flux2Config, Flux2Engine, LoadProgress};
use kiln_worker::EngineSet;
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
    let mut engines = EngineSet::new();
    let mut demo: Option<Arc<Flux1Engine>> = None;
    // The FLUX.2 checkpoint serves both FLUX.2 [flex] routes, loaded once.
    let mut flux2: Option<Arc<Flux2Engine>> = None;
    for route in settings.served_routes() {
        let models = &settings.models;
        let engine: Arc<dyn Engine> = match (route, &models.flux11_pro, &models.flux2_flex) {
            (Route::Flux11ProTextToImage, Some(config), _) => {
                Arc::new(load_flux1(route, config.clone())?)
            }
            (Route::Flux2FlexTextToImage | Route::Flux2FlexEdit, _, Some(config)) => match &flux2 {
                Some(engine) => engine.clone(),
                None => flux2
                    .insert(Arc::new(load_flux2(route, config.clone())?))
                    .clone(),
            },
            _ => {
                tracing::warn!(
                    %route,
                    checkpoint = %settings.demo_checkpoint.display(),
                    "no checkpoint is configured for this route: it is served by kiln's small demo \
                     checkpoint, trained on simple shapes (see its MODEL_CARD.md); configure \
                     [models.\"{route}\"] to serve a real model"
                );
                match &demo {
                    Some(engine) => engine.clone(),
                    None => {
                        // Canonical, so logs and metadata show a plain path, not `crates/kiln/../..`.
                        let dir = settings
                            .demo_checkpoint
                            .canonicalize()
                            .unwrap_or_else(|_| settings.demo_checkpoint.clone());
                        demo.insert(Arc::new(load_flux1(route, Flux1Config::new(dir))?))
                            .clone()
                    }
                }
            }
        };
        engines = engines.with(route, engine);
    }
    Ok(engines)
}

fn load_flux1(route: Route, config: Flux1Config) -> Result<Flux1Engine, EngineLoadError> {
    tracing::info!(%route, checkpoint = %config.checkpoint.display(), "loading checkpoint");
    let engine = Flux1Engine::load(config, &mut log_progress(route))
        .map_err(|source| EngineLoadError { route, source })?;
    log_loaded(route, &engine);
    Ok(engine)
}

fn load_flux2(route: Route, config: Flux2Config) -> Result<Flux2Engine, EngineLoadError> {
    tracing::info!(%route, checkpoint = %config.checkpoint.display(), "loading checkpoint");
    let engine = Flux2Engine::load(config, &mut log_progress(route))
        .map_err(|source| EngineLoadError { route, source })?;
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
