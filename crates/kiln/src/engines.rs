//! Loads the engines the configuration names, once, to keep them resident. A route with no
//! checkpoint configured has no engine: the API refuses its submits with a clear error, and
//! workers do not claim it.

use crate::config::Settings;
use kiln_core::catalog::Route;
use kiln_engine::{Flux1Engine, LoadProgress};
use kiln_worker::EngineSet;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
#[error("loading the checkpoint for {route}: {source}")]
pub struct EngineLoadError {
    route: Route,
    source: kiln_engine::Error,
}

/// Loads every configured engine. Blocking (reads and maps gigabytes): call it off the async
/// threads. Progress goes to the log, a line per component.
pub fn load_engines(settings: &Settings) -> Result<EngineSet, EngineLoadError> {
    let mut engines = EngineSet::new();
    if let Some(config) = &settings.models.flux11_pro {
        let route = Route::Flux11ProTextToImage;
        tracing::info!(%route, checkpoint = %config.checkpoint.display(), "loading checkpoint");
        let engine = Flux1Engine::load(config.clone(), &mut log_progress(route))
            .map_err(|source| EngineLoadError { route, source })?;
        tracing::info!(%route, engine = %kiln_core::engine::Engine::describe(&engine), "checkpoint loaded");
        engines = engines.with(route, Arc::new(engine));
    }
    Ok(engines)
}

/// Logs each component once it is fully loaded.
pub fn log_progress(route: Route) -> impl FnMut(LoadProgress) {
    move |p: LoadProgress| {
        if p.done == p.total {
            tracing::info!(%route, component = p.component, "loaded");
        }
    }
}
