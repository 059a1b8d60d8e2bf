//! A keyed sliding-window rate limiter that makes sends wait instead of being lost.
//!
//! Platforms limit sends per recipient or per chat, and some **silently drop** the excess (WeCom:
//! 30 per minute and 1000 per hour per member, still answering `errcode: 0`). Exceeding such a
//! limit cannot be detected and retried, so the only safe policy is never to exceed it.
//! [`RateLimiter::acquire`] therefore waits (tokio time, so tests can pause it) until every
//! window has room for the key, then records the send.
//!
//! Invariants:
//! - For every key and every window `(count, duration)`, any interval of `duration` holds at most
//!   `count` recorded sends, each counted from the moment its slot was granted. A slot frees
//!   `slack` after the window, for platforms that count when a message *arrives*, a little after
//!   we grant it.
//! - Memory is bounded by activity: a key keeps only the timestamps within the longest window
//!   (so at most that window's count, and never more than the largest count), and keys with no send within the longest window are forgotten by a sweep that runs at most
//!   once per [`MAX_SWEEP_EVERY`] (or per longest window, when that is shorter).
//! - The lock is a `std` mutex held only for bookkeeping, never across an `.await`.
//! - A granted slot stays counted even if the send then fails: the platform may have received it.
//! - Nothing is dropped by [`RateLimiter::acquire`]: a caller waits as long as it takes.
//!   [`RateLimiter::try_acquire`] is for what may be skipped instead.
//!
//! Waiting keeps order when callers await each send before starting the next (the core does).
//! Concurrent callers for the *same* key are not queued first-come-first-served.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How often idle keys are swept out of memory, at most.
pub const MAX_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// One limit: at most `count` sends per key within any `duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Sends allowed in the window; 0 is treated as 1, so that nothing waits forever.
    pub count: u32,
    /// The window's length.
    pub duration: Duration,
}

impl Window {
    /// `count` sends per `duration`.
    pub const fn new(count: u32, duration: Duration) -> Self {
        Self { count, duration }
    }
}

/// Limits sends per key (a member, a chat). One per channel instance, never global: limits are
/// per app.
#[derive(Debug)]
pub struct RateLimiter {
    /// The windows, with counts of at least 1.
    windows: Vec<(usize, Duration)>,
    /// How long after a window a slot counts as free.
    slack: Duration,
    /// Timestamps older than this never matter again: the longest window plus slack.
    horizon: Duration,
    /// Timestamps beyond this many never matter again: the largest count.
    keep: usize,
    sweep_every: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Send times within the horizon per key, oldest first.
    keys: HashMap<String, VecDeque<Instant>>,
    last_sweep: Instant,
}

impl RateLimiter {
    /// A limiter enforcing every one of `windows` per key, with no slack. No windows: nothing
    /// ever waits.
    pub fn new(windows: &[Window]) -> Self {
        let windows: Vec<(usize, Duration)> = windows
            .iter()
            .map(|window| (usize::try_from(window.count.max(1)).unwrap_or(usize::MAX), window.duration))
            .collect();
        let longest = windows.iter().map(|&(_, duration)| duration).max().unwrap_or_default();
        Self {
            keep: windows.iter().map(|&(count, _)| count).max().unwrap_or(0),
            horizon: longest,
            sweep_every: longest.min(MAX_SWEEP_EVERY),
            windows,
            slack: Duration::ZERO,
            state: Mutex::new(State { keys: HashMap::new(), last_sweep: Instant::now() }),
        }
    }

    /// The same limiter, with a slot freeing `slack` after its window rather than right at its
    /// end.
    pub fn with_slack(mut self, slack: Duration) -> Self {
        self.slack = slack;
        self.horizon = self.windows.iter().map(|&(_, duration)| duration).max().unwrap_or_default() + slack;
        self
    }

    /// Waits until `key` may send again, then counts the send. Returns how long it waited, for
    /// logging.
    pub async fn acquire(&self, key: &str) -> Duration {
        let started = Instant::now();
        loop {
            match self.slot(key, true) {
                Ok(granted) => return granted.saturating_duration_since(started),
                Err(free_at) => tokio::time::sleep_until(free_at).await,
            }
        }
    }

    /// Counts a send for `key` if every window has room now, without waiting; `false` (nothing
    /// counted) otherwise. For what may be skipped, such as an intermediate update.
    pub fn try_acquire(&self, key: &str) -> bool {
        self.slot(key, true).is_ok()
    }

    /// When `key` next has room in every window: `None` if it has room now, else the moment a
    /// slot frees. Counts nothing.
    pub fn next_room(&self, key: &str) -> Option<Instant> {
        self.slot(key, false).err()
    }

    /// Whether `key` has room now (`Ok` with the moment, the send counted if `take`) or when a
    /// slot frees.
    fn slot(&self, key: &str, take: bool) -> Result<Instant, Instant> {
        let now = Instant::now();
        if self.keep == 0 {
            return Ok(now);
        }
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.sweep(&mut state, now);
        let sent = state.keys.entry(key.to_owned()).or_default();
        self.expire(sent, now);
        match self.next_free(sent, now) {
            None if !take => Ok(now),
            None => {
                sent.push_back(now);
                if sent.len() > self.keep {
                    sent.pop_front();
                }
                Ok(now)
            }
            Some(at) => Err(at),
        }
    }

