//! The caller-facing LLM client: one backend plus the retry policy and the total deadline.
//!
//! Invariants: an attempt is retried only when its error is retryable
//! ([`LlmError::is_retryable`]) *and* it passed no text to the caller's sink, so a user never sees
//! a duplicated beginning; the total timeout covers every attempt and every backoff sleep.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use tracing::warn;

use super::backend::{CompletionRequest, DeltaSink, LlmBackend, LlmError};

/// The longest single backoff sleep, whatever the attempt number.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Timeouts and retry policy of an [`LlmClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmClientSettings {
    /// From sending a request to the model's first text, reasoning included (per attempt).
    /// Catches a hung or overloaded server long before the total timeout.
    pub first_token_timeout: Duration,
    /// The whole call, all attempts and backoff included; the user is waiting.
    pub total_timeout: Duration,
    /// Extra attempts after the first (0 disables retrying).
    pub max_retries: u32,
    /// The backoff unit: attempt `n` sleeps a uniformly random time in
    /// `0..=retry_base_delay * 2^(n-1)` ("full jitter"), capped at 30 s, so many sessions hitting
    /// a recovering server do not retry in lockstep.
    pub retry_base_delay: Duration,
}

impl Default for LlmClientSettings {
    /// 30 s to the first token, 120 s in total, 2 retries from a 500 ms base.
    fn default() -> Self {
        Self {
            first_token_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(120),
            max_retries: 2,
            retry_base_delay: Duration::from_millis(500),
        }
    }
}

/// One LLM backend with retries and deadlines. Cheap to clone (one `Arc` inside), so every
/// session or actor can hold its own handle.
#[derive(Clone)]
pub struct LlmClient {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn LlmBackend>,
    settings: LlmClientSettings,
}

impl std::fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field("backend", &self.inner.backend.name())
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl LlmClient {
    /// A client over `backend` with the given policy.
    pub fn new(backend: Arc<dyn LlmBackend>, settings: LlmClientSettings) -> Self {
        Self { inner: Arc::new(Inner { backend, settings }) }
    }

    /// The backend's short name, for logs and metrics.
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// The backend's start-up probe (see [`LlmBackend::probe`]).
    pub fn probe(&self) -> Option<yizhan_channel_core::BoxFuture<'_, Result<(), LlmError>>> {
        self.inner.backend.probe()
    }

    /// The policy in use.
    pub fn settings(&self) -> &LlmClientSettings {
        &self.inner.settings
    }

    /// Produces the whole answer (trimmed, reasoning removed), passing visible pieces to
    /// `on_delta` as they arrive, and an empty piece whenever the model is at work on what is
    /// not shown (reasoning): a sink that shows text should skip those.
    ///
    /// Fails with [`LlmError::TotalTimeout`] when the whole call, retries included, exceeds
    /// `total_timeout`; otherwise with the last attempt's error.
    pub async fn complete(&self, request: &CompletionRequest, on_delta: &mut DeltaSink) -> Result<String, LlmError> {
        let deadline = tokio::time::Instant::now() + self.inner.settings.total_timeout;
        self.complete_by(deadline, request, on_delta).await
    }

    /// [`LlmClient::complete`], ended at `deadline` instead of `total_timeout` from now: the
    /// total timeout of a question that waited for a slot counts from when it was asked.
    pub async fn complete_by(
        &self,
        deadline: tokio::time::Instant,
        request: &CompletionRequest,
        on_delta: &mut DeltaSink,
    ) -> Result<String, LlmError> {
        let total = self.inner.settings.total_timeout;
        // Whether the model produced anything, reasoning included: a call cut by the total
        // timeout after that is a long answer, not a server that failed (see the breaker).
        let progressed = Arc::new(AtomicBool::new(false));
        let call = self.complete_with_retries(request, on_delta, &progressed, deadline);
        match tokio::time::timeout_at(deadline, call).await {
            Ok(result) => result,
            Err(_elapsed) => Err(LlmError::TotalTimeout { after: total, started: progressed.load(Ordering::SeqCst) }),
        }
    }

    async fn complete_with_retries(
        &self,
        request: &CompletionRequest,
        on_delta: &mut DeltaSink,
        progressed: &Arc<AtomicBool>,
        deadline: tokio::time::Instant,
    ) -> Result<String, LlmError> {
        let settings = &self.inner.settings;
        let backend = self.inner.backend.name();
        // The caller's sink is lent to each attempt through a tracking wrapper; the guard puts it
        // back when this future ends, however it ends (even when cancelled by the timeout).
        let guard = SinkLoan::new(on_delta, Arc::clone(progressed));
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let (mut sink, delivered) = guard.tracking_sink();
            let result = self.inner.backend.complete(request, settings.first_token_timeout, &mut sink).await;
            drop(sink);
            let error = match result {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            let retry = error.is_retryable()
                && self.inner.backend.may_repeat(&error)
                && !delivered.load(Ordering::SeqCst)
                && attempt <= settings.max_retries;
            if !retry {
                return Err(error);
            }
            let mut delay = backoff_delay(settings.retry_base_delay, attempt);
            if let LlmError::Status { retry_after: Some(asked), .. } = &error {
                // A server that asked for a pause is not asked again sooner.
                delay = delay.max(*asked);
            }
            // A pause that outlasts the time left would only end in the total timeout: the user
            // hears now, and the log and metrics name the failure instead of a timeout.
            if tokio::time::Instant::now().checked_add(delay).is_none_or(|resumed| resumed >= deadline) {
                return Err(error);
            }
            warn!(backend, attempt, error = %error, ?delay, "LLM attempt failed; retrying.");
            tokio::time::sleep(delay).await;
        }
    }
}

