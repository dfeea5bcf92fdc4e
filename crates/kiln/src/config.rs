//! kiln's one typed configuration, read the same way by every command.
//!
//! Layers, later ones winning: built-in defaults → a TOML file (`--config FILE`, `KILN_CONFIG`,
//! or `./kiln.toml` when present) → `KILN_…` environment variables (nested keys with `__`, e.g.
//! `KILN_WORKERS__SLOTS=2`) → command-line flags. Unknown keys are refused, so a typo never
//! silently does nothing.

use crate::store_url::{redact_password, StoreLocation};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use kiln_blob::BlobLocation;
use kiln_core::catalog::Route;
use kiln_engine::{DeviceSpec, ModelConfig};
use kiln_worker::{AllowList, FetchPolicy};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where the HTTP server listens. Loopback unless told otherwise.
    pub bind: SocketAddr,
    /// The base of every URL in answers; `http://{bind}` when unset.
    pub public_url: Option<String>,
    /// The SQLite database, the images, and the URL-signing key live here (by default: see
    /// `store.url` and `blobs.url`).
    pub data_dir: PathBuf,
    /// `[store]`: the queue and records.
    pub store: StoreConfig,
    /// `[blobs]`: the result images (and stored inline reference images).
    pub blobs: BlobsConfig,
    /// Hex HMAC key for file URLs. Unset: generated once into `{data_dir}/signing.key`.
    /// Several API nodes behind one balancer must share it.
    pub signing_key: Option<String>,
    /// `text` for people, `json` for log collectors.
    pub log_format: LogFormat,
    /// How long records and images are kept after a job ends, in hours.
    pub retention_hours: u64,
    /// How long an `Idempotency-Key` is remembered, in hours.
    pub idempotency_hours: u64,
    /// How often expired records are purged and abandoned jobs failed, in seconds.
    pub sweep_interval_secs: u64,
    pub limits: Limits,
    pub workers: WorkerConfig,
    /// How workers fetch an edit's reference images (`image_urls`).
    pub fetch: FetchConfig,
    /// `[webhooks]`: how requests' ends are announced to their `?webhook=` URLs.
    pub webhooks: WebhooksConfig,
    pub metrics: MetricsConfig,
    /// Per route: the checkpoint that serves it and how to run it.
    pub models: ModelsConfig,
    /// Serve every route that has no checkpoint configured with kiln's own demo checkpoint, so
    /// that a fresh install makes real images with no download. `false`: refuse such routes.
    pub serve_demo: bool,
    /// A directory holding the demo checkpoint. Unset: the copy embedded in the binary,
    /// written once to `{data_dir}/demo-checkpoint`.
    pub demo_checkpoint: Option<PathBuf>,
}

/// The demo checkpoint in the repository, trained by `tools/demo` (see its MODEL_CARD.md): what
/// the binary embeds, and what benchmarks and tests read in place.
pub const BUNDLED_DEMO_CHECKPOINT: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/demo-checkpoint");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_prompt_chars: usize,
    /// Submits beyond this many waiting jobs answer 503001 with `Retry-After`.
    pub max_queued: u64,
    /// Submits of a key with this many jobs waiting answer 429001 with `Retry-After`: one key
    /// cannot fill the queue that every key shares.
    pub max_queued_per_key: u64,
    /// Submits per minute per token; 0 turns the limit off.
    pub rate_limit_per_minute: u32,
    pub rate_limit_burst: u32,
    /// HTTP connections open at once; further clients wait to be accepted. Lowered at start to
    /// leave descriptors for the store, blob writes and workers (see `app::connection_cap`).
    pub max_connections: usize,
    /// The longest a client may take to send a request's head, in seconds; also how long an
    /// HTTP/1.1 keep-alive connection waits for its next request.
    pub header_timeout_secs: u64,
    /// The longest a client may take to send a request's body, in seconds (then 408).
    pub body_timeout_secs: u64,
    /// How long a connection may stay open with no request in progress and no byte moving.
    pub idle_timeout_secs: u64,
    /// The longest a `Prefer: wait=N` submit is held, 1 to 60 s (clients may ask up to 60):
    /// lower it behind a proxy that cuts requests off sooner.
    pub max_prefer_wait_secs: u64,
}