    /// When the next slot frees, or `None` if one is free now.
    fn next_free(&self, sent: &VecDeque<Instant>, now: Instant) -> Option<Instant> {
        let mut free_at: Option<Instant> = None;
        for &(count, duration) in &self.windows {
            let frees = |at: Instant| at + duration + self.slack;
            let in_window = sent.iter().rev().take_while(|&&at| frees(at) > now).count();
            if in_window >= count {
                // The window has room again once the count-th most recent send leaves it.
                let window_free = sent.get(sent.len() - count).map(|&at| frees(at));
                free_at = free_at.max(window_free);
            }
        }
        free_at.filter(|&at| at > now)
    }

    /// Drops sends that no longer count against any window.
    fn expire(&self, sent: &mut VecDeque<Instant>, now: Instant) {
        while sent.front().is_some_and(|&at| at + self.horizon <= now) {
            sent.pop_front();
        }
    }

    /// Forgets keys with no send within the horizon; runs at most once per `sweep_every`.
    fn sweep(&self, state: &mut State, now: Instant) {
        if now.saturating_duration_since(state.last_sweep) < self.sweep_every {
            return;
        }
        state.last_sweep = now;
        state.keys.retain(|_, sent| {
            self.expire(sent, now);
            !sent.is_empty()
        });
    }

    /// How many keys are remembered (for tests of the memory bound).
    #[cfg(test)]
    fn tracked_keys(&self) -> usize {
        self.state.lock().map(|state| state.keys.len()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);
    const SLACK: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn try_acquire_counts_what_fits_and_never_waits() {
        let limiter = RateLimiter::new(&[Window::new(2, MINUTE)]);
        assert!(limiter.try_acquire("a") && limiter.try_acquire("a"));
        assert!(!limiter.try_acquire("a"), "a third in the minute");
        assert!(limiter.try_acquire("b"), "another key has its own room");
        tokio::time::advance(MINUTE).await;
        assert!(limiter.try_acquire("a"));
        // What a refused try did not count leaves room for waiting callers as before.
        assert_eq!(limiter.acquire("a").await, Duration::ZERO);
    }

    /// WeCom's shape: per minute and per hour, one second of slack.
    fn wecom(per_minute: u32, per_hour: u32) -> RateLimiter {
        RateLimiter::new(&[Window::new(per_minute, MINUTE), Window::new(per_hour, HOUR)]).with_slack(SLACK)
    }

    #[tokio::test(start_paused = true)]
    async fn the_thirty_first_send_in_a_minute_waits_until_the_window_frees() {
        let limiter = wecom(30, 1000);
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
        let limiter = wecom(3, 1000);
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
    async fn another_key_is_not_delayed_while_one_waits() {
        let limiter = Arc::new(wecom(2, 1000));
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
    async fn the_longer_window_holds_across_short_ones() {
        let limiter = wecom(5, 12);
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
    async fn without_slack_the_sixth_send_in_a_second_waits_exactly_for_the_window() {
        let limiter = RateLimiter::new(&[Window::new(5, Duration::from_secs(1))]);
        let start = Instant::now();
        for _ in 0..5 {
            assert_eq!(limiter.acquire("oc_chat").await, Duration::ZERO);
        }
        assert_eq!(limiter.acquire("oc_chat").await, Duration::from_secs(1));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_idle_for_the_longest_window_are_forgotten() {
        let limiter = wecom(30, 1000);
        for key in 0..100 {
            limiter.acquire(&format!("user{key}")).await;
        }
        assert_eq!(limiter.tracked_keys(), 100);
        tokio::time::advance(HOUR + SLACK).await;
        limiter.acquire("fresh").await;
        assert_eq!(limiter.tracked_keys(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_of_a_short_window_are_swept_within_that_window() {
        let limiter = RateLimiter::new(&[Window::new(5, Duration::from_secs(1))]);
        for key in 0..100 {
            limiter.acquire(&format!("oc_{key}")).await;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        limiter.acquire("fresh").await;
        assert_eq!(limiter.tracked_keys(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_never_holds_more_than_the_longest_window_of_timestamps() {
        let limiter = wecom(1000, 50);
        for _ in 0..120 {
            limiter.acquire("alice").await;
        }
        let held = limiter.state.lock().map(|s| s.keys.get("alice").map_or(0, VecDeque::len)).unwrap_or(0);
        assert!(held <= 50, "{held}");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_counts_are_treated_as_one_and_no_windows_never_wait() {
        let limiter = RateLimiter::new(&[Window::new(0, MINUTE)]);
        assert_eq!(limiter.acquire("a").await, Duration::ZERO);
        assert_eq!(limiter.acquire("a").await, MINUTE);
        let unlimited = RateLimiter::new(&[]);
        for _ in 0..100 {
            assert_eq!(unlimited.acquire("a").await, Duration::ZERO);
        }
        assert_eq!(unlimited.tracked_keys(), 0);
    }
}
