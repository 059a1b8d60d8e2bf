//! Asking the model: backends (`openai`, `lobehub`), the retrying client, and [`LlmActor`], the one
//! place that bounds how many requests run and wait.
//!
//! Invariant: at most `max_concurrency` requests are in flight and at most `max_waiting` wait for
//! a slot; anything beyond is refused at once with [`LlmError::Overloaded`], so a traffic spike
//! turns into polite "busy" replies instead of an ever-growing queue. A request that waited the
//! total timeout for a slot is refused the same way. While the [`breaker`] is open (the server
//! failed repeatedly) requests are refused at once with [`LlmError::Unavailable`].

pub mod backend;
pub mod breaker;
pub mod client;
pub mod lobehub;
pub mod openai;
pub mod sse;
pub mod think;

pub use backend::{ChatMessage, CompletionRequest, DeltaSink, LlmBackend, LlmError, Role};
pub use client::LlmClient;

use crate::metrics::Metrics;
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

impl Handler<Complete> for LlmActor {
    // `ResponseFuture`: the call needs no actor state, so the handler returns at once and the
    // mailbox keeps draining while requests are in flight.
    type Result = ResponseFuture<Result<String, LlmError>>;

    fn handle(&mut self, msg: Complete, _: &mut Self::Context) -> Self::Result {
        let ticket = match self.breaker.admit() {
            Ok(ticket) => ticket,
            Err(left) => {
                self.metrics.llm_errors.with_label_values(&[self.backend, "circuit_open"]).inc();
                return Box::pin(async move { Err(LlmError::Unavailable(left)) });
            }
        };
        let waiting_before = self.waiting.fetch_add(1, Ordering::SeqCst);
        // Requests admitted in one burst take their permits only once their futures run, so free
        // permits count as taken by those already waiting.
        if waiting_before >= self.max_waiting.saturating_add(self.permits.available_permits()) {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.llm_errors.with_label_values(&[self.backend, "overloaded"]).inc();
            // Not asked after all: the ticket, dropped unrecorded, frees a probe's place.
            return Box::pin(async move { Err(LlmError::Overloaded(waiting_before)) });
        }
        self.metrics.llm_queue_depth.inc();
        let permits = self.permits.clone();
        let waiting = self.waiting.clone();
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        let backend = self.backend;
        // The total timeout starts with the call; the wait for a slot is bounded the same way,
        // after which the user is told the service is busy rather than left waiting.
        let wait_limit = client.settings().total_timeout;
        Box::pin(async move {
            let permit = tokio::time::timeout(wait_limit, permits.acquire_owned()).await;
            let still_waiting = waiting.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
            metrics.llm_queue_depth.dec();
            let Ok(permit) = permit else {
                metrics.llm_errors.with_label_values(&[backend, "overloaded"]).inc();
                tracing::warn!(backend, waited = ?wait_limit, "No LLM slot within the total timeout; answered busy.");
                return Err(LlmError::Overloaded(still_waiting));
            };
            // The semaphore is never closed, so this error cannot happen; map it anyway.
            let _permit = permit.map_err(|_| LlmError::Overloaded(0))?;
            if !ticket.still_admitted() {
                // The server failed repeatedly while this call waited for its slot.
                metrics.llm_errors.with_label_values(&[backend, "circuit_open"]).inc();
                return Err(LlmError::Unavailable(std::time::Duration::ZERO));
            }
            metrics.llm_in_flight.inc();
            let started = std::time::Instant::now();
            let mut sink: DeltaSink = msg.on_delta.unwrap_or_else(|| Box::new(|_: &str| {}));
            let result = client.complete(&msg.request, &mut sink).await;
            metrics.llm_in_flight.dec();
            let outcome = match &result {
                Ok(_) => "ok",
                Err(error) => {
                    metrics.llm_errors.with_label_values(&[backend, error.label()]).inc();
                    error.label()
                }
            };
            metrics.llm_seconds.with_label_values(&[backend, outcome]).observe(started.elapsed().as_secs_f64());
            match ticket.record(&result) {
                Transition::Opened => {
                    metrics.llm_breaker_open.set(1);
                    tracing::error!(
                        backend,
                        "The LLM failed repeatedly; not asking it for a while (circuit breaker open)."
                    );
                }
                Transition::Closed => {
                    metrics.llm_breaker_open.set(0);
                    tracing::info!(backend, "The LLM answered again; circuit breaker closed.");
                }
                Transition::Unchanged => {}
            }
            result
        })
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

    #[actix::test]
    async fn a_request_that_waited_the_total_timeout_for_a_slot_is_told_busy() {
        tokio::time::pause();
        let addr = actor(1, 10, Duration::from_secs(100));
        let refused = Arc::new(AtomicUsize::new(0));
        // t=0 takes the slot until t=100; t=10 gets it then; t=20 would wait past t=120.
        for _ in 0..3 {
            ask(&addr, &refused);
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(75)).await;
        assert_eq!(refused.load(Ordering::SeqCst), 0, "t=105: nobody has waited 100 s yet");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(refused.load(Ordering::SeqCst), 1, "t=125: the third waited 100 s");
    }
}