/// `[store]`: where jobs and API keys are kept.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` (one machine) or `postgres://USER:PASSWORD@HOST[:PORT]/DATABASE`
    /// (many: every API node and worker names the same database). Unset:
    /// `sqlite://{data_dir}/kiln.db`. Environment: `KILN_STORE__URL`.
    pub url: Option<String>,
}

/// `[blobs]`: where images are kept.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlobsConfig {
    /// `file://DIR` (one machine) or `s3://BUCKET[/PREFIX]` (many: any S3-compatible store;
    /// endpoint, region and credentials from `AWS_ENDPOINT_URL`, `AWS_REGION`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, and `AWS_ALLOW_HTTP=true` for an http
    /// endpoint). Unset: `file://{data_dir}/files`. Environment: `KILN_BLOBS__URL`.
    pub url: Option<String>,
}

/// `[metrics]`: where `kiln serve` serves `/metrics`, and whether it takes a token.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` at `http://{bind}/metrics` and not on the API port (which answers it
    /// 404). Unset: on the API port.
    pub bind: Option<SocketAddr>,
    /// When set, `/metrics` requires `Authorization: Bearer <token>` wherever `kiln serve`
    /// serves it.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// In-process worker slots of `kiln serve` (0: API only, for separate `kiln worker`s);
    /// also the slots of `kiln worker`.
    pub slots: usize,
    pub lease_secs: u64,
    pub max_attempts: u32,
    pub poll_interval_ms: u64,
    /// On shutdown, how long a running job may finish before it is released to the queue.
    pub drain_timeout_secs: u64,
    /// The longest one job may run, its images' fetching included; then it is stopped and
    /// fails with `timed_out`. Generous by default: FLUX.1 dev at 1024x1024 and 50 steps on a
    /// small CPU takes tens of minutes.
    pub job_timeout_secs: u64,
    /// The device of each slot, in turn: slot `i` runs on `devices[i % len]`, so
    /// `["cuda:0", "cuda:1"]` with `slots = 2` gives each GPU one slot, and with `slots = 4` two.
    /// Each device listed loads its own copy of the served models, which its slots share.
    /// Empty (the default): every slot runs the models where their tables' `device` puts them.
    pub devices: Vec<DeviceSpec>,
    /// What the jobs on one device may hold at once beyond the models' weights, in GiB. Each
    /// job reserves the memory its engine estimates for its size before it runs, and waits
    /// while the device's other jobs hold too much, so slots sharing a device never overcommit
    /// it; a job that needs more than the whole budget fails with a message saying so. Unset:
    /// on a GPU, its free memory once the models are loaded, less 1 GiB; on the CPU, no budget.
    pub memory_budget_gib: Option<f64>,
    /// `kiln worker` only: serve its own metrics (step and job durations) at
    /// `http://{metrics_bind}/metrics`, and `/healthz` and `/readyz` (200 while the store and
    /// the blob store answer) for an orchestrator's probes. Unset: no listener at all. (`kiln serve` exports the
    /// same series on its API port, or on `metrics.bind`.)
    pub metrics_bind: Option<SocketAddr>,
}

impl WorkerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.slots > 0 && self.slots < self.devices.len() {
            return Err(ConfigError::Invalid(format!(
                "workers.devices lists {} devices but workers.slots is {}: each device needs at \
                 least one slot (set workers.slots = {})",
                self.devices.len(),
                self.slots,
                self.devices.len()
            )));
        }
        if let Some(gib) = self.memory_budget_gib {
            if !(gib.is_finite() && gib > 0.0) {
                return Err(ConfigError::Invalid(format!(
                    "workers.memory_budget_gib must be a positive number of GiB, not {gib}"
                )));
            }
        }
        Ok(())
    }

    /// The budget in bytes, where one is configured.
    pub fn memory_budget_bytes(&self) -> Option<u64> {
        self.memory_budget_gib
            .map(|gib| (gib * (1u64 << 30) as f64) as u64)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// Address blocks (`10.0.0.0/8`, `192.168.1.5`, `fd12::/16`) and host names
    /// (`images.internal`) image URLs may reach although they are not public (images on the
    /// deployment's own network). Empty: public addresses only. A listed name does not open
    /// link-local or cloud metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254);
    /// only a listed block covering them does.
    pub allow: Vec<String>,
    /// The largest image, fetched or inline, in bytes.
    pub max_image_bytes: u64,
    /// The most time fetching all of a job's images may take (they are fetched concurrently),
    /// redirects and decoding included.
    pub timeout_secs: u64,
    pub max_redirects: usize,
}

