//! Asking the model: backends (`openai`, `lobehub`), the retrying client, and [`LlmActor`], the one
//! place that bounds how many requests run and wait.
//!
//! Invariant: at most `max_concurrency` requests are in flight and at most `max_waiting` wait for
//! a slot; anything beyond is refused at once with [`LlmError::Overloaded`], so a traffic spike
//! turns into polite "busy" replies instead of an ever-growing queue. The total timeout counts
//! from when a question is asked, its wait for a slot included; a request still waiting when
//! only the first-token timeout (at most half the total) would be left is refused the same way.
//! While the [`breaker`] is open (the server failed repeatedly) requests are refused at once
//! with [`LlmError::Unavailable`].

pub mod backend;
pub mod breaker;
pub mod client;
pub mod lobehub;
pub mod openai;
pub mod sse;
pub mod think;

pub use backend::{ChatMessage, CompletionRequest, DeltaSink, LlmBackend, LlmError, Role};
pub use client::LlmClient;

use crate::metrics::{GaugeHeld, Metrics};
use actix::prelude::*;
use breaker::{Breaker, BreakerSettings, Transition};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Produce one answer.
#[derive(Message)]
#[rtype(result = "Result<String, LlmError>")]
pub struct Complete {
    /// What to ask.
    pub request: CompletionRequest,
    /// Receives visible text as it streams (for platforms that show answers while written).
    pub on_delta: Option<DeltaSink>,
}

/// Bounds and measures every LLM call. See the module docs.
pub struct LlmActor {
    client: LlmClient,
    backend: &'static str,
    permits: Arc<Semaphore>,
    /// Requests accepted but not yet holding a permit.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    metrics: Metrics,
    breaker: Arc<Breaker>,
}

impl LlmActor {
    /// An actor allowing `max_concurrency` calls at once and `max_waiting` more in line.
    pub fn new(client: LlmClient, max_concurrency: usize, max_waiting: usize, metrics: Metrics) -> Self {
        Self {
            backend: client.backend_name(),
            client,
            permits: Arc::new(Semaphore::new(max_concurrency.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting,
            metrics,
            breaker: Arc::new(Breaker::new(BreakerSettings::DISABLED)),
        }
    }

    /// The same actor with a circuit breaker (see [`breaker`]).
    pub fn with_breaker(mut self, settings: BreakerSettings) -> Self {
        self.breaker = Arc::new(Breaker::new(settings));
        self
    }
}

impl Actor for LlmActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Sessions send with `send().await`; a roomy mailbox keeps bursts from waiting on it.
        ctx.set_mailbox_capacity(4096);
    }
}

/// When a call asked at `asked` must end (its total timeout), and until when it may wait for a
/// slot: while at least the first-token timeout (at most half the total) would be left.
fn slot_deadlines(
    asked: tokio::time::Instant,
    settings: &client::LlmClientSettings,
) -> (tokio::time::Instant, tokio::time::Instant) {
    let total = settings.total_timeout;
    let least_for_the_call = settings.first_token_timeout.min(total / 2);
    (asked + total, asked + (total - least_for_the_call))
}

impl Handler<Complete> for LlmActor {
    // `ResponseFuture`: the call needs no actor state, so the handler returns at once and the
    // mailbox keeps draining while requests are in flight.
    type Result = ResponseFuture<Result<String, LlmError>>;

