//! The LLM circuit breaker: after a run of failures that say the server is unwell, stop asking
//! it for a while and answer at once.
//!
//! Without it, while the model server is down or hung every question holds a slot for the whole
//! first-token timeout before the user gets the apology, the slots and the waiting line fill up,
//! and later users are told "busy" after waiting. With it, once `threshold` calls in a row have
//! failed that way, calls fail at once for `cooldown`; then one call is let through as a probe:
//! if the server answers it (even with an error about the request) the breaker closes, if it
//! fails for the server's reasons the breaker opens for another `cooldown`, and if its outcome
//! says nothing (a call cut short by its wait for a slot, or dropped) the next call probes. A
//! probe whose answer has begun (its first token, reasoning included) closes the breaker then,
//! not when the answer ends: the other calls, refused while it is out, would otherwise be
//! refused for as long as one answer takes (a minute or more for a reasoning model).
//!
//! Only failures that point at the server count (no connection, 429 and 5xx, timeouts). A 4xx,
//! an error the server reports in its stream or an answer that could not be read says nothing
//! about the server's health, and a success ends the run; a probe that ends so closes the
//! breaker all the same (the server answered). A call is admitted once it holds its slot, so
//! calls that waited for one while the breaker opened are refused too, and the probe is the
//! first call to get a slot after the cooldown (not one that may then wait for a slot while
//! every other call is refused).

use super::LlmError;
use std::sync::{Arc, Mutex};
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

/// How a recorded call changed the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// It opened (or opened again after a failed probe).
    Opened,
    /// A probe heard the server answer: it closed.
    Closed,
    /// No change.
    Unchanged,
}

#[derive(Debug)]
struct State {
    failures_in_a_row: u32,
    /// Open until then; stays set (in the past) until a probe succeeds.
    open_until: Option<Instant>,
    /// A probe is out: other calls are refused until it returns or its answer begins.
    probing: bool,
    /// Counts probes, so that a ticket acts only on its own probe (one whose answer began, then
    /// ended after the breaker had opened again and let another probe out, must not end that one).
    probe_number: u64,
}

/// See the module docs. Shared by every call of one [`LlmActor`](super::LlmActor).
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: Mutex<State>,
}

/// Permission to make one call, from [`Breaker::admit`]; its outcome goes to
/// [`Ticket::record`]. A probe ticket dropped unrecorded (the call panicked or was cancelled)
/// lets the next call probe instead of keeping the breaker half-open for good.
#[derive(Debug)]
pub struct Ticket {
    breaker: Arc<Breaker>,
    probe: bool,
    probe_number: u64,
    recorded: bool,
}

/// Tells the breaker that a probe's answer has begun: from [`Ticket::probe_answering`].
#[derive(Debug)]
pub struct ProbeAnswering {
    breaker: Arc<Breaker>,
    probe_number: u64,
    told: bool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        let state = State { failures_in_a_row: 0, open_until: None, probing: false, probe_number: 0 };
        Self { settings, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a call may wait for a slot: `Err` with how much longer the breaker stays open
    /// (zero while a probe is out). Admission itself is [`Breaker::admit`], once the slot is held.
    pub fn may_queue(&self) -> Result<(), Duration> {
        refusal(&self.state()).map_or(Ok(()), Err)
    }

    /// A ticket for a call now (the probe, if the cooldown is over and none is out), or how
    /// much longer the breaker stays open.
    pub fn admit(self: &Arc<Self>) -> Result<Ticket, Duration> {
        let mut state = self.state();
        if let Some(left) = refusal(&state) {
            return Err(left);
        }
        // Past its cooldown an open breaker lets this one call through, as the probe.
        let probe = state.open_until.is_some();
        if probe {
            state.probing = true;
            state.probe_number = state.probe_number.wrapping_add(1);
        }
        Ok(Ticket { breaker: self.clone(), probe, probe_number: state.probe_number, recorded: false })
    }

    /// Whether calls are being refused now (open, or half-open with a probe out).
    #[cfg(test)]
    fn is_open(&self) -> bool {
        let state = self.state();
        state.open_until.is_some_and(|open_until| Instant::now() < open_until || state.probing)
    }
}

impl Ticket {
    /// Whether this call is the probe after a cooldown.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// For a probe: what its call tells once the server's answer has begun.
    pub fn probe_answering(&self) -> Option<ProbeAnswering> {
        self.probe.then(|| ProbeAnswering {
            breaker: self.breaker.clone(),
            probe_number: self.probe_number,
            told: false,
        })
    }