/// Lends the caller's `&mut DeltaSink` to `'static` tracking wrappers and returns it on drop.
///
/// `DeltaSink` is a `'static` boxed closure, so a wrapper cannot borrow the caller's sink; the sink
/// is moved into shared storage for the duration of the call instead.
struct SinkLoan<'a> {
    slot: &'a mut DeltaSink,
    shared: Arc<Mutex<DeltaSink>>,
    /// Set once any attempt passed text on, or said that the model is producing something not
    /// shown (reasoning: an empty piece, see `VisibleAnswer::progressed`).
    progressed: Arc<AtomicBool>,
}

impl<'a> SinkLoan<'a> {
    fn new(slot: &'a mut DeltaSink, progressed: Arc<AtomicBool>) -> Self {
        let sink = std::mem::replace(slot, Box::new(|_: &str| {}));
        Self { slot, shared: Arc::new(Mutex::new(sink)), progressed }
    }

    /// A sink for one attempt, and a flag that turns true once it passed any text on. An empty
    /// piece only says the model is at work (reasoning); it is passed on as it is, for a caller
    /// that waits for the answer to begin (the breaker's probe), and never counts as text.
    fn tracking_sink(&self) -> (DeltaSink, Arc<AtomicBool>) {
        let delivered = Arc::new(AtomicBool::new(false));
        let (flag, progressed) = (Arc::clone(&delivered), Arc::clone(&self.progressed));
        let shared = Arc::clone(&self.shared);
        let sink: DeltaSink = Box::new(move |piece: &str| {
            progressed.store(true, Ordering::SeqCst);
            if !piece.is_empty() {
                flag.store(true, Ordering::SeqCst);
            }
            // NOTE: the lock is held only for this synchronous call, never across an await; a
            // poisoned lock (a panicking sink) still holds a usable sink.
            let mut sink = shared.lock().unwrap_or_else(PoisonError::into_inner);
            (*sink)(piece);
        });
        (sink, delivered)
    }
}

impl Drop for SinkLoan<'_> {
    fn drop(&mut self) {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        *self.slot = std::mem::replace(&mut *shared, Box::new(|_: &str| {}));
    }
}

/// Full-jitter exponential backoff before retry number `attempt` (1-based).
fn backoff_delay(base: Duration, attempt: u32) -> Duration {
    let ceiling_ms = u64::try_from(backoff_ceiling(base, attempt).as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=ceiling_ms))
}

/// The longest wait before retry `attempt`: `base` doubled per attempt, capped.
fn backoff_ceiling(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(MAX_RETRY_DELAY)
}