/// `[webhooks]`. Deliveries go through the same address guard as image URLs: only public
/// addresses, unless `fetch.allow` opens others.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// How long an undelivered announcement is retried (with exponential backoff, the first
    /// retry after about 2 s), counted from the job's end.
    pub retry_hours: u64,
    /// The time a receiver has to answer 2xx; longer counts as a failed attempt.
    pub timeout_secs: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            retry_hours: 24,
            timeout_secs: 10,
        }
    }
}

/// The `[models."ROUTE"]` tables: each names the checkpoint that serves a route, in the
/// configuration type of that route's engine (its fields are documented in README.md).
///
/// Route ids contain `/`, which environment variable names cannot: in `KILN_…` variables a
/// table is named by its alias ([`ROUTE_TABLE_ALIASES`]), e.g.
/// `KILN_MODELS__FLUX_1_1_PRO__CHECKPOINT=/models/FLUX.1-dev`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    #[serde(rename = "blackforestlabs/flux-1-1-pro/text-to-image")]
    pub flux11_pro: Option<ModelConfig>,
    #[serde(rename = "blackforestlabs/flux-2/flex/text-to-image")]
    pub flux2_flex: Option<ModelConfig>,
}

impl ModelsConfig {
    /// Each table sets only its own route's options: `raw` belongs to FLUX 1.1 [pro] and
    /// `prompt_expansion` to FLUX.2 [flex], and one set on the other route would do nothing.
    /// Where this process runs the models (it has worker slots), each table's precision must be
    /// one this machine can run on each device the table's model runs on (bf16 on a CPU without
    /// bf16 instructions is refused here, not at the first generation). With `workers.devices`,
    /// the slots' devices place the models, and a table's own `device` is refused as a
    /// contradiction.
    fn validate(&self, workers: &WorkerConfig) -> Result<(), ConfigError> {
        // Each table is named after its text-to-image route.
        let (pro, flex) = (
            Route::Flux11ProTextToImage.id(),
            Route::Flux2FlexTextToImage.id(),
        );
        for (table, config) in [(pro, &self.flux11_pro), (flex, &self.flux2_flex)] {
            let Some(config) = config else { continue };
            if !workers.devices.is_empty() && config.device.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "models.\"{table}\".device: workers.devices places the models on each slot's \
                     device; leave the models' device unset"
                )));
            }
            // An API node's own CPU does not matter.
            if workers.slots == 0 {
                continue;
            }
            let placed: Vec<ModelConfig> = match workers.devices.as_slice() {
                [] => vec![config.clone()],
                devices => devices.iter().map(|d| config.clone().on(*d)).collect(),
            };
            for config in placed {
                config.check_precision().map_err(|message| {
                    ConfigError::Invalid(format!("models.\"{table}\".precision: {message}"))
                })?;
            }
        }
        let misplaced = |route: &str, key: &str, owner: &str| {
            ConfigError::Invalid(format!(
                "models.\"{route}\".{key}: `{key}` is a {owner} option; this route has none"
            ))
        };
        if self
            .flux11_pro
            .as_ref()
            .is_some_and(|c| c.prompt_expansion.is_some())
        {
            return Err(misplaced(pro, "prompt_expansion", "FLUX.2 [flex]"));
        }
        if self.flux2_flex.as_ref().is_some_and(|c| c.raw.is_some()) {
            return Err(misplaced(flex, "raw", "FLUX 1.1 [pro]"));
        }
        Ok(())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            data_dir: PathBuf::from("kiln-data"),
            store: StoreConfig::default(),
            blobs: BlobsConfig::default(),
            signing_key: None,
            log_format: LogFormat::Text,
            retention_hours: 7 * 24,
            idempotency_hours: 24,
            sweep_interval_secs: 60,
            limits: Limits {
                max_body_bytes: 16 * 1024 * 1024,
                max_prompt_chars: 10_000,
                max_queued: 1_000,
                max_queued_per_key: 500,
                // Off: a single-tenant install has nobody to share with, and `max_queued` is
                // the back-pressure. Switched on (multi-tenant), a key may burst 100 submits.
                rate_limit_per_minute: 0,
                rate_limit_burst: 100,
                max_connections: 512,
                header_timeout_secs: 10,
                body_timeout_secs: 30,
                idle_timeout_secs: 60,
                max_prefer_wait_secs: 60,
            },
            workers: WorkerConfig {
                slots: 1,
                lease_secs: 60,
                max_attempts: 3,
                poll_interval_ms: 250,
                drain_timeout_secs: 30,
                job_timeout_secs: 3600,
                devices: Vec::new(),
                memory_budget_gib: None,
                metrics_bind: None,
            },
            fetch: FetchConfig {
                allow: Vec::new(),
                max_image_bytes: 50 * 1000 * 1000,
                timeout_secs: 30,
                max_redirects: 5,
            },
            webhooks: WebhooksConfig::default(),
            metrics: MetricsConfig::default(),
            models: ModelsConfig::default(),
            serve_demo: true,
            demo_checkpoint: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Settings::default().limits
    }
}

