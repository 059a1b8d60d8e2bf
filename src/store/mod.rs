//! Where state that must outlive a request lives: dedupe keys, the inbound journal and
//! conversation history.
//!
//! The [`Store`] trait is the seam between the core and a storage engine. Every method is async
//! and returns a boxed future so that engines which block (SQLite) run their work off the
//! actix worker threads, and engines over the network (Redis) fit the same shape. Operations are
//! shaped so that each one is a single atomic step in any engine (but `prune`, which may go in
//! chunks): `accept` claims the dedupe
//! key and journals the envelope together, so a crash can never leave one without the other.

mod claims;
mod inbound_log;
mod memory;
mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::{Durability, SqliteOptions, SqliteStore, COMMIT_DELAY};

use crate::llm::backend::{ChatMessage, Role};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};
use yizhan_channel_core::{BoxFuture, Delivery, Envelope};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed (I/O, corruption, connection).
    #[error("store failed: {0}")]
    Backend(String),
}

/// Whether an envelope was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceptance {
    /// First time seen within the dedupe window: journaled, dispatch it.
    New,
    /// A platform retry of something already accepted: acknowledge, do nothing else.
    Duplicate,
}

/// One question and its answer, the unit of conversation history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    /// What the user asked.
    pub question: String,
    /// What the model answered.
    pub answer: String,
}

impl Turn {
    /// The turn as the two chat lines it stands for.
    pub fn to_messages(&self) -> [ChatMessage; 2] {
        [ChatMessage::new(Role::User, self.question.clone()), ChatMessage::new(Role::Assistant, self.answer.clone())]
    }
}

/// A journaled envelope that was not finished when the process stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct Unfinished {
    /// The message.
    pub envelope: Envelope,
    /// `None`: not answered yet, ask again. `Some(parts)`: answered; send these parts (in
    /// order) and finish, without asking the model again.
    pub pending_parts: Option<Vec<Delivery>>,
    /// The message the last run was streaming the answer into, if any (see
    /// [`Store::record_stream`]).
    pub live_stream: Option<LiveStream>,
}

/// A platform message an answer is shown in while the model writes it (a Feishu card), as
/// recorded for its envelope: after a restart the answer goes into that message instead of a
/// second one, which would leave the first cut off mid-sentence above it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LiveStream {
    /// The channel's [`StreamHandle`](yizhan_channel_core::StreamHandle), as JSON.
    pub handle: serde_json::Value,
    /// Every sequence number the recording run used for this message is above this one (a
    /// resumed stream starts past what the last run may have used: platforms refuse updates
    /// whose sequence is not above every earlier one).
    pub sequence_base: u64,
}

/// One user's parked answers as a store keeps them (see [`Store::save_parked`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedUser {
    /// The channel id.
    pub channel: String,
    /// The user's platform id.
    pub user: String,
    /// The user's parked answers, encoded by their owner (`None`: nothing parked any more).
    pub record: Option<String>,
}

