//! When to ask WeCom for its duplicate check.
//!
//! WeCom's check drops a message identical to one sent to the same member within its window. That
//! keeps a part resent after a lost answer (or after a quick restart) from showing twice, but it
//! also swallows a different message that happens to have the same text: the hub's fixed texts
//! (the apology while the model is down, "I only read text" for a second picture, the reset
//! confirmation) and an answer repeated word for word. So the channel remembers, per member and
//! text, when it last sent the text and which part sent it with the check: that part sent again
//! keeps the check, even after other parts sent the same text meanwhile; a different part with
//! the same text goes without it, and so do its resends (with the check on, WeCom would drop
//! them as copies of the earlier message, and the part would never show). The price: a failure
//! of such a send after it went out (its answer lost) is `MaybeDelivered`, sent once more at
//! most, so it may show twice, which beats never (and beats once per resend). The price of the
//! checked part keeping its check: if its first send never arrived, WeCom may drop the resend
//! as a copy of the other part, and the user has the text once where two answers said it.
//!
//! The memory outlasts WeCom's window by a margin (the caller's): WeCom counts from when a
//! message arrives, a little after the send began, and a text remembered too briefly would ask
//! for the check while WeCom still holds the earlier copy, which drops the new part unseen.
//!
//! After a restart nothing is remembered of the last run's sends. A part of a message the last
//! run accepted (resumed now) has the check on at its first send here: if that run sent it and
//! lost the answer, the resend is dropped. A part of a message of this run, within one window
//! of the start, goes without it: the last run may have sent the same text to the member just
//! before it stopped (the apology while the model was down), which the check would swallow,
//! and a part never shown is worse than one shown twice.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Hashing with a random seed per process: the texts come from users and models.
type Hasher = std::collections::hash_map::RandomState;

/// The sends of one text to one member.
#[derive(Debug)]
struct TextSends {
    /// The last send of the text, by any part.
    last_at: Instant,
    /// The part that sent it with the check, and its last send.
    checked: Option<(String, Instant)>,
}

/// Recent sends by (member, hash of the text), for [`duplicate_check`](Self::duplicate_check).
#[derive(Debug)]
pub(crate) struct RecentSends {
    window: Duration,
    /// From when this run's memory covers a whole window (see the module docs).
    memory_complete_at: Instant,
    hasher: Hasher,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    sends: HashMap<(String, u64), TextSends, Hasher>,
    sweeps: yizhan_channel_common::SweepClock,
}

impl RecentSends {
    /// Remembers sends for `window` (WeCom's duplicate-check interval and a margin for the
    /// time a send takes to arrive).
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            memory_complete_at: Instant::now() + window,
            hasher: Hasher::default(),
            state: Mutex::new(State { sends: HashMap::with_hasher(Hasher::default()), sweeps: Default::default() }),
        }
    }

    /// Whether the send of `delivery_id` with `text` to `member` should ask for WeCom's
    /// duplicate check (and records it): yes for the first send of a text within the window
    /// and for every resend of the same part; no for a different part with the same text, nor
    /// (within a window of the start) for a part of a message not `from_an_earlier_run`, whose
    /// text the last run may have sent.
    pub(crate) fn duplicate_check(
        &self,
        member: &str,
        text: &str,
        delivery_id: &str,
        from_an_earlier_run: bool,
    ) -> bool {
        let now = Instant::now();
        let key = (member.to_owned(), self.hasher.hash_one(text));
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let window = self.window;
        if state.sweeps.due(now, window) {
            // Bounded by the sends of one window.
            state.sends.retain(|_, sends| now.duration_since(sends.last_at) < window);
        }
        let live = |at: Instant| now.duration_since(at) < window;
        let Some(sends) = state.sends.get_mut(&key) else {
            let checked = from_an_earlier_run || now >= self.memory_complete_at;
            let checked_part = checked.then(|| (delivery_id.to_owned(), now));
            state.sends.insert(key, TextSends { last_at: now, checked: checked_part });
            return checked;
        };
        let checked = match &sends.checked {
            Some((part, at)) if part == delivery_id && live(*at) => true,
            _ if live(sends.last_at) => false,
            _ => from_an_earlier_run || now >= self.memory_complete_at,
        };
        if checked {
            sends.checked = Some((delivery_id.to_owned(), now));
        }
        sends.last_at = now;
        checked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the first window of the run (its memory complete), as for parts of earlier runs.
    fn after_the_first_window() -> RecentSends {
        let mut sends = RecentSends::new(Duration::from_secs(600));
        sends.memory_complete_at = Instant::now();
        sends
    }

    #[test]
    fn a_resend_keeps_the_check_and_a_different_part_with_the_same_text_goes_without() {
        let sends = after_the_first_window();
        assert!(sends.duplicate_check("u", "抱歉", "e1-0", false));
        assert!(sends.duplicate_check("u", "抱歉", "e1-0", false), "a resend of the same part");
        assert!(!sends.duplicate_check("u", "抱歉", "e2-0", false), "the same text as another message");
        assert!(!sends.duplicate_check("u", "抱歉", "e2-0", false), "its resend is sent as it was first");
        assert!(sends.duplicate_check("v", "抱歉", "e3-0", false), "another member");
        assert!(sends.duplicate_check("u", "别的", "e4-0", false), "another text");
    }

    #[test]
    fn a_resend_keeps_the_check_after_another_part_sent_the_same_text() {
        let sends = after_the_first_window();
        assert!(sends.duplicate_check("u", "抱歉", "e1-0", false));
        assert!(!sends.duplicate_check("u", "抱歉", "e2-0", false), "the same text as another message");
        assert!(sends.duplicate_check("u", "抱歉", "e1-0", false), "the first part's resend");
        assert!(!sends.duplicate_check("u", "抱歉", "e2-0", false), "the second part's resend");
    }

    #[test]
    fn a_checked_part_long_gone_leaves_the_check_off_while_the_text_was_sent_since() {
        let sends = after_the_first_window();
        assert!(sends.duplicate_check("u", "抱歉", "e1-0", false));
        // A machine up for less than a window cannot date a send that far back.
        let Some(a_window_ago) = Instant::now().checked_sub(sends.window) else { return };
        {
            let mut state = sends.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for text_sends in state.sends.values_mut() {
                text_sends.checked = text_sends.checked.take().map(|(part, _)| (part, a_window_ago));
            }
        }
        assert!(!sends.duplicate_check("u", "抱歉", "e2-0", false), "the text was sent within the window");
        assert!(!sends.duplicate_check("u", "抱歉", "e1-0", false), "WeCom would take it for a copy of e2-0");
    }

    #[test]
    fn within_a_window_of_the_start_only_parts_of_earlier_runs_have_the_check() {
        let sends = RecentSends::new(Duration::from_secs(600));
        assert!(sends.duplicate_check("u", "抱歉", "e1-0", true), "resumed: the last run may have sent it");
        assert!(!sends.duplicate_check("v", "抱歉", "e2-0", false), "the last run may have sent the text");
        assert!(!sends.duplicate_check("v", "抱歉", "e2-0", false), "its resend is sent as it was first");
    }

    #[test]
    fn sends_older_than_the_window_are_forgotten() {
        let sends = RecentSends::new(Duration::ZERO);
        assert!(sends.duplicate_check("u", "抱歉", "e1-0", false));
        assert!(sends.duplicate_check("u", "抱歉", "e2-0", false));
        let state = sends.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        assert!(state.sends.len() <= 1, "swept");
    }
}
