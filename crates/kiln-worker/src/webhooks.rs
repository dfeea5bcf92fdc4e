//! The webhook dispatcher: delivers the announcements the store's outbox holds.
//!
//! The store writes a delivery in the same transaction as a job's terminal state; any node may
//! run a dispatcher, and several may run at once: a delivery is attempted only by the one that
//! claimed it ([`JobStore::claim_webhooks`]), and a claim that runs out (its dispatcher died)
//! is taken again. Everything a delivery needs across attempts is in the store, so deliveries
//! survive restarts; the `webhook-id` is derived from the request id ([`message_id`]), so it is
//! the same on every attempt whoever makes it.
//!
//! One attempt is one signed POST (Standard Webhooks: `webhook-id`, `webhook-timestamp`,
//! `webhook-signature`) through the guarded client ([`crate::guard`]): public addresses only
//! unless the allow list opens others, redirects not followed (a 3xx is a failed attempt).
//! A 2xx within [`WebhookSettings::attempt_timeout`] delivers it; anything else is retried
//! with exponential backoff until [`WebhookSettings::retry_for`] after the job ended.
//!
//! What an attempt records is the receiver's status or a short fixed reason ([`Reason`]) that
//! says nothing of the network behind the dispatcher (the record is shown to the client);
//! what happened goes to the log with the request id.

use crate::allow::AllowList;
use crate::guard::{self, Redirects};
use kiln_core::ids::RequestId;
use kiln_core::report::Chain;
use kiln_core::store::{JobEvents, JobNotice, JobStore, StoreError};
use kiln_core::webhook::{
    message_id, sign, webhook_secret, AfterAttempt, AttemptOutcome, WebhookAttempt,
    WebhookDelivery, WebhookMessages,
};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How webhooks are delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSettings {
    /// How long after the job ended a delivery is still attempted (`webhooks.retry_hours`).
    pub retry_for: Duration,
    /// The most one attempt may take, connecting included: a 2xx later than this is a failure.
    pub attempt_timeout: Duration,
    /// How often the outbox is read when no event says a job ended: retries come due this way,
    /// and so do deliveries of jobs that ended in another process.
    pub poll_interval: Duration,
    /// How long a claimed delivery is this dispatcher's alone; longer than an attempt, so it
    /// is never taken over while being attempted.
    pub claim_for: Duration,
    /// The wait before the first retry; each later one waits twice the one before.
    pub first_retry: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// Attempts made at once.
    pub concurrency: usize,
    /// Address blocks and host names that may be reached although not public. Empty: public
    /// addresses only.
    pub allow: AllowList,
}

impl WebhookSettings {
    /// Deliveries retried for `retry_for`, each attempt at most `attempt_timeout`, reaching
    /// what `allow` opens besides public addresses; the rest as [`Default`] has it, the claim
    /// fitted to the attempt.
    pub fn new(retry_for: Duration, attempt_timeout: Duration, allow: AllowList) -> Self {
        Self {
            retry_for,
            attempt_timeout,
            // Room for the body to be written and the attempt recorded after the POST.
            claim_for: attempt_timeout + Duration::from_secs(20),
            allow,
            ..Self::default()
        }
    }
}

impl Default for WebhookSettings {
    /// The API contract's: 24 hours of retries, 10 s an attempt, public addresses only.
    fn default() -> Self {
        Self {
            retry_for: Duration::from_secs(24 * 3600),
            attempt_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            claim_for: Duration::from_secs(30),
            first_retry: Duration::from_secs(2),
            max_backoff: Duration::from_secs(3600),
            concurrency: 16,
            allow: AllowList::default(),
        }
    }
}

/// Why an attempt got no status, as the record (and so the client) shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    CouldNotConnect,
    TimedOut(Duration),
    NotPublic,
    /// Connected, but no HTTP answer came back (reset, a protocol error, a bad certificate).
    NoAnswer,
    /// The request's record expired before the announcement could be written.
    RecordExpired,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::CouldNotConnect => write!(f, "could not connect"),
            Reason::TimedOut(after) => write!(f, "timed out after {} s", after.as_secs_f32()),
            Reason::NotPublic => write!(f, "not a public address"),
            Reason::NoAnswer => write!(f, "no HTTP answer"),
            Reason::RecordExpired => write!(f, "the request's record has expired"),
        }
    }
}

/// What one dispatcher shares between its attempts.
struct Dispatcher {
    jobs: Arc<dyn JobStore>,
    messages: Arc<dyn WebhookMessages>,
    signing_key: Vec<u8>,
    settings: WebhookSettings,
    client: reqwest::Client,
}

