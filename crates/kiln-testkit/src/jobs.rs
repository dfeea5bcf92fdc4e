//! Jobs and outputs for store tests: the same few builders every store test needs.

use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId};
use kiln_core::job::{JobOutput, NewJob, OutputMetadata, Preview, Progress, StepReport, Timings};
use kiln_core::params::{
    GenerationParams, ImageSize, OutputFormat, OutputSize, Prompt, RouteOptions,
};
use kiln_core::webhook::WebhookUrl;
use kiln_core::OffsetDateTime;
use std::time::Duration;

/// The route [`new_job`] submits to.
pub const ROUTE: Route = Route::Flux11ProTextToImage;

/// Valid parameters for `prompt` on [`ROUTE`]: 1024x768 JPEG, seed 7, not raw.
pub fn params(prompt: &str) -> GenerationParams {
    GenerationParams {
        prompt: Prompt::parse(prompt, 100).unwrap(),
        size: OutputSize::Pixels(ImageSize {
            width: 1024,
            height: 768,
        }),
        seed: 7,
        num_inference_steps: None,
        guidance_scale: None,
        output_format: OutputFormat::Jpeg,
        options: options_on(ROUTE),
        reference_images: Vec::new(),
    }
}

/// `route`'s options, every flag off.
pub fn options_on(route: Route) -> RouteOptions {
    match route {
        Route::Flux11ProTextToImage => RouteOptions::Flux11Pro { raw: false },
        Route::Flux2FlexTextToImage | Route::Flux2FlexEdit => RouteOptions::Flux2Flex {
            enable_prompt_expansion: false,
        },
    }
}

/// A job of `owner` on [`ROUTE`], kept an hour after it ends.
pub fn new_job(owner: KeyId, prompt: &str) -> NewJob {
    new_job_on(ROUTE, owner, prompt)
}

/// A job of `owner` on `route`, kept an hour after it ends.
pub fn new_job_on(route: Route, owner: KeyId, prompt: &str) -> NewJob {
    let now = OffsetDateTime::now_utc();
    NewJob {
        id: RequestId::new(),
        owner,
        route,
        params: GenerationParams {
            options: options_on(route),
            ..params(prompt)
        },
        created_at: now,
        expires_at: now + Duration::from_secs(3600),
        webhook: None,
    }
}

/// Where [`new_job_with_webhook`]'s jobs announce their end (nothing listens there).
pub const WEBHOOK: &str = "https://hooks.example.com/kiln";

/// A job of `owner` on [`ROUTE`] that names the webhook [`WEBHOOK`].
pub fn new_job_with_webhook(owner: KeyId, prompt: &str) -> NewJob {
    NewJob {
        webhook: Some(WebhookUrl::parse(WEBHOOK).unwrap()),
        ..new_job(owner, prompt)
    }
}

/// A heartbeat's report of `progress` alone.
pub fn progressed(progress: Progress) -> StepReport {
    StepReport {
        progress: Some(progress),
        preview: None,
    }
}

/// A heartbeat's report of step `step` of `total` with the preview `key` of that step.
pub fn previewed(step: u32, total: u32, key: BlobKey) -> StepReport {
    StepReport {
        progress: Some(Progress { step, total }),
        preview: Some(Preview { key, step }),
    }
}

/// A succeeded job's output with `images`.
pub fn output(images: Vec<BlobKey>) -> JobOutput {
    JobOutput {
        images,
        metadata: OutputMetadata {
            model: ROUTE,
            seed: 7,
            width: 1024,
            height: 768,
            num_inference_steps: 4,
            guidance: None,
            output_format: OutputFormat::Jpeg,
            prompt: "p".into(),
            timings_ms: Timings {
                queued: 1,
                inference: 2,
                encode_and_store: 3,
            },
            engine: "test".into(),
            notes: vec![],
        },
    }
}