impl FetchConfig {
    /// `fetch.allow` parsed; [`Settings::load`] refuses a configuration where it does not.
    pub fn allow_list(&self) -> Result<AllowList, ConfigError> {
        AllowList::parse(&self.allow).map_err(|e| ConfigError::Invalid(format!("fetch.allow: {e}")))
    }

    /// The fetcher's policy. Settings from [`Settings::load`] have a valid `fetch.allow`.
    pub fn policy(&self) -> FetchPolicy {
        FetchPolicy {
            allow: self
                .allow_list()
                .expect("Settings::load checked fetch.allow"),
            max_image_bytes: self.max_image_bytes,
            timeout: Duration::from_secs(self.timeout_secs),
            max_redirects: self.max_redirects,
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        Settings::default().fetch
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Settings::default().workers
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(String),
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Invalid(e.to_string())
    }
}

/// Flags that override the file and the environment. `None` leaves a setting alone.
#[derive(Debug, Default, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--workers N`: the in-process worker slots.
    #[serde(skip)]
    pub worker_slots: Option<usize>,
}

/// What `kiln config` shows in place of a secret.
const REDACTED: &str = "<redacted>";

/// The environment's names for the `[models."ROUTE"]` tables: `KILN_MODELS__{ALIAS}__…`.
pub const ROUTE_TABLE_ALIASES: [(&str, Route); 2] = [
    ("flux_1_1_pro", Route::Flux11ProTextToImage),
    ("flux_2_flex", Route::Flux2FlexTextToImage),
];

/// An environment key (lowercased, `__` made `.`) with a route table's alias replaced
/// by the route id, so `models.flux_1_1_pro.steps` sets what the file's
/// `[models."blackforestlabs/flux-1-1-pro/text-to-image"] steps` does.
fn route_table_key(key: &str) -> String {
    let Some(rest) = key.strip_prefix("models.") else {
        return key.to_string();
    };
    let (table, field) = rest.split_once('.').unwrap_or((rest, ""));
    match ROUTE_TABLE_ALIASES
        .iter()
        .find(|(alias, _)| *alias == table)
    {
        Some((_, route)) if field.is_empty() => format!("models.{}", route.id()),
        Some((_, route)) => format!("models.{}.{field}", route.id()),
        None => key.to_string(),
    }
}