/// Delivers due webhooks until `shutdown`: claims them when a job ends (an event) or every
/// `poll_interval`, attempts up to `concurrency` at once and records each attempt. On shutdown
/// it claims no more and gives the attempts under way up to `attempt_timeout` to finish.
pub async fn run_dispatcher(
    jobs: Arc<dyn JobStore>,
    messages: Arc<dyn WebhookMessages>,
    signing_key: Vec<u8>,
    settings: WebhookSettings,
    shutdown: CancellationToken,
) {
    let mut events = jobs.subscribe();
    let dispatcher = Arc::new(Dispatcher {
        client: guard::client(settings.allow.clone(), Redirects::Never),
        jobs,
        messages,
        signing_key,
        settings,
    });
    let slots = Arc::new(Semaphore::new(dispatcher.settings.concurrency.max(1)));
    let mut attempts = JoinSet::new();
    while !shutdown.is_cancelled() {
        let claimed = dispatcher.claim_into(&slots, &mut attempts).await;
        // A full batch may have left more due: ask again as soon as a slot frees.
        let more_due = claimed > 0 && slots.available_permits() == 0;
        let wait = Wait {
            events: &mut events,
            attempts: &mut attempts,
            more_due,
            shutdown: &shutdown,
        };
        wait.until_work(dispatcher.settings.poll_interval).await;
    }
    drain(&mut attempts, dispatcher.settings.attempt_timeout).await;
}

impl Dispatcher {
    /// Claims as many due deliveries as there are free slots and starts an attempt at each;
    /// returns how many. A store error is logged: the next round asks again.
    async fn claim_into(
        self: &Arc<Self>,
        slots: &Arc<Semaphore>,
        attempts: &mut JoinSet<()>,
    ) -> usize {
        let free = slots.available_permits();
        if free == 0 {
            return 0;
        }
        let limit = u32::try_from(free).unwrap_or(u32::MAX);
        let deliveries = match self
            .jobs
            .claim_webhooks(limit, self.settings.claim_for)
            .await
        {
            Ok(deliveries) => deliveries,
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "claiming webhook deliveries");
                return 0;
            }
        };
        let claimed = deliveries.len();
        for delivery in deliveries {
            let slot = slots
                .clone()
                .try_acquire_owned()
                .expect("claimed no more than were free");
            let dispatcher = self.clone();
            attempts.spawn(async move {
                dispatcher.attempt(delivery).await;
                drop(slot);
            });
        }
        claimed
    }

    /// One attempt at `delivery`, recorded with what follows it.
    async fn attempt(&self, delivery: WebhookDelivery) {
        let at = OffsetDateTime::now_utc();
        let request = delivery.request;
        let body = match self.messages.body(&delivery).await {
            Ok(body) => body,
            Err(e) => {
                // Nothing was attempted: the claim runs out and the delivery is taken again.
                tracing::warn!(request_id = %request, error = %Chain(&e), "writing a webhook's body");
                return;
            }
        };
        let (outcome, next) = match body {
            Some(body) => {
                let outcome = self.post(&delivery, body).await;
                let next = self.after(&delivery, &outcome);
                (outcome, next)
            }
            None => {
                let outcome = AttemptOutcome::Error(Reason::RecordExpired.to_string());
                (outcome, AfterAttempt::GiveUp)
            }
        };
        tracing::info!(request_id = %request, url = %delivery.url, ?outcome, ?next, "webhook attempt");
        let attempt = WebhookAttempt { at, outcome };
        match self
            .jobs
            .record_webhook_attempt(&delivery, attempt, next)
            .await
        {
            Ok(()) => {}
            Err(StoreError::LeaseLost(_)) => {
                tracing::info!(request_id = %request, "webhook claim taken over meanwhile; attempt not recorded");
            }
            Err(e) => {
                // The claim runs out and the delivery is attempted again (receivers deduplicate
                // by webhook-id).
                tracing::warn!(request_id = %request, error = %Chain(&e), "recording a webhook attempt");
            }
        }
    }

    /// POSTs `body`, signed, to the delivery's URL: the receiver's status, or why there is none.
    async fn post(&self, delivery: &WebhookDelivery, body: Vec<u8>) -> AttemptOutcome {
        let url = match reqwest::Url::parse(delivery.url.as_str()) {
            Ok(url) => url,
            // WebhookUrl was parsed by the same parser at submit.
            Err(e) => return self.failed(delivery.request, Reason::CouldNotConnect, &e),
        };
        if let Err(refused) = guard::check_url(&url, &self.settings.allow) {
            let reason = if refused.not_public {
                Reason::NotPublic
            } else {
                Reason::CouldNotConnect
            };
            return self.failed(delivery.request, reason, &*refused.detail);
        }
        let id = message_id(delivery.request);
        let timestamp = OffsetDateTime::now_utc().unix_timestamp();
        let secret = webhook_secret(&self.signing_key, delivery.owner);
        let signature = sign(&secret, &id, timestamp, &body);
        let request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .timeout(self.settings.attempt_timeout)
            .body(body);
        // reqwest's timeout covers the answer's head; the outer one bounds everything else.
        let answer = tokio::time::timeout(self.settings.attempt_timeout, request.send()).await;
        let timed_out = Reason::TimedOut(self.settings.attempt_timeout);
        match answer {
            // The body of the answer is not read: only the status counts.
            Ok(Ok(response)) => AttemptOutcome::Status(response.status().as_u16()),
            Ok(Err(e)) => self.failed(delivery.request, reason_of(&e, timed_out), &e),
            Err(elapsed) => self.failed(delivery.request, timed_out, &elapsed),
        }
    }

    /// `reason` as the recorded outcome, after logging what happened.
    fn failed(
        &self,
        request: RequestId,
        reason: Reason,
        detail: &(dyn std::error::Error + 'static),
    ) -> AttemptOutcome {
        tracing::info!(request_id = %request, %reason, detail = %Chain(detail), "webhook not answered");
        AttemptOutcome::Error(reason.to_string())
    }

    /// What follows `outcome`: delivered on a 2xx; else another attempt after the backoff,
    /// unless the delivery's time is up (one last attempt is made at the deadline itself).
    fn after(&self, delivery: &WebhookDelivery, outcome: &AttemptOutcome) -> AfterAttempt {
        if matches!(outcome, AttemptOutcome::Status(status) if (200..300).contains(status)) {
            return AfterAttempt::Delivered;
        }
        let deadline = delivery.created_at + self.settings.retry_for;
        let left = deadline - OffsetDateTime::now_utc();
        if left <= time::Duration::ZERO {
            return AfterAttempt::GiveUp;
        }
        let made = delivery.attempts.len() + 1;
        let wait = backoff(&self.settings, delivery.request, made);
        AfterAttempt::RetryIn(wait.min(left.unsigned_abs()))
    }
}