    fn handle(&mut self, msg: Complete, _: &mut Self::Context) -> Self::Result {
        // The question's total timeout counts from now, the wait for a slot included.
        let asked = tokio::time::Instant::now();
        if let Err(left) = self.breaker.may_queue() {
            self.metrics.llm_errors.with_label_values(&[self.backend, "circuit_open"]).inc();
            return Box::pin(async move { Err(LlmError::Unavailable(left)) });
        }
        let waiting_before = self.waiting.fetch_add(1, Ordering::SeqCst);
        // Requests admitted in one burst take their permits only once their futures run, so free
        // permits count as taken by those already waiting.
        if waiting_before >= self.max_waiting.saturating_add(self.permits.available_permits()) {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.llm_errors.with_label_values(&[self.backend, "overloaded"]).inc();
            return Box::pin(async move { Err(LlmError::Overloaded(waiting_before)) });
        }
        self.metrics.llm_queue_depth.inc();
        let permits = self.permits.clone();
        let waiting = self.waiting.clone();
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        let backend = self.backend;
        let breaker = self.breaker.clone();
        let (deadline, give_up_waiting) = slot_deadlines(asked, client.settings());
        let first_token_timeout = client.settings().first_token_timeout;
        Box::pin(async move {
            // The call gets what is left of its total timeout once it has a slot; the wait ends
            // (busy) while that would still be the first-token timeout (at most half the total).
            // The semaphore is never closed: an error here is as good as no slot.
            let (permit, waited) = match permits.clone().try_acquire_owned() {
                Ok(permit) => (Some(permit), false),
                Err(_) => {
                    let waited_for = tokio::time::timeout_at(give_up_waiting, permits.acquire_owned()).await;
                    (waited_for.ok().and_then(Result::ok), true)
                }
            };
            let still_waiting = waiting.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
            metrics.llm_queue_depth.dec();
            let Some(permit) = permit else {
                metrics.llm_errors.with_label_values(&[backend, "overloaded"]).inc();
                tracing::warn!(
                    backend,
                    waited = ?give_up_waiting.duration_since(asked),
                    "No LLM slot while there was still time for an answer; answered busy."
                );
                return Err(LlmError::Overloaded(still_waiting));
            };
            let _permit = permit;
            let left_at_admission = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Admitted only now: the breaker may have opened while this call waited.
            let ticket = match breaker.admit() {
                Ok(ticket) => ticket,
                Err(left) => {
                    metrics.llm_errors.with_label_values(&[backend, "circuit_open"]).inc();
                    return Err(LlmError::Unavailable(left));
                }
            };
            let in_flight = GaugeHeld::new(metrics.llm_in_flight.clone());
            let started = std::time::Instant::now();
            let mut to_caller: DeltaSink = msg.on_delta.unwrap_or_else(|| Box::new(|_: &str| {}));
            // A probe closes the breaker as its answer begins, reasoning included (an empty
            // piece: the model at work), so that the calls refused while it is out are not
            // refused for its whole answer. The caller hears only text.
            let mut answering = ticket.probe_answering();
            let probe_metrics = metrics.clone();
            let mut sink: DeltaSink = Box::new(move |piece: &str| {
                if let Some(answering) = answering.as_mut() {
                    report_transition(answering.answer_began(), &probe_metrics, backend);
                }
                if !piece.is_empty() {
                    to_caller(piece);
                }
            });
            let result = client.complete_by(deadline, &msg.request, &mut sink).await;
            drop(in_flight);
            let outcome = match &result {
                Ok(_) => "ok",
                Err(error) => {
                    metrics.llm_errors.with_label_values(&[backend, error.label()]).inc();
                    error.label()
                }
            };
            metrics.llm_seconds.with_label_values(&[backend, outcome]).observe(started.elapsed().as_secs_f64());
            // A call its wait for a slot left less than the first-token timeout, cut off by the
            // total timeout, says nothing of the server (a probe's place goes to the next call).
            let cut_short = waited && left_at_admission < first_token_timeout;
            let judged = !(cut_short && matches!(result, Err(LlmError::TotalTimeout { .. })));
            let transition = if judged { ticket.record(&result) } else { Transition::Unchanged };
            report_transition(transition, &metrics, backend);
            result
        })
    }
}

