//! The SQLite store's live dedupe claims, held in memory by its inbound log thread.
//!
//! Why in memory: platform message ids arrive in no particular order (Feishu's and WeCom's are
//! random), so a B-tree keyed on them takes one random page write per accepted message, and at
//! group-commit rates those pages were the largest part of every commit. Instead each accept
//! record of the inbound log carries its claim (a digest and an expiry), which appends, and the
//! log thread — the only thread that accepts — answers "seen before?" from this map. At startup
//! the map is rebuilt from the records (and from schema 1 and 2 rows) whose claims are still
//! live, so retries that arrive after a restart are still recognised.
//!
//! Memory: one map entry and one queue entry (together about 80 bytes) per message accepted
//! within the dedupe window.

use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};

/// A claim's identity: the first 128 bits of SHA-256 over `channel \0 platform message id`.
/// Fixed-size (a map entry costs the same whatever the ids' lengths), stable across versions
/// (it is stored), and collision-free in practice (2^-64 even for a billion live claims).
pub type ClaimKey = [u8; 16];

/// The digest of `(channel, platform_message_id)`.
pub fn claim_key(channel: &str, platform_message_id: &str) -> ClaimKey {
    let digest = Sha256::new()
        .chain_update(channel.as_bytes())
        .chain_update([0])
        .chain_update(platform_message_id.as_bytes())
        .finalize();
    let mut key = [0; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// Live claims (key → expiry in Unix ms), with an undo log for the batch in progress.
///
/// A claim taken inside a batch counts at once (a retry in the same batch is a
/// duplicate), but if the batch fails to be written, [`Claims::discard_staged`] puts back what
/// was there before, so an accept that failed leaves no claim behind.
///
/// Sweeping never scans the map (millions of claims with the default 24-hour window, on the
/// thread every acknowledgement waits for): claims also queue up in the order they were taken,
/// which is their expiry order while the dedupe window stays the same, and a sweep pops the
/// expired ones off the front. After the window is lengthened, a longer-lived claim at the
/// front holds back the sweep of shorter ones behind it until it expires; they still stop
/// counting on time, they just stay in memory a little longer.
///
/// Neither structure ever grows all at once: a hash map or a `VecDeque` that doubles copies
/// every entry in one go, and with millions of claims a single map stalled every
/// acknowledgement for 60 ms as it passed 1.8 million (`longest_batch_while_claims_pile_up`;
/// about 0.5 ms now). The map is split into [`SHARDS`] maps by the key's first byte (the keys
/// are digests, so they spread evenly and the shards grow one at a time), and the queue is a
/// queue of fixed-size chunks.
#[derive(Debug)]
pub struct Claims {
    live: Vec<HashMap<ClaimKey, i64, foldhash::fast::RandomState>>,
    /// Claims in the order they were taken (committed), with their expiry.
    by_age: ChunkedQueue<(i64, ClaimKey)>,
    /// Each claim of the batch in progress: its key, what it replaced, its expiry.
    undo: Vec<(ClaimKey, Option<i64>, i64)>,
}

/// How many maps the live claims are split into; a power of two up to 256 (the shard is
/// picked by the key's first byte).
const SHARDS: usize = 256;

impl Default for Claims {
    fn default() -> Self {
        Self {
            live: (0..SHARDS).map(|_| HashMap::default()).collect(),
            by_age: ChunkedQueue::default(),
            undo: Vec::new(),
        }
    }
}

impl Claims {
    /// The claims read back from disk at startup; for a key found twice, the later expiry wins.
    pub fn restored(mut claims: Vec<(ClaimKey, i64)>) -> Self {
        claims.sort_unstable_by_key(|(_, expires_at)| *expires_at);
        let mut restored = Self::default();
        for (key, expires_at) in claims {
            restored.shard_mut(&key).insert(key, expires_at);
            restored.by_age.push_back((expires_at, key));
        }
        restored
    }

    /// Whether `key` is claimed and unexpired at `now`.
    pub fn is_claimed(&self, key: &ClaimKey, now: i64) -> bool {
        self.shard(key).get(key).is_some_and(|expires_at| *expires_at > now)
    }

    /// Takes `key` until `expires_at`, undone if the batch fails.
    pub fn stage(&mut self, key: ClaimKey, expires_at: i64) {
        let replaced = self.shard_mut(&key).insert(key, expires_at);
        self.undo.push((key, replaced, expires_at));
    }

    /// The batch is on disk: its claims stay.
    pub fn commit_staged(&mut self) {
        for (key, _, expires_at) in self.undo.drain(..) {
            self.by_age.push_back((expires_at, key));
        }
    }

    /// The batch failed: its claims never happened.
    pub fn discard_staged(&mut self) {
        for (key, replaced, _) in self.undo.drain(..).rev() {
            let shard = &mut self.live[shard_of(&key)];
            match replaced {
                Some(expires_at) => shard.insert(key, expires_at),
                None => shard.remove(&key),
            };
        }
    }

    /// Forgets the claims expired at `now`, oldest first; returns how many went. Costs what
    /// expired, not what is live.
    pub fn sweep(&mut self, now: i64) -> usize {
        let mut swept = 0;
        while let Some(&(expires_at, key)) = self.by_age.front().filter(|(expires_at, _)| *expires_at <= now) {
            self.by_age.pop_front();
            // A key taken again since has a later entry further back; that one removes it.
            let shard = self.shard_mut(&key);
            if shard.get(&key) == Some(&expires_at) {
                shard.remove(&key);
                swept += 1;
            }
        }
        swept
    }

    /// Live claims (for tests and logs).
    pub fn len(&self) -> usize {
        self.live.iter().map(HashMap::len).sum()
    }

    fn shard(&self, key: &ClaimKey) -> &HashMap<ClaimKey, i64, foldhash::fast::RandomState> {
        &self.live[shard_of(key)]
    }

    fn shard_mut(&mut self, key: &ClaimKey) -> &mut HashMap<ClaimKey, i64, foldhash::fast::RandomState> {
        &mut self.live[shard_of(key)]
    }
}

fn shard_of(key: &ClaimKey) -> usize {
    usize::from(key[0]) % SHARDS
}

/// A FIFO queue kept in chunks of [`ChunkedQueue::CHUNK`] entries, so that growing it
/// allocates one more chunk instead of copying everything queued.
#[derive(Debug)]
struct ChunkedQueue<T> {
    chunks: VecDeque<VecDeque<T>>,
}

impl<T> Default for ChunkedQueue<T> {
    fn default() -> Self {
        Self { chunks: VecDeque::new() }
    }
}

impl<T> ChunkedQueue<T> {
    const CHUNK: usize = 4096;

    fn push_back(&mut self, item: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < Self::CHUNK => last.push_back(item),
            _ => {
                let mut chunk = VecDeque::with_capacity(Self::CHUNK);
                chunk.push_back(item);
                self.chunks.push_back(chunk);
            }
        }
    }

    fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(VecDeque::front)
    }

    fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front_mut()?;
        let item = first.pop_front();
        if first.is_empty() {
            self.chunks.pop_front();
        }
        item
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.chunks.iter().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_both_parts_and_their_boundary() {
        assert_eq!(claim_key("mp", "1"), claim_key("mp", "1"));
        assert_ne!(claim_key("mp", "1"), claim_key("mp", "2"));
        assert_ne!(claim_key("mp", "1"), claim_key("wecom", "1"));
        assert_ne!(claim_key("ab", "c"), claim_key("a", "bc"));
    }

    #[test]
    fn a_staged_claim_counts_at_once_and_survives_only_a_commit() {
        let mut claims = Claims::default();
        let key = claim_key("mp", "1");
        claims.stage(key, 100);
        assert!(claims.is_claimed(&key, 50));
        claims.discard_staged();
        assert!(!claims.is_claimed(&key, 50));
        claims.stage(key, 100);
        claims.commit_staged();
        assert!(claims.is_claimed(&key, 50));
        // Re-taking an expired claim that then rolls back restores the old expiry.
        claims.stage(key, 500);
        claims.stage(claim_key("mp", "2"), 500);
        claims.discard_staged();
        assert!(claims.is_claimed(&key, 99) && !claims.is_claimed(&key, 100));
        assert_eq!(claims.len(), 1);
    }

    #[test]
    fn expired_claims_do_not_count_and_are_swept_oldest_first() {
        let (old, new, retaken) = (claim_key("mp", "old"), claim_key("mp", "new"), claim_key("mp", "again"));
        let mut claims = Claims::restored(vec![(new, 100), (old, 10), (new, 50), (retaken, 20)]);
        assert!(!claims.is_claimed(&old, 10));
        assert!(claims.is_claimed(&new, 99));
        // Taken again after it lapsed: sweeping its first expiry must not remove it.
        claims.stage(retaken, 200);
        claims.commit_staged();
        assert_eq!(claims.sweep(20), 1);
        assert!(claims.is_claimed(&retaken, 150));
        assert_eq!(claims.len(), 2);
        assert_eq!(claims.sweep(100), 1);
        assert_eq!(claims.sweep(200), 1);
        assert_eq!(claims.len(), 0);
    }

    #[test]
    fn a_rolled_back_claim_is_never_swept_into_or_out_of_the_queue() {
        let mut claims = Claims::default();
        let key = claim_key("mp", "1");
        claims.stage(key, 10);
        claims.discard_staged();
        assert_eq!(claims.sweep(10), 0);
        assert_eq!(claims.by_age.len(), 0);
    }

    #[test]
    fn claims_spread_over_shards_and_chunks_sweep_in_order() {
        let mut claims = Claims::default();
        let count = 3 * ChunkedQueue::<(i64, ClaimKey)>::CHUNK + 5;
        let key = |n: usize| claim_key("mp", &n.to_string());
        for n in 0..count {
            claims.stage(key(n), n as i64 + 1);
            claims.commit_staged();
        }
        assert!(claims.live.iter().filter(|shard| !shard.is_empty()).count() > SHARDS / 2);
        assert_eq!((claims.len(), claims.by_age.len()), (count, count));
        let half = (count / 2) as i64;
        assert_eq!(claims.sweep(half), count / 2);
        assert!(!claims.is_claimed(&key(count / 2 - 1), 0));
        assert!((count / 2..count).all(|n| claims.is_claimed(&key(n), half)));
        assert_eq!(claims.sweep(i64::MAX), count - count / 2);
        assert_eq!((claims.len(), claims.by_age.len(), claims.by_age.chunks.len()), (0, 0, 0));
    }

    /// The longest a batch of 14 claims takes to stage and commit while 2 million are taken
    /// (a hash map or queue that doubles at once stalls every acknowledgement behind it):
    /// `cargo test --release --lib -p yizhan store::claims -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn longest_batch_while_claims_pile_up() {
        let mut claims = Claims::default();
        let (mut longest, mut at) = (std::time::Duration::ZERO, 0);
        let started = std::time::Instant::now();
        for batch in 0..(2_000_000 / 14) {
            let began = std::time::Instant::now();
            for n in 0..14 {
                claims.stage(claim_key("mp", &(batch * 14 + n).to_string()), i64::MAX);
            }
            claims.commit_staged();
            if began.elapsed() > longest {
                (longest, at) = (began.elapsed(), claims.len());
            }
        }
        println!("{} claims in {:?}; longest batch {longest:?} at {at} claims", claims.len(), started.elapsed());
    }
}
