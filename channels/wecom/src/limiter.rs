//! A per-member sliding-window rate limiter that makes sends wait instead of being lost.
//!
//! WeCom accepts at most 30 messages per minute and 1000 per hour from one app to one member and
//! **silently drops** the rest (doc path/90236: the API still answers `errcode: 0`). So, unlike
//! a platform that answers "slow down", exceeding the limit cannot be detected and retried; the
//! only safe policy is never to exceed it. [`RateLimiter::acquire`] therefore waits (tokio time)
//! until both windows have room for the member, then records the send.
//!
//! Invariants:
//! - For every member, any 60 s interval holds at most `per_minute` recorded sends and any hour
//!   at most `per_hour`, each counted from the moment its slot was granted. A slot frees
//!   [`SLACK`] after the window, because WeCom counts when a message *arrives*, a little after
//!   we grant it.
//! - Memory is bounded by activity: a member keeps at most `per_hour` timestamps, and members
//!   with no send in the last hour are forgotten by a sweep that runs at most once a minute.
//! - The lock is a `std` mutex held only for bookkeeping, never across an `.await`.
//! - A granted slot stays counted even if the send then fails: WeCom may have received it.
//!
//! Waiting keeps order because the core awaits each part before it sends the next. Concurrent
//! callers for the *same* member are not queued first-come-first-served; the core never makes
//! them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// The short window WeCom enforces.
pub(crate) const MINUTE: Duration = Duration::from_secs(60);
/// The long window WeCom enforces.
pub(crate) const HOUR: Duration = Duration::from_secs(3600);
/// Extra time before a slot counts as free: covers the delay between granting a slot and WeCom
/// receiving the message, and clock granularity on WeCom's side.
pub(crate) const SLACK: Duration = Duration::from_secs(1);
/// How often idle members are swept out of memory, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Limits sends per member (`touser`) of one app; one per channel instance, never global.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_minute: usize,
    per_hour: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Send times of the last hour (plus slack) per member, oldest first.
    members: HashMap<String, VecDeque<Instant>>,
    last_sweep: Instant,
}

impl RateLimiter {
    /// A limiter allowing `per_minute` and `per_hour` sends per member (both at least 1; a zero
    /// is treated as 1 so that nothing waits forever).
    pub(crate) fn new(per_minute: u32, per_hour: u32) -> Self {
        let to_usize = |value: u32| usize::try_from(value.max(1)).unwrap_or(usize::MAX);
        Self {
            per_minute: to_usize(per_minute),
            per_hour: to_usize(per_hour),
            state: Mutex::new(State { members: HashMap::new(), last_sweep: Instant::now() }),
        }
    }

    /// Waits until `member` may receive another message, then counts it. Returns how long it
    /// waited, for logging.
    pub(crate) async fn acquire(&self, member: &str) -> Duration {
        let started = Instant::now();
        loop {
            let free_at = {
                let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let now = Instant::now();
                state.sweep(now);
                let sent = state.members.entry(member.to_owned()).or_default();
                expire(sent, now);
                match self.next_free(sent, now) {
                    None => {
                        sent.push_back(now);
                        return now.saturating_duration_since(started);
                    }
                    Some(at) => at,
                }
            };
            tokio::time::sleep_until(free_at).await;
        }
    }

    /// When the next slot frees, or `None` if one is free now. `sent` holds only the last hour.
    fn next_free(&self, sent: &VecDeque<Instant>, now: Instant) -> Option<Instant> {
        let mut free_at: Option<Instant> = None;
        if sent.len() >= self.per_hour {
            // The hour has room again once the per_hour-th most recent send leaves it.
            free_at = sent.get(sent.len() - self.per_hour).map(|&at| at + HOUR + SLACK);
        }
        let in_last_minute = sent.iter().rev().take_while(|&&at| at + MINUTE + SLACK > now).count();
        if in_last_minute >= self.per_minute {
            let minute_free = sent.get(sent.len() - self.per_minute).map(|&at| at + MINUTE + SLACK);
            free_at = free_at.max(minute_free);
        }
        free_at.filter(|&at| at > now)
    }

