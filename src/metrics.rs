//! Prometheus metrics, registered once per application (not globally, so tests can run several
//! applications in one process).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the hub exports at `GET /metrics`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Webhook calls by channel and outcome (`accepted`, `duplicate`, `responded`, `unauthorized` …).
    pub webhook_requests: IntCounterVec,
    /// Time from receiving a webhook call to acknowledging it.
    pub webhook_ack_seconds: HistogramVec,
    /// LLM calls by backend and outcome (`ok` or an error label), with their latency.
    pub llm_seconds: HistogramVec,
    /// LLM failures by backend and kind.
    pub llm_errors: IntCounterVec,
    /// Requests waiting for an LLM slot.
    pub llm_queue_depth: IntGauge,
    /// Requests being answered by the LLM.
    pub llm_in_flight: IntGauge,
    /// 1 from the moment the LLM circuit breaker opens until a probe's answer begins (or the
    /// server answers it).
    pub llm_breaker_open: IntGauge,
    /// Session actors alive.
    pub sessions_alive: IntGauge,
    /// Send attempts by channel and outcome: `delivered`, `retried` (a transient error, tried
    /// again), or the error that ended the part (`transient` once attempts are used up, `refused`,
    /// `misconfigured`, `unauthorized`, `malformed`, `unsupported`, `maybe_delivered`).
    pub deliveries: IntCounterVec,
    /// Messages over a bound, by which bound: answered with the busy text, or (while a busy reply
    /// to the same conversation is on its way) finished unanswered.
    pub shed: IntCounterVec,
    /// Parts being sent (their backoff and pauses included), by channel; queued parts not counted.
    pub delivery_in_flight: IntGaugeVec,
    /// Accepted messages not yet finished (answered or deliberately left unanswered).
    pub journal_open: IntGauge,
    /// Answer events by channel and path: `passive`, `push`, `streamed`, `parked`, `unparked`.
    pub answers: IntCounterVec,
    /// Webhook attempts held open for a passive answer, by channel: each of a platform's
    /// retries of one message counts.
    pub passive_attempts: IntCounterVec,
    /// Webhook attempts waiting for their passive answer now, by channel (each holds a
    /// connection open; an attempt past its wait, held only until the platform gives up on it,
    /// no longer counts).
    pub passive_waiting: IntGaugeVec,
    /// Answers held for a platform retry that never came, pushed by the fallback timer (see
    /// `delivery::deliver_recorded`), by channel. Retries that do not reach Yizhan (a proxy in
    /// between) show here, each as an answer that came up to about 10 s late; so do messages
    /// resumed after a restart whose retries came while Yizhan was down.
    pub passive_fallback_pushes: IntCounterVec,
}

/// Holds a gauge one higher for as long as it lives: a future dropped midway still takes its
/// count back.
pub struct GaugeHeld(IntGauge);

impl GaugeHeld {
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeHeld {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// NOTE: the metric definitions below are constants; `expect` cannot fail on them, and a failure
// would be a programming error found by every test run.
impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("yizhan".into()), None).expect("valid registry prefix");
        let latency_buckets = vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let llm_buckets = vec![0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.5, 6.0, 10.0, 20.0, 30.0, 60.0, 120.0];
        let webhook_requests = IntCounterVec::new(
            Opts::new("webhook_requests_total", "Webhook calls by channel and outcome."),
            &["channel", "outcome"],
        )
        .expect("valid metric");
        let webhook_ack_seconds = HistogramVec::new(
            HistogramOpts::new("webhook_ack_seconds", "Time to acknowledge a webhook call.").buckets(latency_buckets),
            &["channel"],
        )
        .expect("valid metric");
        let llm_seconds = HistogramVec::new(
            HistogramOpts::new("llm_request_seconds", "LLM call latency by backend and outcome.").buckets(llm_buckets),
            &["backend", "outcome"],
        )
        .expect("valid metric");
        let llm_errors = IntCounterVec::new(
            Opts::new("llm_errors_total", "LLM failures by backend and kind."),
            &["backend", "kind"],
        )
        .expect("valid metric");
        let llm_queue_depth =
            IntGauge::new("llm_queue_depth", "Requests waiting for an LLM slot.").expect("valid metric");
        let llm_in_flight =
            IntGauge::new("llm_in_flight", "Requests being answered by the LLM.").expect("valid metric");
        let llm_breaker_open =
            IntGauge::new("llm_breaker_open", "1 from an LLM circuit breaker trip until a probe's answer begins.")
                .expect("valid metric");
        let sessions_alive = IntGauge::new("sessions_alive", "Session actors alive.").expect("valid metric");
        let deliveries = IntCounterVec::new(
            Opts::new("deliveries_total", "Reply parts by channel and outcome."),
            &["channel", "outcome"],
        )
        .expect("valid metric");
        let shed = IntCounterVec::new(
            Opts::new(
                "shed_total",
                "Messages over a bound (answered with the busy text, or unanswered while one is on its way), by bound.",
            ),
            &["bound"],
        )
        .expect("valid metric");
        let delivery_in_flight =
            IntGaugeVec::new(Opts::new("delivery_in_flight", "Reply parts being sent, by channel."), &["channel"])
                .expect("valid metric");
        let journal_open = IntGauge::new("journal_open", "Accepted messages not yet finished.").expect("valid metric");
        let answers = IntCounterVec::new(
            Opts::new(
                "answers_total",
                "Answer events by channel and path: passive, push and streamed as answers leave, parked and unparked as text is parked and taken out (then counted by the path it leaves by too).",
            ),
            &["channel", "path"],
        )
        .expect("valid metric");
        let passive_attempts = IntCounterVec::new(
            Opts::new(
                "passive_attempts_total",
                "Webhook attempts held open for a passive answer (each retry of a message counts), by channel.",
            ),
            &["channel"],
        )
        .expect("valid metric");
        let passive_waiting = IntGaugeVec::new(
            Opts::new("passive_waiting", "Webhook attempts waiting for their passive answer now, by channel."),
            &["channel"],
        )
        .expect("valid metric");
        let passive_fallback_pushes = IntCounterVec::new(
            Opts::new(
                "passive_fallback_pushes_total",
                "Answers held for a platform retry that never came, pushed by the fallback timer, by channel.",
            ),
            &["channel"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(webhook_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(webhook_ack_seconds.clone()),
            Box::new(llm_seconds.clone()),
            Box::new(llm_errors.clone()),
            Box::new(llm_queue_depth.clone()),
            Box::new(llm_in_flight.clone()),
            Box::new(llm_breaker_open.clone()),
            Box::new(sessions_alive.clone()),
            Box::new(deliveries.clone()),
            Box::new(shed.clone()),
            Box::new(delivery_in_flight.clone()),
            Box::new(journal_open.clone()),
            Box::new(answers.clone()),
            Box::new(passive_attempts.clone()),
            Box::new(passive_waiting.clone()),
            Box::new(passive_fallback_pushes.clone()),
        ] {
            registry.register(collector).expect("metric registered once");
        }
        Self {
            registry,
            webhook_requests,
            webhook_ack_seconds,
            llm_seconds,
            llm_errors,
            llm_queue_depth,
            llm_in_flight,
            llm_breaker_open,
            sessions_alive,
            deliveries,
            shed,
            delivery_in_flight,
            journal_open,
            answers,
            passive_attempts,
            passive_waiting,
            passive_fallback_pushes,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "Failed to encode metrics.");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
