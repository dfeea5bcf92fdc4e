//! A running server per test, and helpers to drive it and the store behind it.

use kiln_api::auth::{hash_token, new_token, token_prefix};
use kiln_api::{serve, ApiSettings, AppState};
use kiln_blob::LocalBlobStore;
use kiln_core::blob::{Blob, BlobStore};
use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId, WorkerId};
use kiln_core::job::{JobOutput, OutputMetadata, Timings};
use kiln_core::params::{OutputFormat, OutputSize};
use kiln_core::store::{ClaimPolicy, JobStore, KeyStore, Lease};
use kiln_store::SqliteStore;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

pub const PRO: &str = "blackforestlabs/flux-1-1-pro/text-to-image";
pub const FLEX: &str = "blackforestlabs/flux-2/flex/text-to-image";
pub const EDIT: &str = "blackforestlabs/flux-2/flex/edit";
pub const SIGNING_KEY: &[u8] = b"integration-test signing key";

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Arc<SqliteStore>,
    pub blobs: Arc<LocalBlobStore>,
    pub state: AppState,
    /// Alice's token and key id: the caller unless a test says otherwise.
    pub token: String,
    pub owner: KeyId,
    _dir: TempDir,
}

/// A response's status and JSON body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    async fn read(response: reqwest::Response) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("a body");
        let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        Answer {
            status,
            headers,
            body,
        }
    }

    /// Asserts an error answer in the API's format and returns its body.
    pub fn error(&self, status: u16, code: u32) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        assert_eq!(self.body["error_code"], json!(code), "{}", self.body);
        assert!(
            self.body["error_message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            self.body
        );
        assert!(self.body["detail"].is_array(), "{}", self.body);
        &self.body
    }

    pub fn ok(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        &self.body
    }

    pub fn retry_after(&self) -> u64 {
        self.headers
            .get("retry-after")
            .expect("a Retry-After header")
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut ApiSettings)) -> Self {
        let dir = TempDir::new().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("kiln.db"))
                .await
                .unwrap(),
        );
        let blobs = Arc::new(LocalBlobStore::new(dir.path().join("blobs")).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let mut settings = ApiSettings::with_defaults(base.clone(), SIGNING_KEY.to_vec());
        configure(&mut settings);
        let state = AppState::new(store.clone(), store.clone(), blobs.clone(), settings);
        tokio::spawn(serve(listener, state.clone(), std::future::pending()));
        let mut server = TestServer {
            base,
            client: reqwest::Client::new(),
            store,
            blobs,
            state,
            token: String::new(),
            owner: KeyId::new(),
            _dir: dir,
        };
        (server.token, server.owner) = server.add_key("alice").await;
        server
    }

    /// A new API key: its token and id.
    pub async fn add_key(&self, name: &str) -> (String, KeyId) {
        let token = new_token();
        let key = self
            .store
            .insert_key(name, &hash_token(&token), &token_prefix(&token))
            .await
            .unwrap();
        (token, key.id)
    }

    /// Where the blob store keeps its files.
    pub fn blobs_root(&self) -> std::path::PathBuf {
        self._dir.path().join("blobs")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `method` on `url` (absolute, or a path), with `token` if any and a JSON body if any.
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Answer {
        let url = if url.starts_with("http") {
            url.to_string()
        } else {
            self.url(url)
        };
        let mut request = self.client.request(method, url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        Answer::read(request.send().await.unwrap()).await
    }

    /// GET with Alice's token.
    pub async fn get(&self, url: &str) -> Answer {
        self.call(Method::GET, url, Some(&self.token), None).await
    }

    /// POST with Alice's token.
    pub async fn post(&self, url: &str, body: Option<&Value>) -> Answer {
        self.call(Method::POST, url, Some(&self.token), body).await
    }

    pub async fn submit(&self, model: &str, input: Value) -> Answer {
        self.post(&format!("/v1/models/{model}"), Some(&input))
            .await
    }

    /// POSTs `body` as it is to `model` as Alice, with `content_type` if any.
    pub async fn submit_raw(
        &self,
        model: &str,
        body: &str,
        content_type: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url(&format!("/v1/models/{model}")))
            .bearer_auth(&self.token)
            .body(body.to_string());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().await.unwrap()
    }

    /// Submits a valid FLUX.2 request as Alice and returns its id.
    pub async fn submit_ok(&self) -> RequestId {
        let answer = self
            .submit(FLEX, json!({"prompt": "a red fox in snow"}))
            .await;
        answer.ok()["request_id"].as_str().unwrap().parse().unwrap()
    }

    pub async fn status_of(&self, id: RequestId) -> Answer {
        self.get(&format!("/v1/requests/{id}/status")).await
    }

    pub async fn result_of(&self, id: RequestId) -> Answer {
        self.get(&format!("/v1/requests/{id}/result")).await
    }

    /// Claims the next queued job as a worker would.
    pub async fn claim(&self) -> Lease {
        let policy = ClaimPolicy {
            lease: Duration::from_secs(300),
            max_attempts: 3,
        };
        self.store
            .claim(&WorkerId::new("test-worker"), &Route::ALL, policy)
            .await
            .unwrap()
            .expect("a queued job")
    }

    /// Completes a claimed job with one PNG "image" (any bytes do), as a worker would.
    pub async fn complete(&self, lease: &Lease, png: &[u8]) -> BlobKey {
        let key = BlobKey::random("png");
        let blob = Blob {
            bytes: png.to_vec(),
            content_type: "image/png".into(),
        };
        self.blobs.put(&key, blob).await.unwrap();
        let params = &lease.job.params;
        let OutputSize::Pixels(size) = params.size else {
            panic!("the harness completes text-to-image jobs only")
        };
        let metadata = OutputMetadata {
            model: lease.job.route,
            seed: params.seed,
            width: size.width,
            height: size.height,
            num_inference_steps: params.num_inference_steps.unwrap_or(28),
            guidance: params.guidance_scale,
            output_format: OutputFormat::Png,
            prompt: params.prompt.to_string(),
            timings_ms: Timings {
                queued: 5,
                inference: 1200,
                encode_and_store: 30,
            },
            engine: "test engine".into(),
            notes: vec!["made by the test harness".into()],
        };
        self.store
            .complete(
                lease,
                JobOutput {
                    images: vec![key.clone()],
                    metadata,
                },
            )
            .await
            .unwrap();
        key
    }
}

/// A file URL for `key` expiring at `expires`, signed as the server signs them.
pub fn signed_file_url(base: &str, key: &str, expires: i64) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SIGNING_KEY).unwrap();
    mac.update(format!("{key}\n{expires}").as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    format!("{base}/files/{key}?expires={expires}&sig={sig}")
}
