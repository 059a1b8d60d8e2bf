//! Asking the model: backends (`openai`, `lobehub`), the retrying client, and [`LlmActor`], the one
//! place that bounds how many requests run and wait.
//!
//! Invariant: at most `max_concurrency` requests are in flight and at most `max_waiting` wait for
//! a slot; anything beyond is refused at once with [`LlmError::Overloaded`], so a traffic spike
//! turns into polite "busy" replies instead of an ever-growing queue.

pub mod backend;
pub mod client;
pub mod lobehub;
pub mod openai;
pub mod sse;
pub mod think;

pub use backend::{ChatMessage, CompletionRequest, DeltaSink, LlmBackend, LlmError, Role};
pub use client::LlmClient;

use crate::metrics::Metrics;
use actix::prelude::*;
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
        }
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
        let waiting_before = self.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting_before >= self.max_waiting && self.permits.available_permits() == 0 {
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
        Box::pin(async move {
            let permit = permits.acquire_owned().await;
            waiting.fetch_sub(1, Ordering::SeqCst);
            metrics.llm_queue_depth.dec();
            // The semaphore is never closed, so this error cannot happen; map it anyway.
            let _permit = permit.map_err(|_| LlmError::Overloaded(0))?;
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
            result
        })
    }
}