impl Settings {
    /// Reads the layers. `file` is the `--config` flag.
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Self, ConfigError> {
        let env_file = std::env::var_os("KILN_CONFIG").map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file).or_else(|| {
            let local = PathBuf::from("kiln.toml");
            local.exists().then_some(local)
        });
        let mut figment = Figment::new();
        if let Some(file) = &file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "no configuration file at {}",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        // KILN_CONFIG names the file; the bf16 kernel's variable is read by the CPU kernels
        // themselves, before any configuration.
        let bf16_kernel = kiln_engine::BF16_KERNEL_VARIABLE.trim_start_matches("KILN_");
        let env = Env::prefixed("KILN_")
            .ignore(&["CONFIG", bf16_kernel])
            .split("__");
        // Keys reach maps in their original case; figment lowercases them afterwards anyway.
        let env = env.map(|key| route_table_key(&key.as_str().to_ascii_lowercase()).into());
        figment = figment.merge(env);
        figment = figment.merge(Serialized::defaults(flags));
        let mut settings: Settings = figment.extract()?;
        if let Some(slots) = flags.worker_slots {
            settings.workers.slots = slots;
        }
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "public_url must start with http:// or https:// (got '{url}')"
                )));
            }
        }
        let limits = &self.limits;
        if limits.max_connections == 0
            || [
                limits.header_timeout_secs,
                limits.body_timeout_secs,
                limits.idle_timeout_secs,
            ]
            .contains(&0)
        {
            return Err(ConfigError::Invalid(
                "limits.max_connections and the limits' timeouts must be at least 1".into(),
            ));
        }
        if self.metrics.token.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::Invalid(
                "metrics.token must not be empty (leave it unset for no token)".into(),
            ));
        }
        self.fetch.allow_list()?;
        self.store_location()?;
        self.blob_location()?;
        if self.workers.lease_secs < 3 {
            return Err(ConfigError::Invalid(
                "workers.lease_secs must be at least 3".into(),
            ));
        }
        if !(1..=60).contains(&limits.max_prefer_wait_secs) {
            return Err(ConfigError::Invalid(
                "limits.max_prefer_wait_secs must be 1 to 60".into(),
            ));
        }
        if self.webhooks.retry_hours == 0 || self.webhooks.timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "webhooks.retry_hours and webhooks.timeout_secs must be at least 1".into(),
            ));
        }
        if self.workers.job_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "workers.job_timeout_secs must be at least 1".into(),
            ));
        }
        self.workers.validate()?;
        self.models.validate(&self.workers)
    }

    /// The device each worker slot runs on: `None` where the models' own `device`s apply.
    pub fn slot_devices(&self) -> Vec<Option<DeviceSpec>> {
        let devices = &self.workers.devices;
        (0..self.workers.slots)
            .map(|i| (!devices.is_empty()).then(|| devices[i % devices.len()]))
            .collect()
    }

    /// Every setting in force, as a TOML file would set it, with secrets redacted: what
    /// `kiln config` prints. (Unset optional settings are left out, as TOML has no null.)
    pub fn to_toml_redacted(&self) -> Result<String, ConfigError> {
        let mut shown = self.clone();
        if shown.signing_key.is_some() {
            shown.signing_key = Some(REDACTED.to_string());
        }
        if shown.metrics.token.is_some() {
            shown.metrics.token = Some(REDACTED.to_string());
        }
        if let Ok(StoreLocation::Postgres(url)) = self.store_location() {
            shown.store.url = Some(redact_password(&url).to_string());
        }
        toml::to_string_pretty(&shown).map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// `store.url` parsed, or its default in the data directory.
    pub fn store_location(&self) -> Result<StoreLocation, ConfigError> {
        match &self.store.url {
            Some(url) => StoreLocation::parse(url).map_err(|e| ConfigError::Invalid(e.to_string())),
            None => Ok(StoreLocation::Sqlite(self.data_dir.join("kiln.db"))),
        }
    }

    /// `blobs.url` parsed, or its default in the data directory.
    pub fn blob_location(&self) -> Result<BlobLocation, ConfigError> {
        match &self.blobs.url {
            Some(url) => url
                .parse::<BlobLocation>()
                .map_err(|e| ConfigError::Invalid(e.to_string())),
            None => Ok(BlobLocation::Directory(self.data_dir.join("files"))),
        }
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_hours * 3600)
    }

    /// The routes this configuration serves: those with a checkpoint, and with the demo all.
    pub fn served_routes(&self) -> Vec<Route> {
        Route::ALL
            .into_iter()
            .filter(|r| self.has_checkpoint(*r) || (self.serve_demo && !r.takes_reference_images()))
            .collect()
    }

    /// Whether a checkpoint of its own is configured for `route`.
    pub fn has_checkpoint(&self, route: Route) -> bool {
        match route {
            Route::Flux11ProTextToImage => self.models.flux11_pro.is_some(),
            Route::Flux2FlexTextToImage | Route::Flux2FlexEdit => self.models.flux2_flex.is_some(),
        }
    }
}