/// Builds the one HTTP client all LLM backends share.
///
/// No request timeout is set on purpose: answers stream for a long time, and
/// [`LlmClient`]'s first-token and total deadlines bound each call instead. The pool keeps plenty
/// of idle connections per host because one server usually takes every request.
///
/// # Errors
///
/// When reqwest cannot build the client (in practice only if the TLS backend fails to start).
pub fn try_build_http_client(connect_timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_max_idle_per_host(64)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_keepalive(Duration::from_secs(60))
        .tcp_nodelay(true)
        .user_agent(concat!("yizhan/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Like [`try_build_http_client`], falling back to reqwest's defaults (with a warning) if the
/// tuned client cannot be built.
///
/// # Panics
///
/// Only if even `reqwest::Client::new()` fails, i.e. the TLS backend cannot be initialised at
/// all; this happens at start-up, never on input.
pub fn build_http_client(connect_timeout: Duration) -> reqwest::Client {
    match try_build_http_client(connect_timeout) {
        Ok(client) => client,
        Err(error) => {
            warn!(error = %error, "Failed to build the tuned LLM HTTP client; using defaults.");
            reqwest::Client::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::backend::{ChatMessage, Role};
    use std::sync::atomic::AtomicU32;
    use yizhan_channel_core::BoxFuture;

    /// A backend that plays a script of outcomes, one per attempt.
    struct Scripted {
        calls: AtomicU32,
        script: Vec<Script>,
    }

    #[derive(Clone)]
    enum Script {
        Fail(fn() -> LlmError),
        DeltaThenFail(fn() -> LlmError),
        Answer(&'static str),
        Hang,
        DeltaThenHang,
        /// Reasoning (an empty piece: the model at work, nothing shown), then nothing more.
        ThinkThenHang,
    }

    impl LlmBackend for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }

        fn complete<'a>(
            &'a self,
            _request: &'a CompletionRequest,
            _first_token_timeout: Duration,
            on_delta: &'a mut DeltaSink,
        ) -> BoxFuture<'a, Result<String, LlmError>> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) as usize;
            let step = self.script.get(call).cloned().unwrap_or(Script::Hang);
            Box::pin(async move {
                match step {
                    Script::Fail(error) => Err(error()),
                    Script::DeltaThenFail(error) => {
                        on_delta("partial");
                        Err(error())
                    }
                    Script::Answer(text) => {
                        on_delta(text);
                        Ok(text.to_owned())
                    }
                    Script::Hang => std::future::pending().await,
                    Script::DeltaThenHang => {
                        on_delta("partial");
                        std::future::pending().await
                    }
                    Script::ThinkThenHang => {
                        on_delta("");
                        std::future::pending().await
                    }
                }
            })
        }
    }

    fn client(script: Vec<Script>, settings: LlmClientSettings) -> (LlmClient, Arc<Scripted>) {
        let backend = Arc::new(Scripted { calls: AtomicU32::new(0), script });
        (LlmClient::new(backend.clone(), settings), backend)
    }

    fn fast_settings() -> LlmClientSettings {
        LlmClientSettings {
            first_token_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(10),
            max_retries: 2,
            retry_base_delay: Duration::from_millis(100),
        }
    }

    fn request() -> CompletionRequest {
        CompletionRequest {
            messages: vec![ChatMessage::new(Role::User, "hi")],
            user: "test:u1".into(),
            channel_kind: "test".into(),
        }
    }

    fn recorder() -> (DeltaSink, Arc<Mutex<String>>) {
        let seen = Arc::new(Mutex::new(String::new()));
        let sink_seen = Arc::clone(&seen);
        let sink: DeltaSink = Box::new(move |piece| {
            sink_seen.lock().unwrap_or_else(PoisonError::into_inner).push_str(piece);
        });
        (sink, seen)
    }

    fn server_error() -> LlmError {
        LlmError::Status { status: 503, message: "busy".into(), retry_after: None }
    }

    fn bad_request() -> LlmError {
        LlmError::Status { status: 400, message: "bad".into(), retry_after: None }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retryable_failure_is_retried_until_an_answer_arrives() {
        let (client, backend) =
            client(vec![Script::Fail(server_error), Script::Fail(server_error), Script::Answer("ok")], fast_settings());
        let (mut sink, seen) = recorder();
        let answer = client.complete(&request(), &mut sink).await;
        assert_eq!(answer.ok().as_deref(), Some("ok"));
        assert_eq!(backend.calls.load(Ordering::SeqCst), 3);
        // The caller's sink is back in place and received the text once.
        sink("!");
        assert_eq!(seen.lock().unwrap_or_else(PoisonError::into_inner).as_str(), "ok!");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_at_least_as_long_as_the_server_asked() {
        fn rate_limited() -> LlmError {
            LlmError::Status { status: 429, message: "slow down".into(), retry_after: Some(Duration::from_secs(2)) }
        }
        let (client, backend) = client(vec![Script::Fail(rate_limited), Script::Answer("ok")], fast_settings());
        let (mut sink, _) = recorder();
        let started = tokio::time::Instant::now();
        let answer = client.complete(&request(), &mut sink).await;
        assert_eq!(answer.ok().as_deref(), Some("ok"));
        assert_eq!(backend.calls.load(Ordering::SeqCst), 2);
        // Paused time: this is the virtual clock, not a real wait.
        assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    }

    /// The backoff before the next try would reach past the total timeout: the failure is told
    /// at once, as itself, and not as that timeout once the wait is cut short.
    #[tokio::test(start_paused = true)]
    async fn a_retry_that_cannot_begin_before_the_total_timeout_is_not_waited_for() {
        let settings = LlmClientSettings {
            retry_base_delay: Duration::from_secs(3_600),
            total_timeout: Duration::from_secs(1),
            ..fast_settings()
        };
        // The first backoff draws from 0..=30 s (the cap); each draw lands past the 1 s left
        // with a chance of 29 in 30.
        for _ in 0..20 {
            let (client, backend) = client(vec![Script::Fail(server_error), Script::Answer("ok")], settings.clone());
            let (mut sink, _) = recorder();
            let started = tokio::time::Instant::now();
            let result = client.complete(&request(), &mut sink).await;
            match result {
                Err(LlmError::Status { status: 503, .. }) => {
                    assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
                    assert_eq!(started.elapsed(), Duration::ZERO, "waited for a retry that could not come");
                    return;
                }
                Ok(answer) => assert_eq!(answer, "ok", "a short draw is retried"),
                Err(other) => panic!("not the failure itself: {other:?}"),
            }
        }
        panic!("twenty backoffs of 0..=30 s all under 1 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_retryable_failure_is_returned_at_once() {
        let (client, backend) = client(vec![Script::Fail(bad_request), Script::Answer("ok")], fast_settings());
        let (mut sink, _) = recorder();
        let result = client.complete(&request(), &mut sink).await;
        assert!(matches!(result, Err(LlmError::Status { status: 400, .. })));
        assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_after_visible_text_is_never_retried() {
        let (client, backend) =
            client(vec![Script::DeltaThenFail(server_error), Script::Answer("ok")], fast_settings());
        let (mut sink, seen) = recorder();
        let result = client.complete(&request(), &mut sink).await;
        assert!(matches!(result, Err(LlmError::Status { status: 503, .. })));
        assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
        assert_eq!(seen.lock().unwrap_or_else(PoisonError::into_inner).as_str(), "partial");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_after_max_retries() {
        let script = vec![Script::Fail(server_error); 5];
        let (client, backend) = client(script, fast_settings());
        let (mut sink, _) = recorder();
        let result = client.complete(&request(), &mut sink).await;
        assert!(matches!(result, Err(LlmError::Status { status: 503, .. })));
        assert_eq!(backend.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_backend_ends_in_a_total_timeout_and_the_sink_is_returned() {
        let (client, _) = client(vec![Script::Hang], fast_settings());
        let (mut sink, seen) = recorder();
        let result = client.complete(&request(), &mut sink).await;
        assert!(
            matches!(result, Err(LlmError::TotalTimeout { after, started: false }) if after == Duration::from_secs(10))
        );
        sink("still mine");
        assert_eq!(seen.lock().unwrap_or_else(PoisonError::into_inner).as_str(), "still mine");
    }

    /// A steady stream cut by the total timeout says so (`started`): the server works, the
    /// answer (or its reasoning) is only long, and the circuit breaker must not count it.
    #[tokio::test(start_paused = true)]
    async fn a_total_timeout_says_whether_any_of_the_answer_had_been_shown() {
        let (streaming, _) = client(vec![Script::DeltaThenHang], fast_settings());
        let (mut sink, seen) = recorder();
        let result = streaming.complete(&request(), &mut sink).await;
        assert!(matches!(result, Err(LlmError::TotalTimeout { started: true, .. })), "{result:?}");
        assert_eq!(seen.lock().unwrap_or_else(PoisonError::into_inner).as_str(), "partial");
        // Reasoning longer than the total timeout: the model was answering (nothing was shown:
        // the caller's sink had only the empty piece that says so).
        let (thinking, _) = client(vec![Script::ThinkThenHang], fast_settings());
        let (mut sink, seen) = recorder();
        let result = thinking.complete(&request(), &mut sink).await;
        assert!(matches!(result, Err(LlmError::TotalTimeout { started: true, .. })), "{result:?}");
        assert_eq!(seen.lock().unwrap_or_else(PoisonError::into_inner).as_str(), "");
    }

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let base = Duration::from_millis(100);
        assert_eq!(backoff_ceiling(base, 1), Duration::from_millis(100));
        assert_eq!(backoff_ceiling(base, 3), Duration::from_millis(400));
        assert_eq!(backoff_ceiling(base, 40), MAX_RETRY_DELAY);
        for attempt in [1, 3, 40] {
            for _ in 0..50 {
                assert!(backoff_delay(base, attempt) <= backoff_ceiling(base, attempt));
            }
        }
    }

    #[test]
    fn the_http_client_builds() {
        assert!(try_build_http_client(Duration::from_secs(3)).is_ok());
    }
}
