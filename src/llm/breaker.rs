//! The LLM circuit breaker: after a run of failures that say the server is unwell, stop asking
//! it for a while and answer at once.
//!
//! Without it, while the model server is down or hung every question holds a slot for the whole
//! first-token timeout before the user gets the apology, the slots and the waiting line fill up,
//! and later users are told "busy" after waiting. With it, once `threshold` calls in a row have
//! failed that way, calls fail at once for `cooldown`; then one call is let through as a probe:
//! if it succeeds the breaker closes, if it fails the breaker opens for another `cooldown`.
//!
//! Only failures that point at the server count (no connection, 429 and 5xx, timeouts, broken
//! streams). A 4xx or an answer that could not be read says nothing about the server's health,
//! and a success ends the run.

use super::LlmError;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// When the breaker trips and for how long (`[llm] breaker_threshold`, `breaker_cooldown_secs`).
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    /// Failures in a row that open the breaker; 0 never opens it.
    pub threshold: u32,
    /// How long it stays open before a probe is let through.
    pub cooldown: Duration,
}

impl BreakerSettings {
    /// A breaker that never opens.
    pub const DISABLED: Self = Self { threshold: 0, cooldown: Duration::ZERO };
}

/// What the breaker says about a call about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Make the call.
    Call,
    /// Make the call: it is the probe after a cooldown, and its outcome decides.
    Probe,
    /// Do not call; the breaker is open for this much longer.
    Refuse(Duration),
}

#[derive(Debug)]
struct State {
    failures_in_a_row: u32,
    /// Open until then.
    open_until: Option<Instant>,
    /// A probe is out: other calls are refused until it returns.
    probing: bool,
}

/// See the module docs. Shared by every call of one [`LlmActor`](super::LlmActor).
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: Mutex<State>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        Self { settings, state: Mutex::new(State { failures_in_a_row: 0, open_until: None, probing: false }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a call may be made now.
    pub fn admit(&self) -> Admission {
        let mut state = self.state();
        let Some(open_until) = state.open_until else {
            return Admission::Call;
        };
        let now = Instant::now();
        if now < open_until {
            return Admission::Refuse(open_until - now);
        }
        if state.probing {
            return Admission::Refuse(Duration::ZERO);
        }
        state.probing = true;
        Admission::Probe
    }

    /// Records how an admitted call ended (`probe`: it was admitted as [`Admission::Probe`]).
    /// Returns whether the breaker opened because of it.
    pub fn record(&self, probe: bool, result: &Result<String, LlmError>) -> bool {
        if self.settings.threshold == 0 {
            return false;
        }
        let mut state = self.state();
        if probe {
            state.probing = false;
        }
        match result {
            Ok(_) => {
                state.failures_in_a_row = 0;
                state.open_until = None;
                false
            }
            Err(error) if points_at_the_server(error) => {
                state.failures_in_a_row = state.failures_in_a_row.saturating_add(1);
                let trips = probe || (state.open_until.is_none() && state.failures_in_a_row >= self.settings.threshold);
                if trips {
                    state.open_until = Some(Instant::now() + self.settings.cooldown);
                }
                trips
            }
            // Says nothing about the server's health; a probe that ends so lets the next one go.
            Err(_) => false,
        }
    }

    /// Whether calls are being refused now.
    pub fn is_open(&self) -> bool {
        self.state().open_until.is_some_and(|open_until| Instant::now() < open_until)
    }
}

/// Whether a failure says the server is unwell.
fn points_at_the_server(error: &LlmError) -> bool {
    match error {
        LlmError::Connect(_) | LlmError::FirstTokenTimeout(_) | LlmError::TotalTimeout(_) | LlmError::Stream(_) => true,
        LlmError::Status { status, .. } => *status == 429 || *status >= 500,
        LlmError::Protocol(_) | LlmError::Overloaded(_) | LlmError::Unavailable(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> Result<String, LlmError> {
        Err(LlmError::Connect("connection refused".into()))
    }

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings { threshold: 3, cooldown: Duration::from_secs(30) })
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_after_the_threshold_probes_after_the_cooldown_and_closes_on_success() {
        let breaker = breaker();
        for _ in 0..2 {
            assert_eq!(breaker.admit(), Admission::Call);
            assert!(!breaker.record(false, &down()));
        }
        assert_eq!(breaker.admit(), Admission::Call);
        assert!(breaker.record(false, &down()), "the third failure in a row opens it");
        assert_eq!(breaker.admit(), Admission::Refuse(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(breaker.admit(), Admission::Probe);
        assert_eq!(breaker.admit(), Admission::Refuse(Duration::ZERO), "one probe at a time");
        assert!(breaker.record(true, &down()), "a failed probe opens it again");
        assert!(breaker.is_open());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(breaker.admit(), Admission::Probe);
        assert!(!breaker.record(true, &Ok("好".into())));
        assert_eq!(breaker.admit(), Admission::Call);
        assert!(!breaker.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn only_failures_of_the_server_count_and_a_success_ends_the_run() {
        let breaker = breaker();
        let client_error = Err(LlmError::Status { status: 400, message: "bad".into(), retry_after: None });
        for _ in 0..5 {
            breaker.record(false, &client_error);
        }
        breaker.record(false, &down());
        breaker.record(false, &down());
        breaker.record(false, &Ok("好".into()));
        breaker.record(false, &down());
        breaker.record(false, &down());
        assert_eq!(breaker.admit(), Admission::Call);
        let busy = Err(LlmError::Status { status: 503, message: "busy".into(), retry_after: None });
        assert!(breaker.record(false, &busy));
    }

    #[tokio::test(start_paused = true)]
    async fn a_threshold_of_zero_never_opens() {
        let breaker = Breaker::new(BreakerSettings::DISABLED);
        for _ in 0..100 {
            assert_eq!(breaker.admit(), Admission::Call);
            assert!(!breaker.record(false, &down()));
        }
    }
}
