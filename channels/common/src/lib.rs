//! Helpers shared by Yizhan's platform channels (`yizhan-channel-wechat-mp`, `-wecom`,
//! `-feishu`), so that each lives once, with its tests.
//!
//! # Layout
//! - [`split`]: long text → parts of at most N bytes, cut at paragraph, line, sentence or word
//!   breaks.
//! - [`markdown`]: LLM markdown → plain text, or the basic markdown subset some platforms render.
//! - [`limiter`]: a keyed sliding-window rate limiter whose `acquire` waits for a free slot
//!   (`try_acquire` and `next_room` for what may be skipped instead).
//! - [`xml`]: flat XML pushes (WeChat, WeCom) → fields by element name.
//! - [`wechat`]: the WeChat family's pushes (公众号, 企业微信): required fields, the segment of
//!   each message type, the dedupe key; text without the control characters they refuse.
//! - [`api`]: log-once bookkeeping for misconfiguration codes, secret scrubbing, transport
//!   errors without URLs, the WeChat family's `errcode`, HTTP statuses as `ChannelError`s,
//!   retries of transient errors.
//!
//! # Design decisions
//! - **Helpers, not contract.** The contract crate (`yizhan-channel-core`) says what a channel
//!   is; this crate only holds code that several channels would otherwise copy. [`wechat`]
//!   builds the contract's segments and [`api`] its errors (`ChannelError`); elsewhere errors
//!   are plain values ([`xml::MalformedXml`], reason strings) that each channel maps itself.
//! - **Platform-specific behaviour stays configurable, not forked.** Where channels differed
//!   (WeCom drops `<font>` tags from text messages; WeCom waits a second of slack after each
//!   window; WeCom matches field names without case), the difference is a parameter here.
//! - **Tokio time.** The limiter sleeps with `tokio::time`, so channel tests drive it with paused
//!   time.
#![warn(missing_docs)]

pub mod api;
pub mod limiter;
pub mod markdown;
pub mod split;
pub mod wechat;
pub mod xml;

pub use limiter::{RateLimiter, Window};
pub use split::split_text;

use std::time::{Duration, Instant};

/// When a map's expired entries are next swept out: at most once per period, by whoever passes
/// by (an insert, a lookup), with no task of its own. Keeps memory bounded by what one period
/// adds.
#[derive(Debug, Default)]
pub struct SweepClock {
    last: Option<Instant>,
}

impl SweepClock {
    /// Whether a sweep is due at `now` (the first call, or `period` since the last sweep); if
    /// so, it counts as done at `now`.
    pub fn due(&mut self, now: Instant, period: Duration) -> bool {
        let due = self.last.is_none_or(|last| now.duration_since(last) >= period);
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// Milliseconds since the Unix epoch (the contract's: an envelope's `received_at_ms`).
pub use yizhan_channel_core::unix_millis;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_is_due_at_first_then_once_per_period() {
        let mut clock = SweepClock::default();
        let start = Instant::now();
        let period = Duration::from_secs(30);
        assert!(clock.due(start, period));
        assert!(!clock.due(start + Duration::from_secs(29), period));
        assert!(clock.due(start + Duration::from_secs(30), period));
        assert!(!clock.due(start + Duration::from_secs(31), period));
    }
}