    /// How many members are remembered (for tests of the memory bound).
    #[cfg(test)]
    fn tracked_members(&self) -> usize {
        self.state.lock().map(|state| state.members.len()).unwrap_or_default()
    }
}

impl State {
    /// Forgets members with no send in the last hour; runs at most once per [`SWEEP_EVERY`].
    fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        self.members.retain(|_, sent| {
            expire(sent, now);
            !sent.is_empty()
        });
    }
}

/// Drops sends that no longer count against the hour.
fn expire(sent: &mut VecDeque<Instant>, now: Instant) {
    while sent.front().is_some_and(|&at| at + HOUR + SLACK <= now) {
        sent.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn the_thirty_first_send_in_a_minute_waits_until_the_window_frees() {
        let limiter = RateLimiter::new(30, 1000);
        let start = Instant::now();
        for _ in 0..30 {
            assert_eq!(limiter.acquire("alice").await, Duration::ZERO);
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        let waited = limiter.acquire("alice").await;
        assert_eq!(waited, MINUTE + SLACK);
        assert_eq!(start.elapsed(), MINUTE + SLACK);
    }

    #[tokio::test(start_paused = true)]
    async fn sends_spread_over_the_minute_free_one_slot_at_a_time() {
        let limiter = RateLimiter::new(3, 1000);
        let start = Instant::now();
        for _ in 0..3 {
            limiter.acquire("alice").await;
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        // Sends at 0, 10, 20 s: the fourth may go when the first leaves the window.
        limiter.acquire("alice").await;
        assert_eq!(start.elapsed(), MINUTE + SLACK);
        // The fifth waits for the second (10 s + 61 s).
        limiter.acquire("alice").await;
        assert_eq!(start.elapsed(), Duration::from_secs(10) + MINUTE + SLACK);
    }

    #[tokio::test(start_paused = true)]
    async fn another_member_is_not_delayed_while_one_waits() {
        let limiter = Arc::new(RateLimiter::new(2, 1000));
        let start = Instant::now();
        limiter.acquire("alice").await;
        limiter.acquire("alice").await;
        let waiting = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire("alice").await }
        });
        tokio::task::yield_now().await;
        assert_eq!(limiter.acquire("bob").await, Duration::ZERO);
        assert_eq!(start.elapsed(), Duration::ZERO);
        let waited = waiting.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(waited, MINUTE + SLACK);
    }

    #[tokio::test(start_paused = true)]
    async fn the_hourly_limit_holds_across_minutes() {
        let limiter = RateLimiter::new(5, 12);
        let start = Instant::now();
        for _ in 0..12 {
            limiter.acquire("alice").await;
        }
        // 12 sends at 5 per minute: 0 s ×5, 61 s ×5, 122 s ×2.
        assert_eq!(start.elapsed(), (MINUTE + SLACK) * 2);
        limiter.acquire("alice").await;
        // The 13th needs the first of the hour to expire.
        assert_eq!(start.elapsed(), HOUR + SLACK);
    }

    #[tokio::test(start_paused = true)]
    async fn members_idle_for_an_hour_are_forgotten() {
        let limiter = RateLimiter::new(30, 1000);
        for member in 0..100 {
            limiter.acquire(&format!("user{member}")).await;
        }
        assert_eq!(limiter.tracked_members(), 100);
        tokio::time::advance(HOUR + SLACK).await;
        limiter.acquire("fresh").await;
        assert_eq!(limiter.tracked_members(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_never_holds_more_than_an_hour_of_timestamps() {
        let limiter = RateLimiter::new(1000, 50);
        for _ in 0..120 {
            limiter.acquire("alice").await;
        }
        let held = limiter.state.lock().map(|s| s.members.get("alice").map_or(0, VecDeque::len)).unwrap_or(0);
        assert!(held <= 50, "{held}");
    }

    #[test]
    fn zero_limits_are_treated_as_one() {
        let limiter = RateLimiter::new(0, 0);
        assert_eq!((limiter.per_minute, limiter.per_hour), (1, 1));
    }
}