/// A storage engine.
pub trait Store: Send + Sync + 'static {
    /// Claims `(channel, platform message id)` for `dedupe_ttl` and journals the envelope, in one
    /// atomic step. Returns [`Acceptance::Duplicate`] (and journals nothing) when the id was
    /// claimed within the window.
    fn accept<'a>(
        &'a self,
        envelope: &'a Envelope,
        dedupe_ttl: Duration,
    ) -> BoxFuture<'a, Result<Acceptance, StoreError>>;

    /// Records an envelope's answer in one atomic step: the conversation turn (if the answer
    /// came from the model), and every rendered part into the outbox. From then on, recovery
    /// re-sends the parts instead of asking the model again.
    ///
    /// Callers finish an envelope only after its `record_answer` returned. (Run side by side
    /// with that envelope's `finish`, the SQLite store may keep its parts until the next start,
    /// which forgets the parts of finished envelopes; nothing is sent twice either way.)
    fn record_answer<'a>(
        &'a self,
        envelope_id: &'a str,
        session_key: &'a str,
        turn: Option<Turn>,
        parts: &'a [Delivery],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Removes a part from the outbox: the platform confirmed it.
    fn part_delivered<'a>(&'a self, delivery_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Removes a part from the outbox and records why it could not be delivered.
    fn part_failed<'a>(&'a self, delivery_id: &'a str, reason: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Records the message an envelope's answer is being streamed into, replacing an earlier
    /// record for it; [`unfinished`](Self::unfinished) returns it until the envelope is
    /// finished. An engine that does not outlive the process may keep nothing.
    fn record_stream<'a>(
        &'a self,
        envelope_id: &'a str,
        stream: &'a LiveStream,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Marks a journaled envelope as finished (answered, or deliberately not answered).
    fn finish<'a>(&'a self, envelope_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Journaled envelopes not yet finished, oldest first, each with its outbox parts still
    /// pending if it was answered (for recovery after a restart).
    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<Unfinished>, StoreError>>;

    /// Deletes history turns and finished journal entries (and failed-part records) older than
    /// `before`; returns how many rows went. A finished entry whose dedupe claim is still live
    /// may be kept until the claim lapses (the SQLite store remembers claims on those rows). An
    /// engine may remove them in several writes (SQLite: 1,000 rows of a table each), so that
    /// other writes are not held behind one long delete.
    fn prune(&self, before: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// The most recent `max_turns` turns of a conversation, oldest first.
    fn history<'a>(&'a self, session_key: &'a str, max_turns: usize) -> BoxFuture<'a, Result<Vec<Turn>, StoreError>>;

    /// Appends a turn to a conversation.
    fn append_turn<'a>(&'a self, session_key: &'a str, turn: Turn) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Forgets a conversation's history (`/reset`).
    fn clear_history<'a>(&'a self, session_key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Forgets the turn `record_answer` stored for `envelope_id`, if any: its answer reached no
    /// one (its first part refused for good, so none of it was shown), and a prompt must not show
    /// the model saying what the user never read.
    fn forget_turn<'a>(&'a self, envelope_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Replaces what is parked for each of `users`, in one atomic step. Parked answers are
    /// finished messages whose answer waits for the user's next message (公众号): kept here,
    /// they survive a crash. An engine that does not outlive the process may keep nothing.
    fn save_parked(&self, users: Vec<ParkedUser>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Everything [`save_parked`](Self::save_parked) kept, each with when it was saved.
    fn load_parked(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>, StoreError>>;

    /// Waits until every write queued before this call is durable: the last step before the
    /// process exits, which would otherwise drop writes still queued (a part the platform
    /// confirmed would be sent again by the next start).
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// `Err(why)` once the engine can no longer accept writes until the process restarts
    /// (`/healthz` then reports it, so a supervisor restarts Yizhan).
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Unix milliseconds now (wall clock: expiries must mean the same after a restart).
fn now_ms() -> i64 {
    system_time_ms(SystemTime::now())
}

/// Unix milliseconds, saturating (a time before 1970 is 0).
fn system_time_ms(time: SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH).map(duration_ms).unwrap_or(0)
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Refuses every write from now on, after the disk failed (the SQLite store's threads and its
/// inbound log share `broken`). No retry: the kernel may have dropped the pages that failed,
/// and the next fsync may succeed without them (see `sqlite::run_syncer`). A checkpoint that
/// goes on after such a failure could restart the WAL over frames whose pages never reached
/// the database. Logs the first failure only.
fn break_for_good(broken: &AtomicBool, step: &str, error: &str) {
    if !broken.swap(true, Ordering::AcqRel) {
        tracing::error!(
            %error,
            step,
            "The store's disk failed; the store refuses every write from now on. Check the \
             disk, then restart yizhan."
        );
    }
}

/// `path` with `suffix` appended to its file name (`data/yizhan.db` and `.inbound` give
/// `data/yizhan.db.inbound`): how the files kept beside the database are named.
pub(crate) fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The directory holding `path` (the working directory for a bare file name).
pub(crate) fn directory_of(path: &Path) -> &Path {
    path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Syncs the directory holding `path`, so that a file created, renamed or removed there
/// survives a power loss.
pub(crate) fn sync_directory_of(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(directory_of(path))?.sync_all()
}

/// Hands `serve` everything queued in `jobs`, up to `max_batch` at a time, until every sender
/// is gone and the queue is drained: the group-commit loop of the store threads. Each batch
/// waits for its first job, then, unless full or every sender is gone, about `delay` for
/// company (see [`SqliteOptions::commit_delay`]); a zero `delay` serves what is queued at once.
fn serve_in_batches<J>(
    mut jobs: tokio::sync::mpsc::Receiver<J>,
    max_batch: usize,
    delay: Duration,
    mut serve: impl FnMut(&mut Vec<J>),
) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        let mut more_may_come = take_queued(&mut jobs, &mut batch, max_batch);
        if !delay.is_zero() {
            // `None` for a delay beyond the clock's range: such a batch waits until it is full.
            let until = std::time::Instant::now().checked_add(delay);
            while more_may_come && batch.len() < max_batch {
                let left =
                    until.map_or(DELAY_SLICE, |until| until.saturating_duration_since(std::time::Instant::now()));
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(DELAY_SLICE));
                more_may_come = take_queued(&mut jobs, &mut batch, max_batch);
            }
        }
        serve(&mut batch);
        batch.clear();
    }
}

/// The longest a batch waiting out its commit delay sleeps before it looks again whether it is
/// full: tokio's receiver has no blocking receive with a timeout outside a runtime, so the wait
/// is slept in slices. (A sleep overshoots by some tens of µs, so the delay is "about".)
const DELAY_SLICE: Duration = Duration::from_micros(100);

/// Moves what is queued in `jobs` into `batch`, until it holds `max_batch`; `false` once every
/// sender is gone and the queue is empty (nothing more can come).
fn take_queued<J>(jobs: &mut tokio::sync::mpsc::Receiver<J>, batch: &mut Vec<J>, max_batch: usize) -> bool {
    while batch.len() < max_batch {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return true,
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
    true
}

/// A minimal envelope from user `u` on channel `c`, for tests of stores and what sits on them.
#[cfg(test)]
pub(crate) fn test_envelope(message_id: &str) -> Envelope {
    use yizhan_channel_core::{ChannelId, Conversation, ConversationKind, ReplyHandle, Sender};
    Envelope {
        id: Envelope::new_id(),
        channel: ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}")),
        channel_kind: "test".into(),
        platform_message_id: message_id.into(),
        received_at_ms: 0,
        conversation: Conversation { kind: ConversationKind::Direct, id: "u".into() },
        sender: Sender { id: "u".into(), name: None },
        content: vec![],
        mentions_self: true,
        reply_handle: ReplyHandle::default(),
    }
}

#[cfg(test)]
mod batch_tests {
    use super::serve_in_batches;
    use std::time::Duration;

    /// Runs `serve_in_batches` on its own thread; returns the queue and where the batches come out.
    fn start(
        max_batch: usize,
        delay: Duration,
    ) -> (tokio::sync::mpsc::Sender<u32>, std::sync::mpsc::Receiver<Vec<u32>>, std::thread::JoinHandle<()>) {
        let (jobs, queue) = tokio::sync::mpsc::channel(16);
        let (served, batches) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            serve_in_batches(queue, max_batch, delay, |batch| {
                let _ = served.send(std::mem::take(batch));
            })
        });
        (jobs, batches, thread)
    }

    /// Far longer than any of these tests may take: a wait that only this could end is a
    /// failure, not a hang.
    const NEVER: Duration = Duration::from_secs(60);

    /// A job sent while the one before it waits out the commit delay goes in its batch: with
    /// the delay far longer than the test, only the batch filling up can end the wait, so the
    /// two are served together whether the thread took the first before the second came or not.
    #[test]
    fn a_batch_waits_for_company_until_it_is_full() {
        let (jobs, batches, thread) = start(2, Duration::from_secs(3600));
        assert!(jobs.blocking_send(1).is_ok());
        // Time for the thread to take the first (it need not: the answer is the same), so that
        // without the delay the two would come as two batches.
        std::thread::sleep(Duration::from_millis(20));
        assert!(jobs.blocking_send(2).is_ok());
        assert_eq!(batches.recv_timeout(NEVER).ok(), Some(vec![1, 2]));
        drop(jobs);
        assert!(thread.join().is_ok());
        assert!(batches.try_recv().is_err(), "nothing else was served");
    }

    /// Once every sender is gone nothing more can come: a batch waiting out its delay is served
    /// at once, and the loop ends.
    #[test]
    fn a_batch_is_served_without_its_delay_once_the_senders_are_gone() {
        let (jobs, batches, thread) = start(64, Duration::from_secs(3600));
        assert!(jobs.blocking_send(1).is_ok());
        drop(jobs);
        assert_eq!(batches.recv_timeout(NEVER).ok(), Some(vec![1]));
        assert!(thread.join().is_ok());
    }

    /// A batch short of full is served once its delay is over, alone if nothing came meanwhile
    /// (the test waits for it before sending more); and the loop ends when the senders are gone.
    #[test]
    fn a_batch_short_of_full_is_served_once_its_delay_is_over() {
        let (jobs, batches, thread) = start(64, Duration::from_millis(1));
        assert!(jobs.blocking_send(1).is_ok());
        assert_eq!(batches.recv_timeout(NEVER).ok(), Some(vec![1]));
        assert!(jobs.blocking_send(2).is_ok() && jobs.blocking_send(3).is_ok());
        let mut later: Vec<u32> = batches.recv_timeout(NEVER).unwrap_or_default();
        if later.len() < 2 {
            later.extend(batches.recv_timeout(NEVER).unwrap_or_default());
        }
        assert_eq!(later, vec![2, 3]);
        drop(jobs);
        assert!(thread.join().is_ok());
    }
}