    /// Records how the call ended.
    pub fn record(mut self, result: &Result<String, LlmError>) -> Transition {
        self.recorded = true;
        let breaker = &self.breaker;
        if breaker.settings.threshold == 0 {
            return Transition::Unchanged;
        }
        let mut state = breaker.state();
        // A probe whose answer began has closed the breaker already: it ends as any call.
        self.probe = self.probe && state.probing && state.probe_number == self.probe_number;
        if self.probe {
            state.probing = false;
        }
        match result {
            Ok(_) => close(&mut state),
            Err(error) if points_at_the_server(error) => {
                state.failures_in_a_row = state.failures_in_a_row.saturating_add(1);
                let trips =
                    self.probe || (state.open_until.is_none() && state.failures_in_a_row >= breaker.settings.threshold);
                if trips {
                    state.open_until = Some(Instant::now() + breaker.settings.cooldown);
                    Transition::Opened
                } else {
                    Transition::Unchanged
                }
            }
            // Says nothing about the server's health, but a probe that ends so heard the server
            // answer: calling it back would keep every other call refused behind probe after
            // probe (a content filter's refusal, a long answer cut by the total timeout).
            Err(_) if self.probe => close(&mut state),
            Err(_) => Transition::Unchanged,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut state = self.breaker.state();
            if state.probe_number == self.probe_number {
                state.probing = false;
            }
        }
    }
}

impl ProbeAnswering {
    /// The probe's answer has begun: closes the breaker, the first time (later calls change
    /// nothing). Nothing either once the probe has ended, or when it is no longer the one out.
    pub fn answer_began(&mut self) -> Transition {
        if std::mem::replace(&mut self.told, true) {
            return Transition::Unchanged;
        }
        let mut state = self.breaker.state();
        if !state.probing || state.probe_number != self.probe_number {
            return Transition::Unchanged;
        }
        state.probing = false;
        close(&mut state)
    }
}

/// How much longer calls are refused (zero while a probe is out), if they are.
fn refusal(state: &State) -> Option<Duration> {
    let open_until = state.open_until?;
    let now = Instant::now();
    if now < open_until {
        Some(open_until - now)
    } else {
        state.probing.then_some(Duration::ZERO)
    }
}

/// Ends a run of failures, and closes the breaker if it was open.
fn close(state: &mut State) -> Transition {
    state.failures_in_a_row = 0;
    match state.open_until.take() {
        Some(_) => Transition::Closed,
        None => Transition::Unchanged,
    }
}

/// Whether a failure says the server is unwell: no connection, 429 or 5xx, no first token, or
/// nothing of the answer within the total timeout. A stream that broke after it began does not
/// count: that is also how a server reports a refusal of the request itself (a content filter,
/// a context too long), which five users in a row must not turn into an outage for everyone;
/// nor does a steady stream too long for the total timeout (five long answers in a row from a
/// slow but working model).
fn points_at_the_server(error: &LlmError) -> bool {
    match error {
        LlmError::Connect(_) | LlmError::Lost(_) | LlmError::FirstTokenTimeout(_) => true,
        LlmError::TotalTimeout { started, .. } => !started,
        LlmError::Status { status, .. } => *status == 429 || *status >= 500,
        LlmError::Stream(_) | LlmError::Protocol(_) | LlmError::Overloaded(_) | LlmError::Unavailable(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> Result<String, LlmError> {
        Err(LlmError::Connect("connection refused".into()))
    }

    fn breaker() -> Arc<Breaker> {
        Arc::new(Breaker::new(BreakerSettings { threshold: 3, cooldown: Duration::from_secs(30) }))
    }

    fn call(breaker: &Arc<Breaker>, result: Result<String, LlmError>) -> Transition {
        match breaker.admit() {
            Ok(ticket) => ticket.record(&result),
            Err(left) => panic!("refused for {left:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_after_the_threshold_probes_after_the_cooldown_and_closes_on_success() {
        let breaker = breaker();
        assert_eq!(call(&breaker, down()), Transition::Unchanged);
        assert_eq!(call(&breaker, down()), Transition::Unchanged);
        assert_eq!(call(&breaker, down()), Transition::Opened, "the third failure in a row opens it");
        assert_eq!(breaker.admit().err(), Some(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = breaker.admit().unwrap_or_else(|left| panic!("refused for {left:?}"));
        assert!(probe.is_probe());
        assert_eq!(breaker.admit().err(), Some(Duration::ZERO), "one probe at a time");
        assert_eq!(probe.record(&down()), Transition::Opened, "a failed probe opens it again");
        assert!(breaker.is_open());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(call(&breaker, Ok("好".into())), Transition::Closed);
        assert!(!breaker.is_open());
        assert!(!breaker.admit().is_ok_and(|ticket| ticket.is_probe()));
    }

    #[tokio::test(start_paused = true)]
    async fn only_failures_of_the_server_count_and_a_success_ends_the_run() {
        let breaker = breaker();
        for _ in 0..5 {
            let bad_request = LlmError::Status { status: 400, message: "bad".into(), retry_after: None };
            assert_eq!(call(&breaker, Err(bad_request)), Transition::Unchanged);
            assert_eq!(call(&breaker, Err(LlmError::Stream("content filter".into()))), Transition::Unchanged);
        }
        for _ in 0..5 {
            let long_answer = LlmError::TotalTimeout { after: Duration::from_secs(120), started: true };
            assert_eq!(call(&breaker, Err(long_answer)), Transition::Unchanged);
        }
        call(&breaker, Ok("好".into()));
        call(&breaker, down());
        call(&breaker, down());
        let silent = LlmError::TotalTimeout { after: Duration::from_secs(120), started: false };
        assert_eq!(call(&breaker, Err(silent)), Transition::Opened, "nothing shown in time counts");
        tokio::time::advance(Duration::from_secs(30)).await;
        call(&breaker, Ok("好".into()));
        call(&breaker, down());
        call(&breaker, down());
        let busy = Err(LlmError::Status { status: 503, message: "busy".into(), retry_after: None });
        assert_eq!(call(&breaker, busy), Transition::Opened);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_unrecorded_lets_the_next_call_probe() {
        let breaker = breaker();
        for _ in 0..3 {
            call(&breaker, down());
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = breaker.admit().unwrap_or_else(|left| panic!("refused for {left:?}"));
        drop(probe);
        assert!(breaker.admit().is_ok_and(|ticket| ticket.is_probe()));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_queue_only_while_a_probe_may_be_admitted() {
        let breaker = breaker();
        assert_eq!(breaker.may_queue(), Ok(()));
        for _ in 0..3 {
            call(&breaker, down());
        }
        assert_eq!(breaker.may_queue(), Err(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        // Past the cooldown calls may queue for a slot; the first to hold one is the probe.
        assert_eq!(breaker.may_queue(), Ok(()));
        let probe = breaker.admit().unwrap_or_else(|left| panic!("refused for {left:?}"));
        assert!(probe.is_probe());
        assert_eq!(breaker.may_queue(), Err(Duration::ZERO), "the rest wait for the probe's answer to begin");
        assert_eq!(probe.record(&Ok("好".into())), Transition::Closed);
        assert_eq!(breaker.may_queue(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_the_server_answered_closes_the_breaker_whatever_the_answer() {
        let answered = [
            LlmError::Stream("content filter".into()),
            LlmError::Status { status: 400, message: "context too long".into(), retry_after: None },
            LlmError::TotalTimeout { after: Duration::from_secs(120), started: true },
            LlmError::Protocol("not the API's answer".into()),
        ];
        for error in answered {
            let breaker = breaker();
            for _ in 0..3 {
                call(&breaker, down());
            }
            tokio::time::advance(Duration::from_secs(30)).await;
            let probe = breaker.admit().unwrap_or_else(|left| panic!("refused for {left:?}"));
            let label = error.label();
            assert_eq!(probe.record(&Err(error)), Transition::Closed, "{label}");
            assert!(!breaker.is_open(), "{label}");
            assert!(!breaker.admit().is_ok_and(|ticket| ticket.is_probe()), "{label}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_whose_answer_began_closes_the_breaker_then_ends_as_any_call() {
        let breaker = breaker();
        for _ in 0..3 {
            call(&breaker, down());
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = breaker.admit().unwrap_or_else(|left| panic!("refused for {left:?}"));
        let mut answering = probe.probe_answering().unwrap_or_else(|| panic!("a probe"));
        assert_eq!(breaker.may_queue(), Err(Duration::ZERO), "refused until the probe's answer begins");
        assert_eq!(answering.answer_began(), Transition::Closed);
        assert_eq!(answering.answer_began(), Transition::Unchanged, "once");
        assert_eq!(breaker.may_queue(), Ok(()));
        let other = breaker.admit().unwrap_or_else(|left| panic!("refused for {left:?}"));
        assert!(!other.is_probe());
        // Its answer broke off later, for the server's reasons: one failure, not a reopening.
        assert_eq!(probe.record(&down()), Transition::Unchanged);
        assert_eq!(other.record(&down()), Transition::Unchanged);
        assert_eq!(call(&breaker, down()), Transition::Opened, "the third in a row");
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_probe_neither_closes_nor_frees_the_probe_now_out() {
        let breaker = breaker();
        for _ in 0..3 {
            call(&breaker, down());
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        let first = breaker.admit().unwrap_or_else(|left| panic!("refused for {left:?}"));
        let mut first_answering = first.probe_answering().unwrap_or_else(|| panic!("a probe"));
        assert_eq!(first.record(&down()), Transition::Opened);
        tokio::time::advance(Duration::from_secs(30)).await;
        let second = breaker.admit().unwrap_or_else(|left| panic!("refused for {left:?}"));
        assert!(second.is_probe());
        assert_eq!(first_answering.answer_began(), Transition::Unchanged);
        assert_eq!(breaker.may_queue(), Err(Duration::ZERO), "the second probe is still out");
        let mut second_answering = second.probe_answering().unwrap_or_else(|| panic!("a probe"));
        assert_eq!(second_answering.answer_began(), Transition::Closed);
        // A third probe (after the breaker opened again) is not freed by the second's ticket.
        for _ in 0..3 {
            call(&breaker, down());
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        let third = breaker.admit().unwrap_or_else(|left| panic!("refused for {left:?}"));
        assert!(third.is_probe());
        drop(second);
        assert_eq!(breaker.may_queue(), Err(Duration::ZERO), "the third probe is still out");
        drop(third);
        assert_eq!(breaker.may_queue(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_threshold_of_zero_never_opens() {
        let breaker = Arc::new(Breaker::new(BreakerSettings::DISABLED));
        for _ in 0..100 {
            assert_eq!(call(&breaker, down()), Transition::Unchanged);
        }
    }
}
