//! Loads the engines the configuration names, once, to keep them resident. A text-to-image
//! route with no checkpoint configured is served by the demo checkpoint, or (with
//! `serve_demo = false`, or when the demo checkpoint cannot be had) has no engine: the API then
//! refuses its submits with a clear error, and workers do not claim it. The FLUX.2 [flex] edit
//! route is served by the FLUX.2 checkpoint of the text-to-image route, and only by it (the demo
//! checkpoint cannot condition on images).
//!
//! Each device the worker slots run on (`workers.devices`) loads its own copy, which the slots
//! on it share with that device's memory budget (`workers.memory_budget_gib`, or a GPU's free
//! memory once loaded).

use crate::config::Settings;
use crate::demo;
use kiln_core::catalog::Route;
use kiln_core::engine::Engine;
use kiln_engine::{DeviceSpec, Family, Flux1, Flux2, LoadProgress, ModelConfig, ModelEngine};
use kiln_worker::{EngineSet, MemoryBudget, Slot};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum EngineLoadError {
    #[error("loading the checkpoint for {route}: {source}")]
    Checkpoint {
        route: Route,
        source: kiln_engine::Error,
    },
    #[error("reading the free memory of {device} for workers.memory_budget_gib: {source}")]
    DeviceMemory {
        device: DeviceSpec,
        source: kiln_engine::Error,
    },
}

/// What a GPU's default budget leaves free beside the jobs: the CUDA libraries' workspaces
/// (cuBLAS's, the caching allocator's slack) and other processes' small needs.
const GPU_HEADROOM: u64 = 1 << 30;

/// The worker slots of this process (`workers.slots`), each with the engines of every served
/// route on its device and that device's memory budget: engines load once per device, and the
/// slots on one device share them and its budget. Blocking (reads and maps gigabytes): call it
/// off the async threads. Progress goes to the log, a line per component.
pub fn load_slots(settings: &Settings) -> Result<Vec<Slot>, EngineLoadError> {
    let mut loaded: Vec<(Option<DeviceSpec>, Slot)> = Vec::new();
    let mut slots = Vec::new();
    for device in settings.slot_devices() {
        let slot = match loaded.iter().find(|(d, _)| *d == device) {
            Some((_, slot)) => slot.clone(),
            None => {
                let slot = load_slot(settings, device)?;
                loaded.push((device, slot.clone()));
                slot
            }
        };
        slots.push(slot);
    }
    Ok(slots)
}

/// The engines on `device` (`None`: where the models' tables put them) and its budget.
fn load_slot(settings: &Settings, device: Option<DeviceSpec>) -> Result<Slot, EngineLoadError> {
    let mut loader = Loader::new(settings, device);
    let mut engines = EngineSet::new();
    for route in settings.served_routes() {
        if let Some(engine) = loader.engine_for(route, &mut log_progress(route))? {
            engines = engines.with(route, engine);
        }
    }
    let slot = Slot::new(engines);
    let Some(device) = device.or_else(|| loader.only_device()) else {
        tracing::warn!(
            "the models run on different devices and workers.devices is unset: their jobs run \
             without a memory budget (set workers.devices to give each device one)"
        );
        return Ok(slot);
    };
    Ok(match memory_budget(settings, device)? {
        Some(budget) => {
            tracing::info!(%device, budget_gib = budget.total_bytes() as f64 / (1u64 << 30) as f64, "memory budget for the jobs on the device");
            slot.with_memory(Arc::new(budget))
        }
        None => slot,
    })
}

/// The configured budget, or a GPU's free memory (after loading) less [`GPU_HEADROOM`]; none
/// on the CPU unless configured.
fn memory_budget(
    settings: &Settings,
    device: DeviceSpec,
) -> Result<Option<MemoryBudget>, EngineLoadError> {
    let name = device.to_string();
    if let Some(bytes) = settings.workers.memory_budget_bytes() {
        return Ok(Some(MemoryBudget::new(name, bytes)));
    }
    let free = kiln_engine::free_memory(device)
        .map_err(|source| EngineLoadError::DeviceMemory { device, source })?;
    Ok(free.map(|free| MemoryBudget::new(name, free.saturating_sub(GPU_HEADROOM))))
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
    // On the first slot's device where `workers.devices` places the slots.
    let device = settings.workers.devices.first().copied();
    Loader::new(settings, device).engine_for(route, progress)
}

/// Loads each checkpoint at most once, however many routes it serves.
struct Loader<'a> {
    settings: &'a Settings,
    /// Every model on this device (`workers.devices`), or where its table puts it.
    device: Option<DeviceSpec>,
    /// The devices of the models loaded so far.
    devices: Vec<DeviceSpec>,
    /// `None` until first needed; then the demo engine, or `None` inside when it cannot be had.
    demo: Option<Option<Arc<ModelEngine<Flux1>>>>,
    /// The FLUX.2 checkpoint serves both FLUX.2 [flex] routes.
    flux2: Option<Arc<ModelEngine<Flux2>>>,
}

impl<'a> Loader<'a> {
    fn new(settings: &'a Settings, device: Option<DeviceSpec>) -> Self {
        Self {
            settings,
            device,
            devices: Vec::new(),
            demo: None,
            flux2: None,
        }
    }

    /// `config` on this loader's device, if it has one; its device noted.
    fn place(&mut self, config: &ModelConfig) -> ModelConfig {
        let config = match self.device {
            Some(device) => config.clone().on(device),
            None => config.clone(),
        };
        if !self.devices.contains(&config.device()) {
            self.devices.push(config.device());
        }
        config
    }

    /// The one device every model loaded so far runs on, if they share one.
    fn only_device(&self) -> Option<DeviceSpec> {
        match self.devices.as_slice() {
            [device] => Some(*device),
            _ => None,
        }
    }

    fn engine_for(
        &mut self,
        route: Route,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Option<Arc<dyn Engine>>, EngineLoadError> {
        let settings = self.settings;
        let models = &settings.models;
        let engine: Arc<dyn Engine> = match (route, &models.flux11_pro, &models.flux2_flex) {
            (Route::Flux11ProTextToImage, Some(config), _) => {
                Arc::new(load::<Flux1>(route, self.place(config), progress)?)
            }
            (Route::Flux2FlexTextToImage | Route::Flux2FlexEdit, _, Some(config)) => {
                if self.flux2.is_none() {
                    let engine = load::<Flux2>(route, self.place(config), progress)?;
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
                Some(dir) => {
                    let config = self.place(&ModelConfig::new(dir));
                    Some(Arc::new(load::<Flux1>(route, config, progress)?))
                }
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
    let engine = ModelEngine::load(config, progress)
        .map_err(|source| EngineLoadError::Checkpoint { route, source })?;
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