#[cfg(test)]
// figment's Jail returns its large error type by design.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_bind_loopback_and_keep_a_week() {
        Jail::expect_with(|_| {
            let s = Settings::load(None, &FlagOverrides::default()).unwrap();
            assert!(s.bind.ip().is_loopback());
            assert_eq!(s.retention(), Duration::from_secs(7 * 24 * 3600));
            assert!(
                s.serve_demo && s.demo_checkpoint.is_none(),
                "the embedded demo"
            );
            Ok(())
        });
    }

    #[test]
    fn fetch_allow_is_parsed_at_load_and_a_bad_entry_named() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "kiln.toml",
                "[fetch]\nallow = [\"10.0.0.0/8\", \"images.internal\"]\n",
            )?;
            let s = Settings::load(None, &FlagOverrides::default()).unwrap();
            let expected = AllowList::parse(["10.0.0.0/8", "images.internal"]).unwrap();
            assert_eq!(s.fetch.policy().allow, expected);
            jail.create_file("kiln.toml", "[fetch]\nallow = [\"10.0.0.1/8\"]\n")?;
            let err = Settings::load(None, &FlagOverrides::default()).unwrap_err();
            assert!(
                err.to_string().contains("fetch.allow: '10.0.0.1/8'"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn file_then_env_then_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "kiln.toml",
                r#"
                bind = "127.0.0.1:9000"
                data_dir = "/from/file"
                [workers]
                slots = 4
                [models."blackforestlabs/flux-1-1-pro/text-to-image"]
                checkpoint = "/models/flux1-dev"
                steps = 20
                "#,
            )?;
            jail.set_env("KILN_DATA_DIR", "/from/env");
            jail.set_env("KILN_WORKERS__MAX_ATTEMPTS", "5");
            jail.set_env("KILN_PUBLIC_URL", "https://kiln.example.com");
            let flags = FlagOverrides {
                bind: Some("0.0.0.0:7000".parse().unwrap()),
                worker_slots: Some(2),
                ..Default::default()
            };
            let s = Settings::load(None, &flags).unwrap();
            assert_eq!(s.bind.to_string(), "0.0.0.0:7000");
            assert_eq!(s.data_dir, PathBuf::from("/from/env"));
            assert_eq!((s.workers.slots, s.workers.max_attempts), (2, 5));
            assert_eq!(s.public_url.as_deref(), Some("https://kiln.example.com"));
            let model = s.models.flux11_pro.as_ref().unwrap();
            assert_eq!(
                (model.checkpoint.as_path(), model.steps),
                (Path::new("/models/flux1-dev"), Some(20))
            );
            assert!(
                s.has_checkpoint(Route::Flux11ProTextToImage)
                    && !s.has_checkpoint(Route::Flux2FlexTextToImage)
            );
            assert_eq!(
                s.served_routes(),
                vec![Route::Flux11ProTextToImage, Route::Flux2FlexTextToImage],
                "the demo serves the other text-to-image route, and no edits"
            );
            assert_eq!(
                s.limits.max_queued, 1_000,
                "a partial file keeps the other defaults"
            );
            Ok(())
        });
    }

    #[test]
    fn slots_take_the_devices_in_turn_and_contradictions_are_named() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "kiln.toml",
                "[workers]\nslots = 3\ndevices = [\"cpu\", \"cuda:1\"]\nmemory_budget_gib = 20.5\n",
            )?;
            // An API node's flags: the CUDA slots are not loaded here, only placed.
            let s = Settings::load(None, &FlagOverrides::default()).unwrap();
            let cuda1 = Some(DeviceSpec::Cuda(1));
            assert_eq!(
                s.slot_devices(),
                vec![Some(DeviceSpec::Cpu), cuda1, Some(DeviceSpec::Cpu)]
            );
            assert_eq!(s.workers.memory_budget_bytes(), Some(41 << 29));
            jail.set_env("KILN_WORKERS__DEVICES", "[\"cuda:0\", \"cuda:1\"]");
            jail.set_env("KILN_WORKERS__SLOTS", "2");
            let s = Settings::load(None, &FlagOverrides::default()).unwrap();
            assert_eq!(
                s.slot_devices(),
                vec![Some(DeviceSpec::Cuda(0)), cuda1],
                "set from the environment"
            );

            jail.clear_env();
            let refused = |toml: &str| {
                jail.create_file("bad.toml", toml).unwrap();
                Settings::load(Some(Path::new("bad.toml")), &FlagOverrides::default())
                    .unwrap_err()
                    .to_string()
            };
            let err = refused("[workers]\nslots = 1\ndevices = [\"cuda:0\", \"cuda:1\"]\n");
            assert!(
                err.contains("workers.devices lists 2 devices but workers.slots is 1")
                    && err.contains("set workers.slots = 2"),
                "{err}"
            );
            let err = refused("[workers]\nmemory_budget_gib = -4\n");
            assert!(
                err.contains("workers.memory_budget_gib must be a positive number of GiB"),
                "{err}"
            );
            let err = refused(
                "[workers]\ndevices = [\"cpu\"]\n\
                 [models.\"blackforestlabs/flux-2/flex/text-to-image\"]\n\
                 checkpoint = \"/m\"\ndevice = \"cpu\"\n",
            );
            assert!(
                err.contains("models.\"blackforestlabs/flux-2/flex/text-to-image\".device")
                    && err.contains("leave the models' device unset"),
                "{err}"
            );
            let err = refused("[workers]\ndevices = [\"gpu0\"]\n");
            assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn mistakes_are_named() {
        Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "bnd = \"127.0.0.1:1\"")?;
            let err = Settings::load(Some(Path::new("typo.toml")), &FlagOverrides::default())
                .unwrap_err();
            assert!(err.to_string().contains("bnd"), "{err}");
            jail.create_file("model.toml", "[models.\"flux/none\"]\ncheckpoint = \"/x\"")?;
            let err = Settings::load(Some(Path::new("model.toml")), &FlagOverrides::default())
                .unwrap_err();
            assert!(err.to_string().contains("flux/none"), "{err}");
            // A route's option set on the other route's table.
            jail.create_file(
                "raw.toml",
                "[models.\"blackforestlabs/flux-2/flex/text-to-image\"]\ncheckpoint = \"/x\"\nraw = { steps = 2 }",
            )?;
            let err = Settings::load(Some(Path::new("raw.toml")), &FlagOverrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("flex/text-to-image\".raw") && err.contains("FLUX 1.1 [pro] option"),
                "{err}"
            );
            jail.create_file(
                "expand.toml",
                "[models.\"blackforestlabs/flux-1-1-pro/text-to-image\"]\ncheckpoint = \"/x\"\nprompt_expansion = false",
            )?;
            let err = Settings::load(Some(Path::new("expand.toml")), &FlagOverrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(".prompt_expansion"), "{err}");
            let err = Settings::load(Some(Path::new("missing.toml")), &FlagOverrides::default())
                .unwrap_err();
            assert!(err.to_string().contains("missing.toml"), "{err}");
            jail.set_env("KILN_WORKERS__SLOTS", "many");
            let err = Settings::load(None, &FlagOverrides::default()).unwrap_err();
            assert!(
                err.to_string().to_lowercase().contains("workers.slots"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn stores_default_to_the_data_directory_and_take_urls_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.set_env("KILN_DATA_DIR", "/srv/kiln");
            let s = Settings::load(None, &FlagOverrides::default()).unwrap();
            assert_eq!(
                s.store_location().unwrap(),
                StoreLocation::Sqlite(PathBuf::from("/srv/kiln/kiln.db"))
            );
            assert_eq!(
                s.blob_location().unwrap(),
                BlobLocation::Directory(PathBuf::from("/srv/kiln/files"))
            );
            jail.set_env("KILN_STORE__URL", "postgres://kiln:pw@db.internal/kiln");
            jail.set_env("KILN_BLOBS__URL", "s3://images/kiln");
            let s = Settings::load(None, &FlagOverrides::default()).unwrap();
            assert_eq!(s.store_location().unwrap().kind(), "postgres");
            assert_eq!(s.blob_location().unwrap().to_string(), "s3://images/kiln");
            let printed = s.to_toml_redacted().unwrap();
            assert!(!printed.contains(":pw@"), "{printed}");
            assert!(printed.contains("[store]"), "{printed}");

            jail.set_env("KILN_STORE__URL", "mysql://db/kiln");
            let err = Settings::load(None, &FlagOverrides::default()).unwrap_err();
            assert!(err.to_string().contains("store.url"), "{err}");
            jail.set_env("KILN_STORE__URL", "sqlite:///tmp/k.db");
            jail.set_env("KILN_BLOBS__URL", "ftp://files/kiln");
            let err = Settings::load(None, &FlagOverrides::default()).unwrap_err();
            assert!(err.to_string().contains("blobs.url"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn route_tables_are_set_from_the_environment_by_alias() {
        Jail::expect_with(|jail| {
            jail.set_env("KILN_MODELS__FLUX_1_1_PRO__CHECKPOINT", "/models/dev");
            jail.set_env("KILN_MODELS__FLUX_1_1_PRO__RAW__STEPS", "40");
            jail.set_env("KILN_MODELS__FLUX_2_FLEX__CHECKPOINT", "/models/klein");
            jail.set_env("KILN_MODELS__FLUX_2_FLEX__STEPS", "6");
            let s = Settings::load(None, &FlagOverrides::default()).unwrap();
            let pro = s.models.flux11_pro.as_ref().unwrap();
            assert_eq!(pro.checkpoint, PathBuf::from("/models/dev"));
            assert_eq!(pro.raw.as_ref().and_then(|r| r.steps), Some(40));
            let flex = s.models.flux2_flex.as_ref().unwrap();
            assert_eq!(
                (flex.checkpoint.as_path(), flex.steps),
                (Path::new("/models/klein"), Some(6))
            );

            // The environment overrides one field of a table the file set.
            jail.create_file(
                "kiln.toml",
                "[models.\"blackforestlabs/flux-2/flex/text-to-image\"]\ncheckpoint = \"/file\"\nguidance = 2.0\n",
            )?;
            let s = Settings::load(None, &FlagOverrides::default()).unwrap();
            let flex = s.models.flux2_flex.as_ref().unwrap();
            assert_eq!(flex.checkpoint, PathBuf::from("/models/klein"));
            assert_eq!((flex.steps, flex.guidance), (Some(6), Some(2.0)));

            jail.set_env("KILN_MODELS__FLUX_3__CHECKPOINT", "/x");
            let err = Settings::load(None, &FlagOverrides::default()).unwrap_err();
            assert!(
                err.to_string().contains("flux_3"),
                "an unknown alias is named: {err}"
            );
            Ok(())
        });
    }

    #[test]
    fn the_printed_configuration_redacts_secrets_and_reads_back() {
        Jail::expect_with(|jail| {
            let secret = "ab".repeat(32);
            jail.set_env("KILN_SIGNING_KEY", &secret);
            jail.set_env("KILN_METRICS__TOKEN", "scrape-secret-1");
            jail.set_env("KILN_MODELS__FLUX_1_1_PRO__CHECKPOINT", "/models/dev");
            let s = Settings::load(None, &FlagOverrides::default()).unwrap();
            let text = s.to_toml_redacted().unwrap();
            assert!(!text.contains(&secret), "{text}");
            assert!(text.contains("signing_key = \"<redacted>\""), "{text}");
            assert!(!text.contains("scrape-secret-1"), "{text}");
            assert!(
                text.contains("[models.\"blackforestlabs/flux-1-1-pro/text-to-image\"]"),
                "{text}"
            );
            // What it prints is a configuration file kiln reads, to the same settings.
            jail.clear_env();
            jail.create_file(
                "printed.toml",
                &text.replace("<redacted>", &"cd".repeat(32)),
            )?;
            let back =
                Settings::load(Some(Path::new("printed.toml")), &FlagOverrides::default()).unwrap();
            assert_eq!(back.to_toml_redacted().unwrap(), text);
            Ok(())
        });
    }
}