/// The breaker's gauge and log line for a change of its state.
fn report_transition(transition: Transition, metrics: &Metrics, backend: &'static str) {
    match transition {
        Transition::Opened => {
            metrics.llm_breaker_open.set(1);
            tracing::error!(backend, "The LLM failed repeatedly; not asking it for a while (circuit breaker open).");
        }
        Transition::Closed => {
            metrics.llm_breaker_open.set(0);
            tracing::info!(backend, "The LLM answered again; circuit breaker closed.");
        }
        Transition::Unchanged => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::client::LlmClientSettings;
    use std::time::Duration;
    use yizhan_channel_core::BoxFuture;

    /// Never answers (until the total timeout ends the call).
    struct Hang;

    impl LlmBackend for Hang {
        fn name(&self) -> &'static str {
            "hang"
        }

        fn complete<'a>(
            &'a self,
            _request: &'a CompletionRequest,
            _first_token_timeout: Duration,
            _on_delta: &'a mut DeltaSink,
        ) -> BoxFuture<'a, Result<String, LlmError>> {
            Box::pin(std::future::pending())
        }
    }

    fn actor(max_concurrency: usize, max_waiting: usize, total_timeout: Duration) -> Addr<LlmActor> {
        let settings = LlmClientSettings {
            first_token_timeout: total_timeout,
            total_timeout,
            max_retries: 0,
            retry_base_delay: Duration::from_millis(1),
        };
        LlmActor::new(LlmClient::new(Arc::new(Hang), settings), max_concurrency, max_waiting, Metrics::new()).start()
    }

    /// Sends one request in a task of its own; the returned counter goes up if it was refused.
    fn ask(addr: &Addr<LlmActor>, refused: &Arc<AtomicUsize>) {
        let (addr, refused) = (addr.clone(), refused.clone());
        actix::spawn(async move {
            let request = CompletionRequest { messages: Vec::new(), user: "u".into(), channel_kind: "test".into() };
            if let Ok(Err(LlmError::Overloaded(_))) = addr.send(Complete { request, on_delta: None }).await {
                refused.fetch_add(1, Ordering::SeqCst);
            }
        });
    }

    /// What says the model is at work reaches the breaker's probe, not the asker, who hears
    /// only text (a streamed card would be updated for nothing).
    #[actix::test]
    async fn the_asker_hears_only_the_answers_text() {
        let settings = LlmClientSettings {
            first_token_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(5),
            max_retries: 0,
            retry_base_delay: Duration::from_millis(1),
        };
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let client = LlmClient::new(Arc::new(ComesBack { up, pieces: &["", "答"], finishes: true }), settings);
        let addr = LlmActor::new(client, 1, 1, Metrics::new()).start();
        let pieces = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let heard = pieces.clone();
        let on_delta: DeltaSink = Box::new(move |piece: &str| {
            heard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(piece.to_owned());
        });
        let request = CompletionRequest { messages: Vec::new(), user: "u".into(), channel_kind: "test".into() };
        let answer = addr.send(Complete { request, on_delta: Some(on_delta) }).await;
        assert_eq!(answer.ok().and_then(Result::ok).as_deref(), Some("答"));
        assert_eq!(*pieces.lock().unwrap_or_else(std::sync::PoisonError::into_inner), ["答"]);
    }

    #[actix::test]
    async fn a_burst_is_admitted_only_up_to_the_running_and_waiting_bounds() {
        tokio::time::pause();
        let addr = actor(2, 1, Duration::from_secs(3_600));
        let refused = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            ask(&addr, &refused);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(refused.load(Ordering::SeqCst), 7, "two run, one waits, seven are told busy");
    }

    /// Asks in a task of its own; the outcome and the (paused) time it came at.
    fn ask_timed(
        addr: &Addr<LlmActor>,
    ) -> tokio::sync::oneshot::Receiver<(Result<String, LlmError>, tokio::time::Instant)> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let addr = addr.clone();
        actix::spawn(async move {
            let request = CompletionRequest { messages: Vec::new(), user: "u".into(), channel_kind: "test".into() };
            let result = addr.send(Complete { request, on_delta: None }).await.unwrap_or_else(|e| panic!("{e}"));
            let _ = sender.send((result, tokio::time::Instant::now()));
        });
        receiver
    }

    fn timed_actor(total: u64, first_token: u64, breaker: BreakerSettings) -> Addr<LlmActor> {
        let settings = LlmClientSettings {
            first_token_timeout: Duration::from_secs(first_token),
            total_timeout: Duration::from_secs(total),
            max_retries: 0,
            retry_base_delay: Duration::from_millis(1),
        };
        let client = LlmClient::new(Arc::new(Hang), settings);
        LlmActor::new(client, 1, 10, Metrics::new()).with_breaker(breaker).start()
    }

    async fn outcome(
        receiver: tokio::sync::oneshot::Receiver<(Result<String, LlmError>, tokio::time::Instant)>,
    ) -> (Result<String, LlmError>, tokio::time::Instant) {
        receiver.await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Paused time: timers fire on the millisecond after their deadline.
    fn assert_about(elapsed: Duration, seconds: u64) {
        let expected = Duration::from_secs(seconds);
        assert!(elapsed >= expected && elapsed <= expected + Duration::from_millis(10), "{elapsed:?}, not {seconds} s");
    }

    #[actix::test]
    async fn the_total_timeout_counts_the_wait_for_a_slot_and_a_late_slot_is_refused() {
        tokio::time::pause();
        let start = tokio::time::Instant::now();
        // One slot; total 100 s, first token 30 s: a call may wait for a slot until 70 s after
        // it was asked, and ends 100 s after it was asked.
        let addr = timed_actor(100, 30, BreakerSettings::DISABLED);
        let first = ask_timed(&addr);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let told_busy = ask_timed(&addr);
        tokio::time::sleep(Duration::from_secs(35)).await;
        let waits_less = ask_timed(&addr);
        let (result, at) = outcome(first).await;
        assert!(matches!(result, Err(LlmError::TotalTimeout { .. })), "{result:?}");
        assert_about(at.duration_since(start), 100);
        let (result, at) = outcome(told_busy).await;
        assert!(matches!(result, Err(LlmError::Overloaded(_))), "{result:?}");
        // Asked at 10 s, no slot by 80 s.
        assert_about(at.duration_since(start), 80);
        // Asked at 45 s, its slot free at 100 s: it ends at 145 s, not 200 s.
        let (result, at) = outcome(waits_less).await;
        assert!(matches!(result, Err(LlmError::TotalTimeout { .. })), "{result:?}");
        assert_about(at.duration_since(start), 145);
    }

    /// Three silent calls through one slot, the breaker opening at the second failure of the
    /// server's in a row: the first asked at 0 s, the second at `second_at` s (it waits for the
    /// first's slot), the third once the second has ended. The third's outcome.
    async fn third_of_three_silent_calls(total: u64, first_token: u64, second_at: u64) -> Result<String, LlmError> {
        tokio::time::pause();
        let breaker = BreakerSettings { threshold: 2, cooldown: Duration::from_secs(1_000) };
        let addr = timed_actor(total, first_token, breaker);
        let first = ask_timed(&addr);
        tokio::time::sleep(Duration::from_secs(second_at)).await;
        let second = ask_timed(&addr);
        let (result, _) = outcome(first).await;
        assert!(matches!(result, Err(LlmError::TotalTimeout { started: false, .. })), "{result:?}");
        let (result, _) = outcome(second).await;
        assert!(matches!(result, Err(LlmError::TotalTimeout { .. })), "{result:?}");
        outcome(ask_timed(&addr)).await.0
    }

    #[actix::test]
    async fn a_call_its_wait_left_less_than_the_first_token_timeout_does_not_count_against_the_server() {
        // Total 100 s, first token 80 s: the second, asked at 60 s, gets the slot at 100 s with
        // 60 s left, and is cut off then, which says nothing of the server: one failure counted.
        let third = third_of_three_silent_calls(100, 80, 60).await;
        assert!(matches!(third, Err(LlmError::TotalTimeout { .. })), "not refused by the breaker: {third:?}");
    }

    #[actix::test]
    async fn a_call_that_did_not_wait_counts_whatever_the_first_token_timeout() {
        tokio::time::pause();
        // A first-token timeout as long as the total: a silent server still opens the breaker.
        let breaker = BreakerSettings { threshold: 1, cooldown: Duration::from_secs(1_000) };
        let addr = timed_actor(100, 100, breaker);
        let (first, _) = outcome(ask_timed(&addr)).await;
        assert!(matches!(first, Err(LlmError::TotalTimeout { started: false, .. })), "{first:?}");
        let (second, _) = outcome(ask_timed(&addr)).await;
        assert!(matches!(second, Err(LlmError::Unavailable(_))), "{second:?}");
    }

    /// Refuses connections until `up`; then says its `pieces` (an empty one: at work, nothing
    /// to show) and, unless it `finishes`, never ends.
    struct ComesBack {
        up: Arc<std::sync::atomic::AtomicBool>,
        pieces: &'static [&'static str],
        finishes: bool,
    }

    impl LlmBackend for ComesBack {
        fn name(&self) -> &'static str {
            "comes-back"
        }

        fn complete<'a>(
            &'a self,
            _request: &'a CompletionRequest,
            _first_token_timeout: Duration,
            on_delta: &'a mut DeltaSink,
        ) -> BoxFuture<'a, Result<String, LlmError>> {
            Box::pin(async move {
                if !self.up.load(Ordering::SeqCst) {
                    return Err(LlmError::Connect("connection refused".into()));
                }
                for piece in self.pieces {
                    on_delta(piece);
                }
                if self.finishes {
                    return Ok(self.pieces.concat());
                }
                std::future::pending().await
            })
        }
    }

    #[actix::test]
    async fn calls_are_admitted_again_once_the_probes_answer_has_begun() {
        tokio::time::pause();
        for reasons in [false, true] {
            calls_are_admitted_again_once_the_probe_answers(reasons).await;
        }
    }

    /// The probe's answer begins with a word, or (`reasons`) with reasoning that shows none.
    async fn calls_are_admitted_again_once_the_probe_answers(reasons: bool) {
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let settings = LlmClientSettings {
            first_token_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(100),
            max_retries: 0,
            retry_base_delay: Duration::from_millis(1),
        };
        let pieces: &[&str] = if reasons { &[""] } else { &["你"] };
        let client = LlmClient::new(Arc::new(ComesBack { up: up.clone(), pieces, finishes: false }), settings);
        let breaker = BreakerSettings { threshold: 1, cooldown: Duration::from_secs(10) };
        let addr = LlmActor::new(client, 4, 10, Metrics::new()).with_breaker(breaker).start();
        let (down, _) = outcome(ask_timed(&addr)).await;
        assert!(matches!(down, Err(LlmError::Connect(_))), "{down:?}");
        tokio::time::sleep(Duration::from_secs(10)).await;
        up.store(true, Ordering::SeqCst);
        let probe = ask_timed(&addr);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The probe's first word is out; it has not ended (its answer runs to the total timeout).
        let (after, _) = outcome(ask_timed(&addr)).await;
        assert!(
            matches!(after, Err(LlmError::TotalTimeout { started: true, .. })),
            "not refused ({reasons}): {after:?}"
        );
        let (probe, _) = outcome(probe).await;
        assert!(matches!(probe, Err(LlmError::TotalTimeout { started: true, .. })), "{reasons}: {probe:?}");
    }

    #[actix::test]
    async fn a_call_its_wait_left_the_first_token_timeout_counts_as_any_other() {
        // Total 100 s, first token 30 s: the second, asked at 45 s, has 45 s left at its slot,
        // silent throughout: two failures, and the breaker refuses the third.
        let third = third_of_three_silent_calls(100, 30, 45).await;
        assert!(matches!(third, Err(LlmError::Unavailable(_))), "{third:?}");
    }
}