/// The wait after the `made`-th failed attempt: `first_retry` doubled for each attempt before
/// it, at most `max_backoff`, plus up to a tenth more so that receivers that failed together
/// (an outage) are not all retried in the same instant. The extra is drawn from the request
/// id (random bits) and the attempt, so it differs between deliveries without a random source.
fn backoff(settings: &WebhookSettings, request: RequestId, made: usize) -> Duration {
    let doublings = u32::try_from(made.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(30);
    let wait = settings
        .first_retry
        .saturating_mul(1 << doublings)
        .min(settings.max_backoff);
    let bits =
        request.as_uuid().as_u128() as u64 ^ (made as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let tenths_of_mille = (bits.wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 32) % 1000;
    wait + wait.mul_f64(tenths_of_mille as f64 / 10_000.0)
}

/// The fixed reason for a request that failed with `error`.
fn reason_of(error: &reqwest::Error, timed_out: Reason) -> Reason {
    if guard::refused_by_guard(error) {
        Reason::NotPublic
    } else if error.is_timeout() {
        timed_out
    } else if error.is_connect() {
        Reason::CouldNotConnect
    } else {
        Reason::NoAnswer
    }
}

/// What the dispatcher waits on between two claims.
struct Wait<'a> {
    events: &'a mut JobEvents,
    attempts: &'a mut JoinSet<()>,
    more_due: bool,
    shutdown: &'a CancellationToken,
}

impl Wait<'_> {
    /// Returns when there may be work: a job ended (its delivery may be due now), events were
    /// missed, `poll_interval` passed (retries come due), a slot freed while more were due, or
    /// shutdown. Other events (submits, progress) are passed over without restarting the wait.
    async fn until_work(self, poll_interval: Duration) {
        let deadline = Instant::now() + poll_interval;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => return,
                notice = self.events.recv() => match notice {
                    Some(JobNotice::Event(event)) if !event.state.is_terminal() => continue,
                    Some(_) => return,
                    // The store is gone: only the poll is left.
                    None => {
                        tokio::select! {
                            () = self.shutdown.cancelled() => {}
                            () = tokio::time::sleep_until(deadline) => {}
                        }
                        return;
                    }
                },
                Some(joined) = self.attempts.join_next(), if !self.attempts.is_empty() => {
                    if let Err(e) = joined {
                        if e.is_panic() {
                            tracing::error!(error = %e, "a webhook attempt panicked");
                        }
                    }
                    if self.more_due {
                        return;
                    }
                }
            }
        }
    }
}

/// Waits for the attempts under way, each bounded by `attempt_timeout` already; what is left
/// after that and a little more (recording) is abandoned: its claim runs out and it is retried.
async fn drain(attempts: &mut JoinSet<()>, attempt_timeout: Duration) {
    let grace = attempt_timeout + Duration::from_secs(5);
    let all_done = async { while attempts.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_done).await.is_err() {
        tracing::warn!(
            left = attempts.len(),
            "webhook attempts still under way at shutdown abandoned"
        );
        attempts.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_first_retry_up_to_the_cap_with_a_little_jitter() {
        let settings = WebhookSettings::default();
        let request = RequestId::new();
        for (made, base) in [(1, 2), (2, 4), (3, 8), (11, 2048), (12, 3600), (40, 3600)] {
            let wait = backoff(&settings, request, made);
            let base = Duration::from_secs(base);
            assert!(
                wait >= base && wait <= base.mul_f64(1.1),
                "{made}: {wait:?}"
            );
        }
    }

    #[test]
    fn reasons_say_nothing_of_the_network() {
        assert_eq!(
            Reason::TimedOut(Duration::from_secs(10)).to_string(),
            "timed out after 10 s"
        );
        assert_eq!(Reason::NotPublic.to_string(), "not a public address");
        assert_eq!(Reason::CouldNotConnect.to_string(), "could not connect");
    }
}
