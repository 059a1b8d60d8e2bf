//! An in-memory [`Store`]: fast and lost on restart; for tests and trials.
//!
//! It keeps dedupe claims and history, but no journal or outbox: those exist to be read back
//! after a restart, and a memory store always starts empty, so `unfinished` has nothing to
//! return and keeping copies of every envelope would only cost time and memory.
//!
//! Memory stays bounded while pruning runs (`retention_days` > 0): dedupe keys expire and are
//! swept, history keeps a fixed number of turns per conversation, and `prune` forgets turns
//! older than its cutoff (the retention period), and conversations left empty, as the SQLite
//! store deletes old history. With pruning off, every conversation ever seen keeps its turns.

use super::{Acceptance, LiveStream, ParkedUser, Store, StoreError, Turn, Unfinished};
use dashmap::DashMap;

/// Fast, randomly seeded hashing: keys come from platforms, so not a fixed-seed hash.
type Hasher = foldhash::fast::RandomState;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use yizhan_channel_core::{BoxFuture, Delivery, Envelope};

/// One conversation's kept turns, oldest first, each with when it was added and the envelope
/// it answered (none for `append_turn`'s).
#[derive(Debug, Default)]
struct Conversation {
    turns: VecDeque<(SystemTime, Turn, Option<String>)>,
}

/// How often expired dedupe claims are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// See the module docs.
#[derive(Debug)]
pub struct MemoryStore {
    /// `channel \0 platform message id` → when the claim expires.
    dedupe: DashMap<String, Instant, Hasher>,
    history: DashMap<String, Conversation, Hasher>,
    /// Turns kept per conversation; older ones are never sent to the model anyway.
    max_turns_kept: usize,
    /// When the dedupe map is next swept of expired keys.
    sweeps: Mutex<yizhan_channel_common::SweepClock>,
    /// Tests: `clear_history` and `finish` fail, as a broken SQLite store's would.
    #[cfg(test)]
    pub(crate) refuse_writes: std::sync::atomic::AtomicBool,
    /// Tests: `record_answer` fails, as a SQLite store's whose disk is full (not broken: it
    /// may succeed later).
    #[cfg(test)]
    pub(crate) refuse_records: std::sync::atomic::AtomicBool,
    /// Tests: broken for good, as the SQLite store after a failed fsync: `health` says so, and
    /// recording answers, clearing parts and finishing fail.
    #[cfg(test)]
    pub(crate) broken: std::sync::atomic::AtomicBool,
    /// Tests: finishes that succeeded.
    #[cfg(test)]
    pub(crate) finished: std::sync::atomic::AtomicUsize,
}

impl MemoryStore {
    /// A store keeping at most `max_turns_kept` turns per conversation.
    pub fn new(max_turns_kept: usize) -> Self {
        Self {
            dedupe: DashMap::with_hasher(Hasher::default()),
            history: DashMap::with_hasher(Hasher::default()),
            max_turns_kept: max_turns_kept.max(1),
            sweeps: Mutex::default(),
            #[cfg(test)]
            refuse_writes: Default::default(),
            #[cfg(test)]
            refuse_records: Default::default(),
            #[cfg(test)]
            broken: Default::default(),
            #[cfg(test)]
            finished: Default::default(),
        }
    }

    fn sweep_expired(&self, now: Instant) {
        let due = self.sweeps.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).due(now, SWEEP_EVERY);
        if due {
            self.dedupe.retain(|_, expires| *expires > now);
        }
    }

    fn accept_now(&self, envelope: &Envelope, dedupe_ttl: Duration) -> Acceptance {
        let now = Instant::now();
        self.sweep_expired(now);
        let key = format!("{}\0{}", envelope.channel, envelope.platform_message_id);
        let mut claimed = false;
        self.dedupe
            .entry(key)
            .and_modify(|expires| {
                if *expires <= now {
                    *expires = now + dedupe_ttl;
                    claimed = true;
                }
            })
            .or_insert_with(|| {
                claimed = true;
                now + dedupe_ttl
            });
        if claimed {
            Acceptance::New
        } else {
            Acceptance::Duplicate
        }
    }

    /// Tests: whether a write fails, `also_when_refusing` counting [`MemoryStore::refuse_writes`].
    #[cfg(test)]
    fn fails_writes(&self, also_when_refusing: bool) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.broken.load(SeqCst) || also_when_refusing && self.refuse_writes.load(SeqCst)
    }

    fn push_turn(&self, session_key: &str, turn: Turn, envelope_id: Option<&str>) {
        let mut conversation = self.history.entry(session_key.to_owned()).or_default();
        let turns = &mut conversation.turns;
        turns.push_back((SystemTime::now(), turn, envelope_id.map(str::to_owned)));
        while turns.len() > self.max_turns_kept {
            turns.pop_front();
        }
    }
}

