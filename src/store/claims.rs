//! The SQLite store's live dedupe claims, held in memory by its writer thread.
//!
//! Why in memory: platform message ids arrive in no particular order (Feishu's and WeCom's are
//! random), so a B-tree keyed on them takes one random page write per accepted message, and at
//! group-commit rates those pages were the largest part of every commit. Instead each journal
//! row carries its claim (a digest and an expiry), which only ever appends, and the writer —
//! the only thread that accepts — answers "seen before?" from this map. At startup the map is
//! rebuilt from the rows whose claims are still live, so retries that arrive after a restart
//! are still recognised.
//!
//! Memory: one entry (about 40 bytes) per message accepted within the dedupe window.

use sha2::{Digest, Sha256};
use std::collections::HashMap;

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

/// Live claims (key → expiry in Unix ms), with an undo log for the transaction in progress.
///
/// A claim taken inside a transaction counts at once (a retry in the same batch is a
/// duplicate), but if the transaction rolls back, [`Claims::discard_staged`] puts back what
/// was there before, so a rolled-back accept leaves no claim behind.
#[derive(Debug, Default)]
pub struct Claims {
    live: HashMap<ClaimKey, i64, foldhash::fast::RandomState>,
    /// What each claim of the transaction in progress replaced, in order.
    undo: Vec<(ClaimKey, Option<i64>)>,
}

impl Claims {
    /// Whether `key` is claimed and unexpired at `now`.
    pub fn is_claimed(&self, key: &ClaimKey, now: i64) -> bool {
        self.live.get(key).is_some_and(|expires_at| *expires_at > now)
    }

    /// Takes `key` until `expires_at`, undone if the transaction rolls back.
    pub fn stage(&mut self, key: ClaimKey, expires_at: i64) {
        let replaced = self.live.insert(key, expires_at);
        self.undo.push((key, replaced));
    }

    /// The transaction committed: its claims stay.
    pub fn commit_staged(&mut self) {
        self.undo.clear();
    }

    /// The transaction rolled back: its claims never happened.
    pub fn discard_staged(&mut self) {
        for (key, replaced) in self.undo.drain(..).rev() {
            match replaced {
                Some(expires_at) => self.live.insert(key, expires_at),
                None => self.live.remove(&key),
            };
        }
    }

    /// Adds a claim read back from disk (startup); the later expiry wins.
    pub fn restore(&mut self, key: ClaimKey, expires_at: i64) {
        let entry = self.live.entry(key).or_insert(expires_at);
        *entry = (*entry).max(expires_at);
    }

    /// Forgets expired claims; returns how many went.
    pub fn sweep(&mut self, now: i64) -> usize {
        let before = self.live.len();
        self.live.retain(|_, expires_at| *expires_at > now);
        before - self.live.len()
    }

    /// Live claims (for tests and logs).
    pub fn len(&self) -> usize {
        self.live.len()
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
    fn expired_claims_do_not_count_and_are_swept() {
        let mut claims = Claims::default();
        let (old, new) = (claim_key("mp", "old"), claim_key("mp", "new"));
        claims.restore(old, 10);
        claims.restore(new, 100);
        claims.restore(new, 50);
        assert!(!claims.is_claimed(&old, 10));
        assert!(claims.is_claimed(&new, 99));
        assert_eq!(claims.sweep(10), 1);
        assert_eq!(claims.len(), 1);
    }
}