impl Store for MemoryStore {
    fn accept<'a>(
        &'a self,
        envelope: &'a Envelope,
        dedupe_ttl: Duration,
    ) -> BoxFuture<'a, Result<Acceptance, StoreError>> {
        let acceptance = self.accept_now(envelope, dedupe_ttl);
        Box::pin(async move { Ok(acceptance) })
    }

    fn record_answer<'a>(
        &'a self,
        envelope_id: &'a str,
        session_key: &'a str,
        turn: Option<Turn>,
        _parts: &'a [Delivery],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        #[cfg(test)]
        if self.fails_writes(false) || self.refuse_records.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError::Backend("broken for a test".into())) });
        }
        if let Some(turn) = turn {
            self.push_turn(session_key, turn, Some(envelope_id));
        }
        Box::pin(async { Ok(()) })
    }

    fn part_delivered<'a>(&'a self, _delivery_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        #[cfg(test)]
        if self.fails_writes(false) {
            return Box::pin(async { Err(StoreError::Backend("broken for a test".into())) });
        }
        Box::pin(async { Ok(()) })
    }

    fn part_failed<'a>(&'a self, _delivery_id: &'a str, _reason: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        #[cfg(test)]
        if self.fails_writes(true) {
            return Box::pin(async { Err(StoreError::Backend("refused for a test".into())) });
        }
        Box::pin(async { Ok(()) })
    }

    fn save_parked(&self, _: Vec<ParkedUser>) -> BoxFuture<'_, Result<(), StoreError>> {
        // Nothing here outlives the process.
        Box::pin(async { Ok(()) })
    }

    fn load_parked(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn record_stream<'a>(&'a self, _: &'a str, _: &'a LiveStream) -> BoxFuture<'a, Result<(), StoreError>> {
        // Nothing here outlives the process, so no later run could resume the stream.
        Box::pin(async { Ok(()) })
    }

    fn finish<'a>(&'a self, _envelope_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        #[cfg(test)]
        {
            if self.fails_writes(true) {
                return Box::pin(async { Err(StoreError::Backend("refused for a test".into())) });
            }
            self.finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Box::pin(async { Ok(()) })
    }

    #[cfg(test)]
    fn health(&self) -> Result<(), String> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("broken for a test".into());
        }
        Ok(())
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<Unfinished>, StoreError>> {
        // A memory store starts empty with its process: there is never anything to resume.
        Box::pin(async { Ok(Vec::new()) })
    }

    fn prune(&self, before: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        // Claims are swept by expiry and there is no journal: only old turns go, as in SQLite.
        let mut pruned = 0u64;
        self.history.retain(|_, conversation| {
            let turns = &mut conversation.turns;
            while turns.front().is_some_and(|(added, _, _)| *added < before) {
                turns.pop_front();
                pruned = pruned.saturating_add(1);
            }
            !turns.is_empty()
        });
        Box::pin(async move { Ok(pruned) })
    }

    fn history<'a>(&'a self, session_key: &'a str, max_turns: usize) -> BoxFuture<'a, Result<Vec<Turn>, StoreError>> {
        let turns = self
            .history
            .get(session_key)
            .map(|conversation| {
                let turns = &conversation.turns;
                let skip = turns.len().saturating_sub(max_turns);
                turns.iter().skip(skip).map(|(_, turn, _)| turn.clone()).collect()
            })
            .unwrap_or_default();
        Box::pin(async move { Ok(turns) })
    }

    fn append_turn<'a>(&'a self, session_key: &'a str, turn: Turn) -> BoxFuture<'a, Result<(), StoreError>> {
        self.push_turn(session_key, turn, None);
        Box::pin(async { Ok(()) })
    }

    fn forget_turn<'a>(&'a self, envelope_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        // Every conversation is looked through: rare (an answer refused for good), and a test
        // and trial store.
        for mut conversation in self.history.iter_mut() {
            conversation.turns.retain(|(_, _, answered)| answered.as_deref() != Some(envelope_id));
        }
        Box::pin(async { Ok(()) })
    }

    fn clear_history<'a>(&'a self, session_key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        #[cfg(test)]
        if self.refuse_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError::Backend("refused for a test".into())) });
        }
        self.history.remove(session_key);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::test_envelope as envelope;

    #[tokio::test]
    async fn a_message_id_is_accepted_once_within_the_window() {
        let store = MemoryStore::new(10);
        let ttl = Duration::from_secs(60);
        let first = envelope("m1");
        assert_eq!(store.accept(&first, ttl).await.ok(), Some(Acceptance::New));
        assert_eq!(store.accept(&envelope("m1"), ttl).await.ok(), Some(Acceptance::Duplicate));
        assert_eq!(store.accept(&envelope("m2"), ttl).await.ok(), Some(Acceptance::New));
        let _ = store.finish(&first.id).await;
        // Finishing does not release the claim: a late platform retry is still a duplicate.
        assert_eq!(store.accept(&envelope("m1"), ttl).await.ok(), Some(Acceptance::Duplicate));
    }

    #[tokio::test]
    async fn an_expired_claim_can_be_taken_again() {
        let store = MemoryStore::new(10);
        assert_eq!(store.accept(&envelope("m1"), Duration::ZERO).await.ok(), Some(Acceptance::New));
        assert_eq!(store.accept(&envelope("m1"), Duration::ZERO).await.ok(), Some(Acceptance::New));
    }

    #[tokio::test]
    async fn history_keeps_the_most_recent_turns_and_can_be_cleared() {
        let store = MemoryStore::new(3);
        for i in 0..5 {
            let _ = store.append_turn("k", Turn { question: format!("q{i}"), answer: format!("a{i}") }).await;
        }
        let turns = store.history("k", 2).await.unwrap_or_default();
        assert_eq!(turns.iter().map(|t| t.question.as_str()).collect::<Vec<_>>(), ["q3", "q4"]);
        assert_eq!(store.history("k", 10).await.unwrap_or_default().len(), 3);
        let _ = store.clear_history("k").await;
        assert!(store.history("k", 10).await.unwrap_or_default().is_empty());
    }

    #[tokio::test]
    async fn pruning_forgets_turns_older_than_the_cutoff_even_in_active_conversations() {
        let store = MemoryStore::new(3);
        let turn = |i: usize| Turn { question: format!("q{i}"), answer: format!("a{i}") };
        for i in 0..2 {
            let _ = store.append_turn("idle", turn(i)).await;
            let _ = store.append_turn("active", turn(i)).await;
        }
        let _ = store.append_turn("active", turn(9)).await;
        // The first two turns of each conversation are from long ago.
        for key in ["idle", "active"] {
            if let Some(mut conversation) = store.history.get_mut(key) {
                for (added, _, _) in conversation.turns.iter_mut().take(2) {
                    *added = SystemTime::UNIX_EPOCH;
                }
            }
        }
        let cutoff = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        assert_eq!(store.prune(cutoff).await.ok(), Some(4));
        assert!(store.history("idle", 10).await.unwrap_or_default().is_empty());
        assert!(!store.history.contains_key("idle"), "an emptied conversation goes too");
        let active = store.history("active", 10).await.unwrap_or_default();
        assert_eq!(active.iter().map(|t| t.question.as_str()).collect::<Vec<_>>(), ["q9"]);
    }
}
