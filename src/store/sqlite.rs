//! A [`Store`] on SQLite: dedupe claims, the journal, the outbox and conversation history survive
//! a restart, so a crash loses nothing that was acknowledged.
//!
//! Accepted envelopes and their dedupe claims are journaled in the **inbound log** next to the
//! database file (`<path>.inbound/`, see [`inbound_log`]): an append-only file fsynced by the
//! thread that writes it, which costs the acknowledgement a fraction of a SQLite insert and
//! hand-off. Everything after acceptance (answers, the outbox, history, which logged envelopes
//! are answered) is in SQLite, below. `accept` and `finish` go to the log's thread; `finish`
//! then forgets the answer on the SQLite side; `unfinished` joins the log's open envelopes
//! with their answers and pending parts.
//!
//! Invariants: every method behaves as [`MemoryStore`](super::MemoryStore)'s does; a write is
//! committed, and with [`Durability::PowerLoss`] fsynced, before its future resolves; no SQLite
//! call ever runs on an async executor thread.
//!
//! # Threading
//!
//! One dedicated **writer thread** owns the only write connection. Callers send it operations
//! through a bounded channel (backpressure: a full queue makes callers wait, it never grows
//! without bound) and await a [`oneshot`] answer. The writer takes everything queued (up to
//! [`SqliteOptions::max_batch`]) and commits it in **one transaction** (group commit), so one
//! fsync is shared by every webhook that arrived meanwhile; the more load, the bigger the batch
//! and the cheaper each acknowledgement. One failing operation rolls back alone and only its
//! caller sees the error: the batch runs without savepoints, and only if an operation fails is
//! it rolled back and redone with one `SAVEPOINT` per operation. Answers are sent only after
//! `COMMIT` succeeded and, by default, the syncer has made it durable (see Durability):
//! "accepted" always means "on disk".
//!
//! The inbound log's thread answers "seen this platform message before?" from memory
//! ([`Claims`](super::claims::Claims)), rebuilt at startup from the log and from schema 1 and
//! 2's rows.
//!
//! A small pool of **reader threads** (each with its own connection, [`SqliteOptions::readers`])
//! serves `history` and `unfinished`. Under WAL, readers never block the writer nor each other,
//! and they see every transaction committed before the read started, so a caller reads its own
//! writes. Dedicated threads rather than `spawn_blocking` keep connections (and their statement
//! caches) warm and make the store independent of which runtime polls its futures.
//!
//! A **checkpointer thread** (its own connection) copies committed WAL pages into the database
//! file in the background, at most every [`CHECKPOINT_INTERVAL`] while there are commits. SQLite
//! allows one checkpoint to run alongside the writer, so commits no longer stall behind a
//! checkpoint that copies tens of megabytes (SQLite's automatic checkpoint, inside a commit, set
//! the tail latency of every webhook waiting on it). The WAL restarts from its beginning when a
//! transaction starts with every frame copied. Under steady load the checkpointer never quite
//! catches up, so once the WAL holds [`CHECKPOINT_PAGES`] frames it asks the writer, which
//! copies the last few frames itself between batches; its next transaction then restarts the
//! WAL. A checkpoint that hits an I/O error breaks the store for good, as a failed fsync does.
//!
//! An operation for the inbound log whose caller dropped its future before the log's thread
//! reached it is skipped: an `accept` must not leave a journal entry that nobody dispatches (a
//! skipped finish only leaves the envelope to resume with its undelivered parts). The writer
//! applies every operation it gets, caller or not: each records something that already
//! happened (a part the platform confirmed, an answer, a finish), and skipping it would make
//! recovery repeat it.
//!
//! Dropping the store closes its queues; the log's thread and the writer handle everything
//! already queued, then every thread is joined.
//!
//! # Durability
//!
//! `journal_mode=WAL`, `synchronous=NORMAL`: a commit writes its WAL frames and returns without
//! waiting for the disk, so it survives the process being killed. For
//! [`Durability::PowerLoss`] (the default) a **syncer thread** then `fdatasync`s the WAL file,
//! and only after that are the batch's callers answered: the same guarantee as
//! `synchronous=FULL` (which fsyncs inside every `COMMIT`), but pipelined. While the syncer
//! waits for the disk, the writer already commits the next batch; it hands a batch over only
//! when the syncer takes it (a rendezvous), so batches grow while a sync runs instead of
//! becoming many small commits. Right after each `COMMIT` the writer also starts the kernel
//! writing the new frames out (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, Linux), which does not
//! wait for the I/O to finish (it can block while submitting it): by the time the syncer takes
//! the batch, most of its pages are written or on their way, and the `fdatasync` often only has
//! to flush the disk's cache. That changes only when the bytes start moving: acknowledgements
//! still wait for the `fdatasync`. Should starting the writeback fail with an I/O error, the
//! kernel may have dropped the pages without the `fdatasync` ever hearing of it, so the batch
//! fails and the store breaks for good, as for a failed fsync. Syncing the file from a second
//! descriptor is sound: `fsync`
//! covers the file's data whichever descriptor wrote it; the WAL header SQLite rewrites when it
//! restarts the log is written (and, in `NORMAL`, synced) before the frames that follow it, and
//! checkpoints sync the WAL and the database themselves. A failed fsync breaks the store for
//! good (see `run_syncer`). [`Durability::ProcessCrash`] answers right after `COMMIT`.
//!
//! # Schema (version 7, see [`MIGRATIONS`])
//!
//! Times are Unix milliseconds (wall clock, because they must mean the same after a restart).
//!
//! - `dedupe(channel, platform_message_id, expires_at)`: schema 1's claims. No longer written;
//!   its live rows are loaded at startup and expired ones swept, until it is empty.
//! - `answered(envelope_id PK, answered_at)`: the logged envelopes whose answer is recorded
//!   (written with their outbox parts, in one transaction; deleted when they finish). Recovery
//!   re-sends their pending parts instead of asking the model again. A crash between the log's
//!   finish record and that delete leaves a row nobody reads.
//! - `journal(…)`: where schema 1 and 2 journaled accepted envelopes. No longer written but for
//!   state changes of its open rows; those rows are still recovered and their live claims
//!   loaded at startup, until they are finished and pruned. Its columns: `(seq, envelope_id,
//!   envelope JSON, state, created_at, finished_at, claim, claim_expires_at)`. `claim` is the row's dedupe claim ([`claim_key`]) and
//!   `claim_expires_at` when it lapses, indexed so that startup reloads the live claims without
//!   a scan (that index appends while the dedupe window stays the same). A finished row whose
//!   claim is still live is kept by [`Store::prune`]. `seq` is the `INTEGER PRIMARY KEY` (rowid
//!   alias): arrival order for free, stable across `VACUUM`, always larger than every existing
//!   row. `state` is `received` → `answered` → `finished`. Finished rows stay (for operators)
//!   until [`Store::prune`]. `envelope_id` is the lookup key, but only open rows are ever looked
//!   up (every update is `… AND state <> 'finished'`), so it is indexed (unique) only over the
//!   open rows: that partial index also serves recovery, and it stays as small as the number of
//!   messages in flight instead of growing with the retention. A second partial index covers the
//!   finished rows (pruning).
//! - `outbox(delivery_id PK, envelope_id, part_index, delivery JSON, state, reason,
//!   updated_at)`. `pending` rows are parts to send; a delivered part's row is deleted; a
//!   `failed` row keeps its reason for operators until pruned. Indexed on
//!   `(envelope_id, part_index)`, and the `failed` rows on `updated_at` (pruning).
//! - `live_stream(envelope_id PK, stream JSON, recorded_at)`: the message an open envelope's
//!   answer is being streamed into ([`Store::record_stream`]); deleted when the envelope
//!   finishes (or, after a crash between the log's finish record and that delete, at the next
//!   start); never pruned by age (an open envelope needs it however old).
//! - `parked(channel, user, record, saved_at)`, primary key `(channel, user)`: each user's
//!   parked answers ([`Store::save_parked`]), as the passive-reply module encodes them.
//! - `history(seq, session_key, question, answer, created_at, envelope_id)`, indexed on
//!   `(session_key, seq)`, `created_at` and, where set, `envelope_id` (the answered envelope,
//!   for [`Store::forget_turn`]; none for turns stored before schema 6 or by `append_turn`). At
//!   most [`SqliteOptions::max_turns_kept`] rows per key.
//!
//! Foreign keys are not declared: the writer is the only mutator and inserts outbox rows only for
//! an open envelope (in the inbound log, or a legacy journal row), and declared keys would cost a
//! lookup on every insert of the hot path.

use super::claims::{claim_key, ClaimKey};
use super::inbound_log::{self, InboundLog, LogJob, LogOp, Logged, OpenEnvelope, SyncSegment};
use super::{
    break_for_good, duration_ms, now_ms, system_time_ms, Acceptance, LiveStream, ParkedUser, Store, StoreError, Turn,
    Unfinished,
};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};
use yizhan_channel_core::{BoxFuture, Delivery, Envelope};

/// How many rows of each table one pruning write removes at most (see `Store::prune`).
const PRUNE_CHUNK_ROWS: i64 = 1_000;

/// Schema steps, applied in order; step `i` brings `PRAGMA user_version` to `i + 1`.
///
/// NOTE: never edit a released step; append a new one. (Step 1 was last edited before any
/// release, to index only the open journal rows by `envelope_id`.) A database whose `user_version` is
/// beyond this list was written by a newer build and is refused rather than misread.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE dedupe (
        channel TEXT NOT NULL,
        platform_message_id TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (channel, platform_message_id)
    ) WITHOUT ROWID;
    CREATE INDEX dedupe_expiry ON dedupe (expires_at);

    CREATE TABLE journal (
        seq INTEGER PRIMARY KEY,
        envelope_id TEXT NOT NULL,
        envelope TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('received', 'answered', 'finished')),
        created_at INTEGER NOT NULL,
        finished_at INTEGER
    );
    CREATE UNIQUE INDEX journal_open ON journal (envelope_id) WHERE state <> 'finished';
    CREATE INDEX journal_finished ON journal (finished_at) WHERE state = 'finished';

    CREATE TABLE outbox (
        delivery_id TEXT PRIMARY KEY,
        envelope_id TEXT NOT NULL,
        part_index INTEGER NOT NULL,
        delivery TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'failed')),
        reason TEXT,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX outbox_envelope ON outbox (envelope_id, part_index);

    CREATE TABLE history (
        seq INTEGER PRIMARY KEY,
        session_key TEXT NOT NULL,
        question TEXT NOT NULL,
        answer TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX history_session ON history (session_key, seq);
    CREATE INDEX history_created ON history (created_at);",
    // 2: a journal row carries its own dedupe claim (see `claims.rs`); `dedupe` is no longer
    // written, only read at startup and swept until the claims schema 1 wrote there expire.
    "ALTER TABLE journal ADD COLUMN claim BLOB;
    ALTER TABLE journal ADD COLUMN claim_expires_at INTEGER;
    CREATE INDEX journal_claims ON journal (claim_expires_at);",
    // 3: accepted envelopes are journaled in the inbound log (`inbound_log.rs`); `journal` is
    // only read (its open rows and live claims) and updated, until its rows are pruned. Which
    // logged envelopes are answered is recorded here, atomically with their outbox parts.
    "CREATE TABLE answered (
        envelope_id TEXT PRIMARY KEY,
        answered_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX answered_at ON answered (answered_at);",
    // 4: the message each open envelope's answer is being streamed into (`Store::record_stream`).
    "CREATE TABLE live_stream (
        envelope_id TEXT PRIMARY KEY,
        stream TEXT NOT NULL,
        recorded_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX live_stream_recorded_at ON live_stream (recorded_at);",
    // 5: parked answers (`Store::save_parked`), one row per user.
    "CREATE TABLE parked (
        channel TEXT NOT NULL,
        user TEXT NOT NULL,
        record TEXT NOT NULL,
        saved_at INTEGER NOT NULL,
        PRIMARY KEY (channel, user)
    ) WITHOUT ROWID;",
    // 6: the envelope a turn answered (`Store::forget_turn`); none for turns stored before.
    "ALTER TABLE history ADD COLUMN envelope_id TEXT;
    CREATE INDEX history_envelope ON history (envelope_id) WHERE envelope_id IS NOT NULL;",
    // 7: failed parts by age, for retention: without it each of its chunks scanned the whole
    // outbox while every write waited.
    "CREATE INDEX outbox_failed ON outbox (updated_at) WHERE state = 'failed';",
];

/// WAL pages (frames) after which the writer copies the last frames itself so that the WAL
/// restarts: this bounds the WAL at about 40 MiB. Not SQLite's default of 1000: every restart
/// rewrites the WAL header and costs the writer a checkpoint with two fsyncs; a larger WAL is
/// restarted less often. (Much larger WALs slow every page lookup, the WAL index being searched
/// first, and are replayed at startup.)
const CHECKPOINT_PAGES: i64 = 10_000;

/// How often, at most, the checkpointer thread copies WAL pages into the database file while
/// commits keep coming. A pass fsyncs the WAL, and the database too when it reaches the WAL's
/// end; ten passes a second are little next to the syncer's thousands of fsyncs (and with
/// `ProcessCrash`, they are what gets pages onto the disk at all). A page rewritten by many
/// batches within the interval is copied once.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// The longest `checkpoint_interval` taken as given; longer ones are cut to it (a checkpointer
/// that never ran would leave the WAL to grow without bound).
const MAX_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(3600);

/// Tuning for [`SqliteStore`]; [`Default`] suits a single service instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// What a commit must survive.
    pub durability: Durability,
    /// Turns kept per conversation (at least 1); older ones are never sent to the model anyway,
    /// so keeping them would only grow the file.
    pub max_turns_kept: usize,
    /// Write operations that may wait for the writer (the read queue gets the same bound). When
    /// full, callers wait to enqueue: load beyond what the disk can commit shows up as latency,
    /// not as memory growth.
    pub write_queue: usize,
    /// The most operations committed in one transaction; bounds how long one commit (and so the
    /// first caller in it) can take.
    pub max_batch: usize,
    /// Reader threads, each with its own connection (at least 1). Reads are rare (history per
    /// turn, recovery at startup), so two are plenty.
    pub readers: usize,
    /// How long a connection waits for a lock held by another process (a backup tool, the
    /// `sqlite3` shell) before the operation fails.
    pub busy_timeout: Duration,
    /// WAL frames after which the WAL is restarted ([`CHECKPOINT_PAGES`]).
    pub checkpoint_pages: i64,
    /// How often, at most, the checkpointer thread runs ([`CHECKPOINT_INTERVAL`]; longer than
    /// [`MAX_CHECKPOINT_INTERVAL`] counts as that).
    pub checkpoint_interval: Duration,
    /// Size of each inbound log segment, zero-filled before use ([`LOG_SEGMENT_BYTES`]).
    pub log_segment_bytes: u64,
    /// About how long a batch of the inbound log that is not full waits for more jobs before
    /// it is served ([`COMMIT_DELAY`]; zero: at once), as PostgreSQL's `commit_delay`. Each
    /// batch costs the log thread about the same CPU time whatever it holds (with
    /// `power_loss` the write, the `fdatasync` and its two trips to the device; in any mode the
    /// wake-ups), and under load the log thread and the HTTP workers share the cores: fewer,
    /// larger batches leave the workers more of them. Every job of the log waits about this
    /// much longer: an acknowledgement, and an answer's two (whether its message is open, its
    /// finish).
    pub commit_delay: Duration,
}

/// See [`SqliteOptions::commit_delay`]. 100 µs: in the nineteenth session's side-by-side runs
/// of the README's benchmark (2 cores, 64 connections) the medians of SQLite's
/// acknowledgements went from 67% and 69.5% to 75% and 71.5% of the memory store's (and by 3 to
/// 6 points with an earlier form of the delay), 200 µs did no better and 400 µs worse; the
/// eleventh session, on a machine whose cores sat idler, had seen no gain (docs/benchmarks.md).
/// An acknowledgement takes about 2 ms there; a lone message gains about 0.1–0.2 ms.
pub const COMMIT_DELAY: Duration = Duration::from_micros(100);

/// Inbound log segments of 32 MiB: at 35,000 acknowledgements a second (the benchmark's), one
/// is filled about every two seconds, while the next is zero-filled in the background; few
/// enough files for a day's dedupe window at ordinary rates.
pub const LOG_SEGMENT_BYTES: u64 = 32 << 20;

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            max_turns_kept: 100,
            write_queue: 4096,
            max_batch: 1024,
            readers: 2,
            busy_timeout: Duration::from_secs(5),
            durability: Durability::PowerLoss,
            checkpoint_pages: CHECKPOINT_PAGES,
            checkpoint_interval: CHECKPOINT_INTERVAL,
            log_segment_bytes: LOG_SEGMENT_BYTES,
            commit_delay: COMMIT_DELAY,
        }
    }
}

/// How much a commit survives; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Written and fsynced before a write is acknowledged (an accepted message: its inbound
    /// log record; anything else: the WAL holding its commit): an acknowledged message survives
    /// power loss and kernel panics.
    #[default]
    PowerLoss,
    /// Acknowledged once written (the inbound log record, the `COMMIT`): survives the process
    /// being killed (`kill -9`, OOM, crash), but the last moments before a power loss may be
    /// lost (the WAL is fsynced only at checkpoints, the log not at all until the kernel writes
    /// it back). Acknowledgements skip the fsync, so they are faster; for hosts on
    /// battery-backed or replicated storage.
    ProcessCrash,
}

/// Why the SQLite engine failed; reaches callers as [`StoreError::Backend`] with this text.
#[derive(Debug, thiserror::Error)]
enum SqliteError {
    #[error("cannot create the directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open the SQLite store {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("cannot sync what the last run left of the SQLite store {path}: {source}")]
    SyncAtOpen { path: PathBuf, source: std::io::Error },
    #[error(
        "the SQLite store {path} has schema version {found}, but this build knows versions up to \
         {known}; it was written by a newer yizhan (upgrade, or restore a backup)"
    )]
    TooNew { path: PathBuf, found: i64, known: usize },
    #[error("the SQLite store {path} refused WAL mode (journal_mode is {mode})")]
    NotWal { path: PathBuf, mode: String },
    #[error(
        "the inbound log {path} is missing, but the database says it was in use: it journals the \
         messages not yet answered and the ids of recent ones. Restore it together with the \
         database, or create the empty directory to start without them"
    )]
    LogMissing { path: PathBuf },
    #[error(
        "the inbound log {path} holds {open} message(s) not yet answered, but the database has never \
         used a log (was it deleted or replaced?): they would be answered again. Restore the \
         database, or delete the directory too to start afresh"
    )]
    LogWithoutDatabase { path: PathBuf, open: usize },
    #[error("cannot open the inbound log {path}: {source}")]
    OpenLog { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Log(String),
    #[error("cannot open the SQLite store's write-ahead log {path}: {source}")]
    OpenWal { path: PathBuf, source: std::io::Error },
    #[error(
        "the disk failed to sync the SQLite store's write-ahead log ({0}); nothing more is \
         accepted, because what was written may not be on disk: restart yizhan"
    )]
    SyncFailed(String),
    #[error("cannot start the store's {name} thread: {source}")]
    Spawn { name: String, source: std::io::Error },
    #[error("the store's {0} thread has stopped")]
    Stopped(&'static str),
    #[error("cannot encode a record as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the batch's transaction was rolled back: {0}")]
    RolledBack(String),
    #[error("internal: the writer answered {0} with the wrong kind of result")]
    Mismatch(&'static str),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

impl From<SqliteError> for StoreError {
    fn from(error: SqliteError) -> Self {
        StoreError::Backend(error.to_string())
    }
}

/// A [`Store`] on one SQLite file. See the module docs for threading, durability and schema.
///
/// Dropping it blocks the dropping thread until everything already queued is committed and
/// synced (usually one batch, a few milliseconds).
pub struct SqliteStore {
    /// Operations for the writer thread; `None` only while dropping.
    writes: Option<mpsc::Sender<WriteJob>>,
    /// Accepts and finishes for the inbound log's thread; `None` only while dropping.
    log: Option<mpsc::Sender<LogJob>>,
    /// Queries for the reader threads; `None` only while dropping.
    reads: Option<mpsc::Sender<ReadJob>>,
    /// The inbound log's thread and its preparer, then the writer, syncer (if any), checkpointer
    /// and readers, joined on drop in that order (the writer's end ends the syncer and the
    /// checkpointer) so queued writes are committed and synced before it returns.
    threads: Vec<JoinHandle<()>>,
    /// For `Debug` and logs.
    path: PathBuf,
    /// Set once writes are refused for good (see `run_syncer`).
    broken: Arc<AtomicBool>,
    /// Shared by the writer and the checkpointer; kept here so tests can ask for a restart.
    #[cfg(test)]
    checkpoints: Arc<CheckpointFlags>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Makes durable what a previous run left in the database, its write-ahead log and their
/// directory, before any of it is read. A run killed between a commit and the syncer's fsync
/// (which alone tells anyone the commit happened) leaves pages this run would read from the
/// page cache: acting on them (sending an answer recorded there, say) and losing them to a
/// power loss afterwards would ask the model again and answer twice. The inbound log's scan
/// does the same for its segments.
fn sync_before_reading(db: &Path, sync: &mut dyn FnMut(&File) -> std::io::Result<()>) -> std::io::Result<()> {
    // Resolved as SQLite resolves it: a symlinked database has its write-ahead log beside the
    // target, in the target's directory (a database not created yet has no log to sync).
    let resolved = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_owned());
    let db = resolved.as_path();
    for file in [db.to_owned(), super::beside(db, "-wal")] {
        match File::open(&file) {
            Ok(file) => sync(&file)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    sync(&File::open(super::directory_of(db))?)
}

impl SqliteStore {
    /// Opens (creating it and its directory if missing) the store at `path`, brings its schema
    /// up to date and starts its threads.
    ///
    /// This blocks on disk I/O; call it at startup, before serving traffic.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<Self, StoreError> {
        let wal_disk = |sync: File, writeback: File| -> (SyncWal, StartWriteback) {
            (Box::new(move || sync.sync_data()), writeback_starter(writeback))
        };
        Self::open_inner(path, options, wal_disk, Box::new(|segment: &File| segment.sync_data()), &mut File::sync_all)
            .map_err(StoreError::from)
    }

    /// A store whose every fsync fails (`PowerLoss`), for tests of what a broken store does.
    #[cfg(test)]
    pub(crate) fn open_with_failing_disk(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteOptions {
            durability: Durability::PowerLoss,
            log_segment_bytes: 64 << 10,
            ..SqliteOptions::default()
        };
        let wal_disk = |_sync, _writeback| -> (SyncWal, StartWriteback) {
            (Box::new(|| Err(std::io::Error::other("injected EIO"))), Box::new(|| Ok(())))
        };
        let segment_sync: SyncSegment = Box::new(|_: &File| Err(std::io::Error::other("injected EIO")));
        Self::open_inner(path, options, wal_disk, segment_sync, &mut File::sync_all).map_err(StoreError::from)
    }

    /// `wal_disk` turns two descriptors of the WAL file into the syncer's fsync and the
    /// writer's writeback start; `segment_sync` makes an inbound log segment durable;
    /// `sync_at_open` makes what the last run left durable before it is read (tests inject
    /// failures and watch the order).
    fn open_inner(
        path: &Path,
        options: SqliteOptions,
        wal_disk: impl FnOnce(File, File) -> (SyncWal, StartWriteback),
        segment_sync: SyncSegment,
        sync_at_open: &mut dyn FnMut(&File) -> std::io::Result<()>,
    ) -> Result<Self, SqliteError> {
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            create_dir_durably(parent).map_err(|source| SqliteError::CreateDir { path: parent.to_owned(), source })?;
        }
        let at = |source| SqliteError::Open { path: path.to_owned(), source };
        sync_before_reading(path, sync_at_open)
            .map_err(|source| SqliteError::SyncAtOpen { path: path.to_owned(), source })?;

        let mut writer = Connection::open(path).map_err(at)?;
        writer.busy_timeout(options.busy_timeout).map_err(at)?;
        let mode: String = writer.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)).map_err(at)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(SqliteError::NotWal { path: path.to_owned(), mode });
        }
        // NORMAL in both modes: a commit writes its WAL frames without waiting for the disk. For
        // `PowerLoss` the syncer thread then fsyncs the WAL before anyone is told (see the
        // module docs); checkpoints sync as SQLite always does.
        writer.pragma_update(None, "synchronous", "NORMAL").map_err(at)?;
        // Statement journals and sorts stay in memory instead of temporary files.
        writer.pragma_update(None, "temp_store", "MEMORY").map_err(at)?;
        // The checkpointer thread and the writer, between batches, checkpoint instead; SQLite's
        // own would copy the whole WAL inside a commit.
        writer.pragma_update(None, "wal_autocheckpoint", 0).map_err(at)?;
        writer.set_prepared_statement_cache_capacity(64);
        let log_dir = inbound_log::log_dir(path);
        let at_log = |source| SqliteError::OpenLog { path: log_dir.clone(), source };
        let version: i64 = writer.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(at)?;
        if version >= LOG_SCHEMA_VERSION && !log_dir.exists() {
            // Without it, every acknowledged message not yet answered and every remembered
            // message id would be gone without a word (a backup restored without it, say).
            return Err(SqliteError::LogMissing { path: log_dir });
        }
        // Before the schema says the log is in use, so that no crash leaves it said but missing.
        inbound_log::create_dir(&log_dir).map_err(at_log)?;
        // Before any migration: a second process (an overlapping restart during an upgrade)
        // must not change the schema under the one running.
        let lock = inbound_log::lock_dir(&log_dir).map_err(at_log)?;
        let segment_bytes = options.log_segment_bytes.max(4096);
        let scanned = inbound_log::scan_locked(&log_dir, now_ms(), segment_bytes, lock).map_err(at_log)?;
        if version < LOG_SCHEMA_VERSION && scanned.open_count() > 0 {
            // A database deleted (to start afresh, say) beside the log it used: its open
            // messages would be asked and answered again, with no record of what was sent.
            return Err(SqliteError::LogWithoutDatabase { path: log_dir, open: scanned.open_count() });
        }
        migrate(&mut writer, path)?;
        let legacy_claims = load_claims(&writer).map_err(at)?;
        tracing::debug!(
            path = %path.display(),
            legacy_claims = legacy_claims.len(),
            open = scanned.open_count(),
            "Inbound log read back."
        );
        forget_answers_of_closed(&mut writer, &scanned).map_err(at)?;
        // Started before any SQLite thread, so that a failure here leaves none running.
        let broken = Arc::new(AtomicBool::new(false));
        let (log_tx, log_rx) = mpsc::channel(options.write_queue.max(1));
        let log_sync = match options.durability {
            Durability::PowerLoss => Some(segment_sync),
            Durability::ProcessCrash => None,
        };
        let (log, preparer) = InboundLog::start(
            log_dir.clone(),
            scanned,
            legacy_claims,
            segment_bytes,
            options.max_batch,
            options.commit_delay,
            log_sync,
            Arc::clone(&broken),
            Box::new(inbound_log::prepare_segment),
            inbound_log::PREPARE_RETRY_AFTER,
        )
        .map_err(at_log)?;
        // Joined first (closing its queue ends it), then the preparer, which ends with it.
        let mut threads = vec![spawn("inbound-log".to_owned(), move || log.run(log_rx))?, preparer];

        let reader_count = options.readers.max(1);
        let mut readers = Vec::with_capacity(reader_count);
        for _ in 0..reader_count {
            let flags =
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
            let reader = Connection::open_with_flags(path, flags).map_err(at)?;
            reader.busy_timeout(options.busy_timeout).map_err(at)?;
            // Readers must never write: only the writer's batches are durable and ordered.
            reader.pragma_update(None, "query_only", true).map_err(at)?;
            // Recovery sorts the open journal rows; in memory, not in a temporary file.
            reader.pragma_update(None, "temp_store", "MEMORY").map_err(at)?;
            reader.set_prepared_statement_cache_capacity(16);
            readers.push(reader);
        }

        let checkpointer = Connection::open(path).map_err(at)?;
        checkpointer.busy_timeout(options.busy_timeout).map_err(at)?;
        // A checkpoint syncs the WAL before copying and the database before the WAL may restart
        // only if `synchronous` is at least NORMAL; without those syncs a restart could overwrite
        // frames whose pages never reached the disk. Set, not left to the build's default.
        checkpointer.pragma_update(None, "synchronous", "NORMAL").map_err(at)?;

        let (write_tx, write_rx) = mpsc::channel(options.write_queue.max(1));
        let (read_tx, read_rx) = mpsc::channel(options.write_queue.max(1));
        let acks = match options.durability {
            Durability::ProcessCrash => Acks::AtCommit,
            Durability::PowerLoss => {
                // SQLite names the WAL `<database>-wal`, after resolving a symlinked database
                // to its target, so the name comes from SQLite; the migration created the file.
                let wal_path = writer.path().map_or_else(|| wal_path(path), |db| wal_path(Path::new(db)));
                // Two opens, not a clone: each descriptor keeps its own place in the file's
                // writeback errors, so nothing the writer does can hide one from the syncer.
                let open_wal = || {
                    File::options()
                        .read(true)
                        .write(true)
                        .open(&wal_path)
                        .map_err(|source| SqliteError::OpenWal { path: wal_path.clone(), source })
                };
                let (sync, start_writeback) = wal_disk(open_wal()?, open_wal()?);
                let (to_syncer, synced) = std::sync::mpsc::sync_channel(0);
                let broken = Arc::clone(&broken);
                threads.push(spawn("sqlite-syncer".to_owned(), move || run_syncer(sync, &synced, &broken))?);
                Acks::AfterSync { syncer: to_syncer, start_writeback }
            }
        };
        let (poke, pokes) = std::sync::mpsc::sync_channel(1);
        let checkpoints = Arc::new(CheckpointFlags::default());
        let commits = CommitSignal { flags: Arc::clone(&checkpoints), poke };
        let checkpointer = Checkpointer {
            conn: checkpointer,
            flags: Arc::clone(&checkpoints),
            broken: Arc::clone(&broken),
            restart_pages: options.checkpoint_pages.max(1),
            interval: options.checkpoint_interval.min(MAX_CHECKPOINT_INTERVAL),
        };
        threads.push(spawn("sqlite-checkpointer".to_owned(), move || checkpointer.run(&pokes))?);
        let writer = Writer {
            conn: writer,
            max_turns_kept: i64::try_from(options.max_turns_kept.max(1)).unwrap_or(i64::MAX),
            max_batch: options.max_batch.max(1),
            results: Vec::with_capacity(options.max_batch.max(1)),
            // The first batch sweeps: rows may have expired while the process was down.
            last_sweep: Instant::now().checked_sub(SWEEP_EVERY).unwrap_or_else(Instant::now),
            acks,
            broken: Arc::clone(&broken),
            commits,
        };
        // The writer goes right after the log's threads: joining it drops its `Acks` and
        // `CommitSignal`, which ends the syncer and the checkpointer.
        threads.insert(2, spawn("sqlite-writer".to_owned(), move || writer.run(write_rx))?);
        let read_rx = Arc::new(Mutex::new(read_rx));
        for (index, reader) in readers.into_iter().enumerate() {
            let jobs = Arc::clone(&read_rx);
            threads.push(spawn(format!("sqlite-reader-{index}"), move || run_reader(reader, &jobs))?);
        }
        Ok(Self {
            writes: Some(write_tx),
            log: Some(log_tx),
            reads: Some(read_tx),
            threads,
            path: path.to_owned(),
            broken,
            #[cfg(test)]
            checkpoints,
        })
    }

    /// Asks the writer to restart the WAL, as the checkpointer does once it is long.
    #[cfg(test)]
    fn request_wal_restart(&self) {
        self.checkpoints.restart_due.store(true, Ordering::Release);
    }

    /// Queues `op` for the writer and waits until it is committed.
    async fn write(&self, op: WriteOp) -> Result<Written, SqliteError> {
        ask(self.writes.as_ref(), "writer", |reply| WriteJob { op, reply }).await?
    }

    /// Appends an unreadable envelope to the set-aside file; `false` (logged) if that failed,
    /// and the envelope stays open for the next start to try again.
    fn set_aside(&self, envelope_id: &str, json: &str) -> bool {
        match set_aside(&unreadable_path(&self.path), envelope_id, json) {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%envelope_id, %error, "Could not set an unreadable envelope aside; it stays open.");
                false
            }
        }
    }

    /// Queues `op` for the inbound log's thread and waits until it is written (and synced).
    async fn log(&self, op: LogOp) -> Result<Logged, SqliteError> {
        ask(self.log.as_ref(), "inbound log", |reply| LogJob { op, reply }).await?.map_err(SqliteError::Log)
    }

    /// Queues `op` for a reader and waits for its answer.
    async fn read(&self, op: ReadOp) -> Result<Fetched, SqliteError> {
        ask(self.reads.as_ref(), "reader", |reply| ReadJob { op, reply }).await?
    }

    /// A write whose only result is success.
    async fn write_done(&self, op: WriteOp, what: &'static str) -> Result<(), StoreError> {
        match self.write(op).await? {
            Written::Done => Ok(()),
            _ => Err(SqliteError::Mismatch(what).into()),
        }
    }
}

/// Queues the job `job` makes around its reply channel on `queue` (the queue of the store's
/// `thread`) and waits for the reply.
async fn ask<J, T>(
    queue: Option<&mpsc::Sender<J>>,
    thread: &'static str,
    job: impl FnOnce(oneshot::Sender<T>) -> J,
) -> Result<T, SqliteError> {
    let queue = queue.ok_or(SqliteError::Stopped(thread))?;
    let (reply, answer) = oneshot::channel();
    queue.send(job(reply)).await.map_err(|_| SqliteError::Stopped(thread))?;
    answer.await.map_err(|_| SqliteError::Stopped(thread))
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the queues ends the threads once they have handled what is already queued.
        self.log.take();
        self.writes.take();
        self.reads.take();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "SQLite store thread panicked.");
            }
        }
    }
}

/// The WAL file of the database at `path`, as SQLite names it.
fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Rebuilds the live dedupe claims: those on journal rows, and those schema 1 kept in `dedupe`.
fn load_claims(conn: &Connection) -> Result<Vec<(ClaimKey, i64)>, rusqlite::Error> {
    let now = now_ms();
    let mut claims = Vec::new();
    let mut journal = conn.prepare("SELECT claim, claim_expires_at FROM journal WHERE claim_expires_at > ?1")?;
    let mut rows = journal.query(params![now])?;
    while let Some(row) = rows.next()? {
        // Read leniently: one damaged cell must not stop every start.
        let claim: Option<Vec<u8>> = row.get(0).ok().flatten();
        match (claim.as_deref().map(ClaimKey::try_from), row.get::<_, i64>(1)) {
            (Some(Ok(key)), Ok(expires_at)) => claims.push((key, expires_at)),
            _ => tracing::warn!("A journal row's dedupe claim is malformed; skipped."),
        }
    }
    let mut legacy =
        conn.prepare("SELECT channel, platform_message_id, expires_at FROM dedupe WHERE expires_at > ?1")?;
    let mut rows = legacy.query(params![now])?;
    while let Some(row) = rows.next()? {
        let (channel, id) = (lossy_text(row, 0)?, lossy_text(row, 1)?);
        match row.get::<_, i64>(2) {
            Ok(expires_at) => claims.push((claim_key(&channel, &id), expires_at)),
            Err(_) => tracing::warn!("A schema 1 dedupe row's expiry is malformed; skipped."),
        }
    }
    Ok(claims)
}

fn spawn(name: String, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, SqliteError> {
    std::thread::Builder::new().name(name.clone()).spawn(body).map_err(|source| SqliteError::Spawn { name, source })
}

/// The schema version from which accepted envelopes are in the inbound log.
const LOG_SCHEMA_VERSION: i64 = 3;

/// Creates `dir` and whatever of its ancestors is missing, each synced into its parent: without
/// that a power loss soon after the first start could take the new directory, and the messages
/// acknowledged from it, with it.
fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    let missing: Vec<&Path> =
        dir.ancestors().take_while(|ancestor| !ancestor.as_os_str().is_empty() && !ancestor.exists()).collect();
    std::fs::create_dir_all(dir)?;
    // Each entry made durable in its parent; `dir`'s always (an earlier start may have created
    // it and stopped before syncing it).
    for created in missing {
        super::sync_directory_of(created)?;
    }
    super::sync_directory_of(dir)
}

/// Applies the missing [`MIGRATIONS`] in one transaction, or refuses a newer schema.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), SqliteError> {
    let at = |source| SqliteError::Open { path: path.to_owned(), source };
    // IMMEDIATE: two processes opening a fresh file at once must not both migrate it.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(at)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(at)?;
    let applied = usize::try_from(found).ok().filter(|applied| *applied <= MIGRATIONS.len());
    let Some(applied) = applied else {
        return Err(SqliteError::TooNew { path: path.to_owned(), found, known: MIGRATIONS.len() });
    };
    for (index, step) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(step).map_err(at)?;
        tx.pragma_update(None, "user_version", index + 1).map_err(at)?;
    }
    tx.commit().map_err(at)
}

/// Deletes the answered marks and pending parts of logged envelopes that are no longer open: a
/// crash between the log's finish record and the SQLite side of `finish` leaves them behind.
fn forget_answers_of_closed(conn: &mut Connection, scanned: &inbound_log::Scanned) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // An id that is not UTF-8 matches no envelope (nor a later write): left alone, not fatal.
    let ids = |tx: &rusqlite::Transaction<'_>, query: &str| -> Result<Vec<String>, rusqlite::Error> {
        let ids = tx.prepare(query)?.query_map([], |row| key_text(row, 0))?.collect::<Result<Vec<_>, _>>()?;
        Ok(ids.into_iter().flatten().collect())
    };
    let answered = ids(&tx, "SELECT envelope_id FROM answered")?;
    for envelope_id in answered.iter().filter(|id| !scanned.is_open(id)) {
        tx.execute("DELETE FROM outbox WHERE envelope_id = ?1 AND state = 'pending'", params![envelope_id])?;
        tx.execute("DELETE FROM answered WHERE envelope_id = ?1", params![envelope_id])?;
    }
    // Likewise the streamed messages of envelopes no longer open (in the log, or as a legacy
    // journal row).
    let streamed = ids(&tx, "SELECT envelope_id FROM live_stream")?;
    for envelope_id in streamed.iter().filter(|id| !scanned.is_open(id)) {
        tx.execute(
            "DELETE FROM live_stream WHERE envelope_id = ?1
             AND NOT EXISTS (SELECT 1 FROM journal WHERE envelope_id = ?1 AND state <> 'finished')",
            params![envelope_id],
        )?;
    }
    tx.commit()
}

fn to_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Writer

/// How often the writer deletes schema 1's expired `dedupe` rows (the inbound log's thread
/// sweeps the live claims itself).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// One write operation, with everything already encoded so the writer only runs SQL.
#[derive(Debug)]
enum WriteOp {
    /// `open_in_log`: the inbound log had the envelope open when the answer was recorded.
    RecordAnswer {
        envelope_id: String,
        session_key: String,
        turn: Option<Turn>,
        parts: Vec<Part>,
        open_in_log: bool,
    },
    PartDelivered {
        delivery_id: String,
    },
    PartFailed {
        delivery_id: String,
        reason: String,
    },
    RecordStream {
        envelope_id: String,
        json: String,
    },
    /// Writes nothing: answered once everything queued before it is committed (and synced).
    Barrier,
    SaveParked {
        users: Vec<ParkedUser>,
    },
    /// The SQLite side of finishing: pending parts, the answered mark and the streamed
    /// message's record go.
    ForgetAnswer {
        envelope_id: String,
    },
    /// Removes at most `limit` rows from each table (see `Store::prune`).
    Prune {
        before_ms: i64,
        limit: i64,
    },
    ForgetTurn {
        envelope_id: String,
    },
    AppendTurn {
        session_key: String,
        turn: Turn,
    },
    ClearHistory {
        session_key: String,
    },
}

/// An outbox part: its id and its JSON.
#[derive(Debug)]
struct Part {
    delivery_id: String,
    json: String,
}

/// What a committed write operation produced.
#[derive(Debug)]
enum Written {
    /// Rows removed, and whether a table removed as many as the op's limit (so more may be due).
    Pruned {
        removed: u64,
        more: bool,
    },
    Done,
}

type WriteReply = oneshot::Sender<Result<Written, SqliteError>>;

struct WriteJob {
    op: WriteOp,
    reply: WriteReply,
}

/// A committed operation's answer, not yet sent.
type Ack = (WriteReply, Result<Written, SqliteError>);

/// When callers learn that their committed operations happened.
enum Acks {
    /// Right after `COMMIT` (`Durability::ProcessCrash`).
    AtCommit,
    /// After the syncer thread has fsynced the WAL past the commit (`Durability::PowerLoss`).
    AfterSync {
        syncer: std::sync::mpsc::SyncSender<Vec<Ack>>,
        /// Called after each commit, before the batch is handed to the syncer.
        start_writeback: StartWriteback,
    },
}

/// The writer thread's state: the write connection and the settings its SQL needs.
struct Writer {
    conn: Connection,
    max_turns_kept: i64,
    max_batch: usize,
    /// Each batch's results until its commit; kept to reuse the allocation.
    results: Vec<Result<Written, SqliteError>>,
    /// When schema 1's expired `dedupe` rows were last deleted. Sweeping on a timer (as
    /// `MemoryStore` does) deletes them even if nobody calls `prune`.
    last_sweep: Instant,
    acks: Acks,
    /// Set by the syncer when an fsync failed: from then on every write fails.
    broken: Arc<AtomicBool>,
    /// Tells the checkpointer there are new pages to copy; says when the WAL should restart.
    commits: CommitSignal,
}

impl Writer {
    /// Commits batches until every sender is gone and the queue is drained.
    fn run(mut self, jobs: mpsc::Receiver<WriteJob>) {
        super::serve_in_batches(jobs, self.max_batch, Duration::ZERO, |batch| self.commit(batch));
    }

    /// Runs `batch` in one transaction and answers each caller once it is committed (and, with
    /// a syncer, synced).
    fn commit(&mut self, batch: &mut Vec<WriteJob>) {
        // NOTE: applied even if its caller is gone. Writes record what already happened (a part
        // the platform confirmed, an answer, a finish): skipping one would make recovery send a
        // part again or ask the model again. (The inbound log skips them: see the module docs.)
        if self.broken.load(Ordering::Acquire) {
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(SqliteError::SyncFailed(ALREADY_BROKEN.to_owned())));
            }
            return;
        }
        match self.apply_batch(batch) {
            Ok(()) => {
                self.commits.committed();
                let acks = batch.drain(..).map(|job| job.reply).zip(self.results.drain(..));
                match &mut self.acks {
                    Acks::AtCommit => acks.for_each(|(reply, result)| drop(reply.send(result))),
                    Acks::AfterSync { syncer, start_writeback } => {
                        let acks: Vec<Ack> = acks.collect();
                        if let Err(error) = start_writeback() {
                            // The kernel may have dropped these pages, and a later fdatasync
                            // could then succeed for data that never reached the disk.
                            let error = error.to_string();
                            break_for_good(&self.broken, "starting the write-ahead log's writeback", &error);
                            answer_not_durable(acks, &error);
                        } else if let Err(unsent) = syncer.send(acks) {
                            // The syncer only stops with the store (or by a bug); nobody may
                            // hear "done" for a write that was never synced, so nothing more
                            // is written either.
                            self.broken.store(true, Ordering::Release);
                            tracing::error!("The SQLite store's syncer thread has stopped; writes are refused.");
                            for (reply, _) in unsent.0 {
                                let _ = reply.send(Err(SqliteError::Stopped("syncer")));
                            }
                        }
                    }
                }
            }
            Err(error) => {
                // The whole transaction rolled back: nobody's operation happened.
                self.results.clear();
                let message = error.to_string();
                tracing::error!(error = %message, operations = batch.len(), "SQLite store commit failed.");
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(SqliteError::RolledBack(message.clone())));
                }
            }
        }
        // After the answers are on their way, so that only the next batch waits for it.
        if self.commits.flags.restart_due.swap(false, Ordering::AcqRel) {
            self.copy_rest_of_wal();
        }
    }

    /// Copies the frames the checkpointer has not, so that the next transaction restarts the
    /// WAL. Tried again after the next batch if it could not finish (the checkpointer or a
    /// reader's snapshot in the way).
    fn copy_rest_of_wal(&self) {
        match checkpoint(&self.conn) {
            Checkpointed::Done { complete: true, .. } => {}
            Checkpointed::Done { complete: false, .. } | Checkpointed::Failed(_) => {
                self.commits.flags.restart_due.store(true, Ordering::Release);
            }
            Checkpointed::DiskFailed(error) => {
                break_for_good(&self.broken, "copying the WAL into the database", &error)
            }
        }
    }

    /// Commits `batch` in one transaction, leaving one result per operation in `self.results`.
    /// `Err` means the transaction rolled back.
    ///
    /// Fast path: the operations run back to back. A `SAVEPOINT` per operation would copy every
    /// page each operation touches into a statement journal and release it again, a large part
    /// of the writer's CPU, to handle a failure that practically never happens. Only if an
    /// operation fails is the transaction rolled back and the batch redone with one savepoint
    /// per operation, so that the failing one rolls back alone.
    fn apply_batch(&mut self, batch: &[WriteJob]) -> Result<(), rusqlite::Error> {
        let now = now_ms();
        let sweep = self.last_sweep.elapsed() >= SWEEP_EVERY;
        if sweep {
            self.last_sweep = Instant::now();
        }
        if self.run_batch(batch, now, sweep, false)? {
            return Ok(());
        }
        self.results.clear();
        // With savepoints a failing operation is recorded as its result, so this commits.
        self.run_batch(batch, now, sweep, true).map(drop)
    }

    /// One transaction over `batch`. Without `savepoints`, returns `Ok(false)` (transaction
    /// rolled back, `self.results` partial) as soon as an operation fails; with them, records
    /// each failure as that operation's result and commits the rest.
    fn run_batch(
        &mut self,
        batch: &[WriteJob],
        now: i64,
        sweep: bool,
        savepoints: bool,
    ) -> Result<bool, rusqlite::Error> {
        let kept = self.max_turns_kept;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if sweep {
            // Claims written by schema 1. Indexed on `expires_at`: costs what expired since the
            // last sweep, not a scan.
            let swept = isolated(&tx, savepoints, |tx| {
                tx.prepare_cached("DELETE FROM dedupe WHERE expires_at <= ?1")?.execute(params![now])
            })?;
            match swept {
                Ok(_) => {}
                Err(_) if !savepoints => return tx.rollback().map(|()| false),
                Err(error) => tracing::warn!(%error, "Sweeping expired schema-1 dedupe claims failed."),
            }
        }
        for job in batch {
            match isolated(&tx, savepoints, |tx| apply(tx, &job.op, now, kept)) {
                Ok(Ok(written)) => self.results.push(Ok(written)),
                Ok(Err(_)) if !savepoints => return tx.rollback().map(|()| false),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "SQLite store operation failed.");
                    self.results.push(Err(SqliteError::Sqlite(error)));
                }
                Err(error) => return Err(error),
            }
        }
        tx.commit()?;
        Ok(true)
    }
}

/// Runs `body`, inside its own savepoint if `savepoint` (rolled back alone if it fails). The
/// outer `Err` means the transaction itself is gone.
fn isolated<T>(
    conn: &Connection,
    savepoint: bool,
    body: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
) -> Result<Result<T, rusqlite::Error>, rusqlite::Error> {
    if !savepoint {
        return Ok(body(conn));
    }
    conn.prepare_cached("SAVEPOINT op")?.execute([])?;
    let result = body(conn);
    if result.is_err() {
        // If SQLite already rolled back the whole transaction (I/O error, disk full), the
        // savepoint is gone and this fails the batch, as it must.
        conn.prepare_cached("ROLLBACK TO op")?.execute([])?;
    }
    conn.prepare_cached("RELEASE op")?.execute([])?;
    Ok(result)
}

/// Runs one operation's SQL on the writer connection.
fn apply(conn: &Connection, op: &WriteOp, now: i64, kept: i64) -> Result<Written, rusqlite::Error> {
    match op {
        WriteOp::RecordAnswer { envelope_id, session_key, turn, parts, open_in_log } => {
            if let Some(turn) = turn {
                push_turn(conn, session_key, turn, Some(envelope_id), now, kept)?;
            }
            // A row journaled before schema 3.
            let answered_in_table = conn
                .prepare_cached("UPDATE journal SET state = 'answered' WHERE envelope_id = ?1 AND state <> 'finished'")?
                .execute(params![envelope_id])?;
            if *open_in_log {
                conn.prepare_cached("INSERT OR REPLACE INTO answered (envelope_id, answered_at) VALUES (?1, ?2)")?
                    .execute(params![envelope_id, now])?;
            }
            // NOTE: parts of an unknown or finished envelope would never be recovered nor
            // removed, so they are not stored. (MemoryStore keeps no parts at all: outbox and
            // recovery can only be tested through this store.)
            if *open_in_log || answered_in_table > 0 {
                // Recording again replaces the parts.
                conn.prepare_cached("DELETE FROM outbox WHERE envelope_id = ?1 AND state = 'pending'")?
                    .execute(params![envelope_id])?;
                let mut insert = conn.prepare_cached(
                    "INSERT INTO outbox (delivery_id, envelope_id, part_index, delivery, state, reason, updated_at)
                     VALUES (?1, ?2, ?3, ?4, 'pending', NULL, ?5)
                     ON CONFLICT (delivery_id) DO UPDATE SET envelope_id = excluded.envelope_id,
                         part_index = excluded.part_index, delivery = excluded.delivery, state = 'pending',
                         reason = NULL, updated_at = excluded.updated_at",
                )?;
                for (index, part) in parts.iter().enumerate() {
                    insert.execute(params![part.delivery_id, envelope_id, to_i64(index), part.json, now])?;
                }
            }
            Ok(Written::Done)
        }
        WriteOp::PartDelivered { delivery_id } => {
            conn.prepare_cached("DELETE FROM outbox WHERE delivery_id = ?1")?.execute(params![delivery_id])?;
            Ok(Written::Done)
        }
        WriteOp::PartFailed { delivery_id, reason } => {
            conn.prepare_cached(
                "UPDATE outbox SET state = 'failed', reason = ?2, updated_at = ?3 WHERE delivery_id = ?1",
            )?
            .execute(params![delivery_id, reason, now])?;
            Ok(Written::Done)
        }
        WriteOp::ForgetAnswer { envelope_id } => {
            conn.prepare_cached(
                "UPDATE journal SET state = 'finished', finished_at = ?2 WHERE envelope_id = ?1 AND state <> 'finished'",
            )?
            .execute(params![envelope_id, now])?;
            conn.prepare_cached("DELETE FROM outbox WHERE envelope_id = ?1 AND state = 'pending'")?
                .execute(params![envelope_id])?;
            conn.prepare_cached("DELETE FROM answered WHERE envelope_id = ?1")?.execute(params![envelope_id])?;
            conn.prepare_cached("DELETE FROM live_stream WHERE envelope_id = ?1")?.execute(params![envelope_id])?;
            Ok(Written::Done)
        }
        WriteOp::Barrier => Ok(Written::Done),
        WriteOp::SaveParked { users } => {
            for ParkedUser { channel, user, record } in users {
                match record {
                    Some(record) => conn
                        .prepare_cached(
                            "INSERT INTO parked (channel, user, record, saved_at) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (channel, user) DO UPDATE SET record = excluded.record, saved_at = excluded.saved_at",
                        )?
                        .execute(params![channel, user, record, now])?,
                    None => conn
                        .prepare_cached("DELETE FROM parked WHERE channel = ?1 AND user = ?2")?
                        .execute(params![channel, user])?,
                };
            }
            Ok(Written::Done)
        }
        WriteOp::RecordStream { envelope_id, json } => {
            conn.prepare_cached(
                "INSERT INTO live_stream (envelope_id, stream, recorded_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (envelope_id) DO UPDATE SET stream = excluded.stream, recorded_at = excluded.recorded_at",
            )?
            .execute(params![envelope_id, json, now])?;
            Ok(Written::Done)
        }
        WriteOp::Prune { before_ms, limit } => {
            // `live_stream` rows go with their envelope (at its finish, or at the next start
            // once it is closed), never by age: an open envelope needs its row however old.
            let removed = [
                conn.prepare_cached(
                    "DELETE FROM history WHERE seq IN (SELECT seq FROM history WHERE created_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before_ms, limit])?,
                // A finished entry whose claim is live stays: after a restart, it is the claim.
                conn.prepare_cached(
                    "DELETE FROM journal WHERE seq IN (SELECT seq FROM journal WHERE state = 'finished'
                     AND finished_at < ?1 AND (claim_expires_at IS NULL OR claim_expires_at <= ?2) LIMIT ?3)",
                )?
                .execute(params![before_ms, now, limit])?,
                conn.prepare_cached(
                    "DELETE FROM outbox WHERE rowid IN
                     (SELECT rowid FROM outbox WHERE state = 'failed' AND updated_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before_ms, limit])?,
                conn.prepare_cached(
                    "DELETE FROM dedupe WHERE (channel, platform_message_id) IN
                     (SELECT channel, platform_message_id FROM dedupe WHERE expires_at <= ?1 LIMIT ?2)",
                )?
                .execute(params![now, limit])?,
            ];
            let more = removed.iter().any(|&count| i64::try_from(count).unwrap_or(i64::MAX) >= *limit);
            let removed = removed.iter().map(|&count| u64::try_from(count).unwrap_or(u64::MAX)).sum();
            Ok(Written::Pruned { removed, more })
        }
        WriteOp::AppendTurn { session_key, turn } => {
            push_turn(conn, session_key, turn, None, now, kept)?;
            Ok(Written::Done)
        }
        WriteOp::ForgetTurn { envelope_id } => {
            conn.prepare_cached("DELETE FROM history WHERE envelope_id = ?1")?.execute(params![envelope_id])?;
            Ok(Written::Done)
        }
        WriteOp::ClearHistory { session_key } => {
            conn.prepare_cached("DELETE FROM history WHERE session_key = ?1")?.execute(params![session_key])?;
            Ok(Written::Done)
        }
    }
}

/// Appends a turn and drops the key's turns beyond the `kept` most recent.
fn push_turn(
    conn: &Connection,
    session_key: &str,
    turn: &Turn,
    envelope_id: Option<&str>,
    now: i64,
    kept: i64,
) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(
        "INSERT INTO history (session_key, question, answer, created_at, envelope_id) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![session_key, turn.question, turn.answer, now, envelope_id])?;
    // The subquery is the oldest turn to keep; with fewer turns it is NULL and nothing goes.
    conn.prepare_cached(
        "DELETE FROM history WHERE session_key = ?1 AND seq <
            (SELECT seq FROM history WHERE session_key = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
    )?
    .execute(params![session_key, kept.saturating_sub(1)])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Syncer

/// Why a write is refused once the store is broken (the first failure was logged then).
const ALREADY_BROKEN: &str = "an earlier fsync failed or the syncer thread stopped";

/// Makes the WAL durable (`fdatasync` in production).
type SyncWal = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// Tells the callers of committed operations that their writes may not be on disk.
fn answer_not_durable(acks: impl IntoIterator<Item = Ack>, error: &str) {
    for (reply, _) in acks {
        let _ = reply.send(Err(SqliteError::SyncFailed(error.to_owned())));
    }
}

/// Starts the WAL's new frames on their way to the disk without waiting for them
/// ([`writeback_starter`] in production). `Err` means pages may have been lost.
type StartWriteback = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// The writer's [`StartWriteback`] on `file`. A refusal that loses nothing (the kernel or the
/// filesystem cannot do it, or memory is short: the pages stay dirty for the `fdatasync`) only
/// costs the head start, and is logged once. Any other error is returned: a filesystem may
/// drop pages whose writeback failed to start without recording the error for the `fdatasync`.
fn writeback_starter(file: File) -> StartWriteback {
    let mut warned = false;
    Box::new(move || match start_writeback(&file) {
        Err(error) if loses_nothing(&error) => {
            if !warned {
                warned = true;
                tracing::warn!(%error, "Cannot start the SQLite write-ahead log's writeback early; each fdatasync writes the pages itself.");
            }
            Ok(())
        }
        started => started,
    })
}

/// Whether starting writeback failed without touching the pages.
fn loses_nothing(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::InvalidInput | ErrorKind::Unsupported | ErrorKind::NotSeekable | ErrorKind::OutOfMemory
    )
}

/// Asks the kernel to start writing `file`'s dirty pages out. Does not wait for the writes to
/// finish, though submitting them can block (a full device queue, page locks).
///
/// Only a head start for the syncer's `fdatasync`, which still decides durability: with
/// `SYNC_FILE_RANGE_WRITE` alone the call neither waits for the pages nor consumes the file's
/// writeback error, so a write that fails later still fails the `fdatasync` (which also has its
/// own open file description).
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `file` keeps the descriptor open for the whole call, and the call only reads its
    // integer arguments (offset 0 with length 0 means the whole file).
    let status = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if status == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere the `fdatasync` does all the work.
#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) -> std::io::Result<()> {
    Ok(())
}

/// Makes committed batches durable, then answers their callers. While an fsync runs, the
/// writer already executes the next batch instead of waiting for the disk; it hands that batch
/// over when this thread is ready for it (a rendezvous), so usually each fsync answers one
/// batch, grown while the previous fsync ran.
///
/// A failed fsync leaves the store broken for good: the kernel may have dropped the dirty
/// pages, and a second fsync could report success for data that never reached the disk (the
/// lesson PostgreSQL learnt in 2018). Every waiting and later write fails until yizhan is
/// restarted, once the disk has been checked. (Until the machine reboots, the kernel's cache
/// may still show the restarted process data the disk never got.)
fn run_syncer(mut sync: SyncWal, batches: &std::sync::mpsc::Receiver<Vec<Ack>>, broken: &AtomicBool) {
    let mut waiting: Vec<Vec<Ack>> = Vec::new();
    while let Ok(first) = batches.recv() {
        waiting.push(first);
        waiting.extend(batches.try_iter());
        let synced = if broken.load(Ordering::Acquire) {
            Err(ALREADY_BROKEN.to_owned())
        } else {
            sync().map_err(|error| error.to_string())
        };
        match synced {
            Ok(()) => {
                for (reply, result) in waiting.drain(..).flatten() {
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                break_for_good(broken, "syncing the write-ahead log", &error);
                answer_not_durable(waiting.drain(..).flatten(), &error);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpointer

/// What the writer and the checkpointer tell each other, besides the poke.
#[derive(Default)]
struct CheckpointFlags {
    /// Set by every commit, cleared by each checkpoint pass.
    dirty: AtomicBool,
    /// Set by the checkpointer once the WAL has `checkpoint_pages` frames: the writer should
    /// copy the rest so that the WAL restarts.
    restart_due: AtomicBool,
}

/// The writer's side of the checkpointer's wake-up: a flag, and a poke only when it flips, so
/// thousands of commits a second cost an atomic swap each, not a wake-up each.
struct CommitSignal {
    flags: Arc<CheckpointFlags>,
    /// Wakes an idle checkpointer (capacity 1; a full channel already will).
    poke: std::sync::mpsc::SyncSender<()>,
}

impl CommitSignal {
    fn committed(&self) {
        if !self.flags.dirty.swap(true, Ordering::AcqRel) {
            let _ = self.poke.try_send(());
        }
    }
}

/// What one `PRAGMA wal_checkpoint(PASSIVE)` did.
#[derive(Debug, PartialEq)]
enum Checkpointed {
    /// Copied what it could: every frame (`complete`), or up to a reader's snapshot or not at
    /// all because another checkpoint was running. The WAL holds `frames` frames.
    Done { complete: bool, frames: i64 },
    /// The disk failed (an I/O error, typically a failed write or fsync of the database).
    DiskFailed(String),
    /// Anything else (a lock held by another process, memory); worth trying again.
    Failed(String),
}

/// Runs a `PASSIVE` checkpoint on `conn`: it never waits for the writer or readers and never
/// blocks them; it copies what it can.
fn checkpoint(conn: &Connection) -> Checkpointed {
    let counts = conn.prepare_cached("PRAGMA wal_checkpoint(PASSIVE)").and_then(|mut statement| {
        // Columns: blocked (1 if it could not run at all), WAL frames, frames copied.
        statement.query_row([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?)))
    });
    checkpoint_outcome(counts)
}

fn checkpoint_outcome(counts: Result<(i64, i64, i64), rusqlite::Error>) -> Checkpointed {
    match counts {
        Ok((blocked, frames, copied)) => Checkpointed::Done { complete: blocked == 0 && copied >= frames, frames },
        Err(error) if is_disk_failure(&error) => Checkpointed::DiskFailed(error.to_string()),
        Err(error) => Checkpointed::Failed(error.to_string()),
    }
}

/// Whether `error` says the disk may have lost data: any I/O error except those of locks,
/// shared memory and allocation, which lose nothing and may pass. (An I/O error of a kind not
/// listed counts as lost data: the store stops rather than guesses.)
fn is_disk_failure(error: &rusqlite::Error) -> bool {
    use rusqlite::ffi;
    const HARMLESS: &[std::ffi::c_int] = &[
        ffi::SQLITE_IOERR_LOCK,
        ffi::SQLITE_IOERR_RDLOCK,
        ffi::SQLITE_IOERR_UNLOCK,
        ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
        ffi::SQLITE_IOERR_SHMOPEN,
        ffi::SQLITE_IOERR_SHMSIZE,
        ffi::SQLITE_IOERR_SHMLOCK,
        ffi::SQLITE_IOERR_SHMMAP,
        ffi::SQLITE_IOERR_NOMEM,
    ];
    matches!(error, rusqlite::Error::SqliteFailure(failure, _)
        if failure.code == rusqlite::ErrorCode::SystemIoFailure && !HARMLESS.contains(&failure.extended_code))
}

/// The checkpointer thread's state.
struct Checkpointer {
    conn: Connection,
    flags: Arc<CheckpointFlags>,
    broken: Arc<AtomicBool>,
    /// WAL frames from which the writer is asked to restart the WAL.
    restart_pages: i64,
    /// The least time between two passes.
    interval: Duration,
}

impl Checkpointer {
    /// Copies committed WAL pages into the database file, at most every `interval` while commits
    /// keep coming; sleeps while there are none. Ends when the writer does, or when the disk
    /// fails. A pass cut short (a reader's snapshot, the writer's own checkpoint) is simply
    /// followed by the next one.
    fn run(self, pokes: &std::sync::mpsc::Receiver<()>) {
        let Self { conn, flags, broken, restart_pages, interval } = self;
        let mut failing = false;
        while pokes.recv().is_ok() {
            loop {
                // Rest first: the commits of the next `interval` are copied in one pass, and a
                // page they rewrite many times is copied once. Leave at once when the writer is
                // gone (a poke here means more commits; `dirty` says so too).
                let deadline = Instant::now() + interval;
                loop {
                    match pokes.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(()) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                if !flags.dirty.swap(false, Ordering::AcqRel) {
                    break;
                }
                match checkpoint(&conn) {
                    Checkpointed::Done { frames, .. } => {
                        if failing {
                            failing = false;
                            tracing::info!("Background checkpoints of the SQLite WAL work again.");
                        }
                        if frames >= restart_pages {
                            flags.restart_due.store(true, Ordering::Release);
                        }
                    }
                    Checkpointed::DiskFailed(error) => {
                        break_for_good(&broken, "copying the WAL into the database", &error);
                        return;
                    }
                    Checkpointed::Failed(error) => {
                        if !failing {
                            failing = true;
                            tracing::warn!(%error, "Background checkpoint of the SQLite WAL failed; trying again with the next commits.");
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Readers

#[derive(Debug)]
enum ReadOp {
    History {
        session_key: String,
        max_turns: i64,
    },
    /// The open rows journaled before schema 3, then `logged` (the inbound log's open
    /// envelopes), each with its pending parts if answered.
    Unfinished {
        logged: Vec<Envelope>,
    },
    Parked,
}

#[derive(Debug)]
enum Fetched {
    History(Vec<Turn>),
    /// The unfinished envelopes, and the journal rows of schemas 1 and 2 whose envelope cannot
    /// be read (id and JSON), for the caller to set aside and finish.
    Unfinished(Vec<Unfinished>, Vec<(String, String)>),
    Parked(Vec<(String, SystemTime)>),
}

struct ReadJob {
    op: ReadOp,
    reply: oneshot::Sender<Result<Fetched, SqliteError>>,
}

/// Serves queries until the store is dropped; the readers share one queue.
fn run_reader(mut conn: Connection, jobs: &Mutex<mpsc::Receiver<ReadJob>>) {
    loop {
        // NOTE: the lock is held only while waiting for the next job, never while querying.
        let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).blocking_recv();
        let Some(job) = job else { break };
        if job.reply.is_closed() {
            continue;
        }
        let result = query(&mut conn, &job.op).map_err(SqliteError::from);
        let _ = job.reply.send(result);
    }
}

fn query(conn: &mut Connection, op: &ReadOp) -> Result<Fetched, rusqlite::Error> {
    match op {
        ReadOp::History { session_key, max_turns } => {
            let mut statement = conn.prepare_cached(
                "SELECT question, answer FROM
                    (SELECT seq, question, answer FROM history WHERE session_key = ?1 ORDER BY seq DESC LIMIT ?2)
                 ORDER BY seq",
            )?;
            let turns = statement
                .query_map(params![session_key, max_turns], |row| {
                    Ok(Turn { question: lossy_text(row, 0)?, answer: lossy_text(row, 1)? })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Fetched::History(turns))
        }
        ReadOp::Parked => {
            let mut statement = conn.prepare_cached("SELECT record, saved_at FROM parked")?;
            let records = statement
                .query_map([], |row| {
                    // Unreadable: taken as saved now, so that the text is kept rather than
                    // forgotten as old (and one bad cell does not stop the start).
                    let saved_at = row.get::<_, i64>(1).ok().and_then(|ms| u64::try_from(ms).ok());
                    let saved_at =
                        saved_at.map_or_else(SystemTime::now, |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
                    Ok((lossy_text(row, 0)?, saved_at))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Fetched::Parked(records))
        }
        ReadOp::Unfinished { logged } => {
            // One read transaction: the journal and the outbox are seen at the same instant.
            let tx = conn.transaction()?;
            let mut unfinished = Vec::new();
            let mut unreadable = Vec::new();
            {
                // NOTE: without `INDEXED BY`, the planner scans the whole journal (finished rows
                // included) in `seq` order to save a sort of the few open rows.
                let mut journal = tx.prepare_cached(
                    "SELECT envelope_id, envelope, state FROM journal INDEXED BY journal_open
                     WHERE state <> 'finished' ORDER BY seq",
                )?;
                let mut outbox = tx.prepare_cached(
                    "SELECT delivery_id, delivery FROM outbox
                     WHERE envelope_id = ?1 AND state = 'pending' ORDER BY part_index",
                )?;
                let mut streams = tx.prepare_cached("SELECT stream FROM live_stream WHERE envelope_id = ?1")?;
                let mut rows = journal.query([])?;
                while let Some(row) = rows.next()? {
                    // A damaged id would never match its row again: answered at every start.
                    let Some(envelope_id) = key_text(row, 0)? else {
                        tracing::error!("A journal row's envelope id is not UTF-8 (a damaged database?); skipped.");
                        continue;
                    };
                    let json = lossy_text(row, 1)?;
                    let state = lossy_text(row, 2)?;
                    if let Some(envelope) = parse_envelope(&envelope_id, &json) {
                        let pending_parts =
                            if state == "answered" { Some(pending_parts(&mut outbox, &envelope_id)?) } else { None };
                        let live_stream = live_stream_of(&mut streams, &envelope_id)?;
                        unfinished.push(Unfinished { envelope, pending_parts, live_stream });
                    } else {
                        unreadable.push((envelope_id, json));
                    }
                }
                let mut answered = tx.prepare_cached("SELECT 1 FROM answered WHERE envelope_id = ?1")?;
                for envelope in logged {
                    let pending_parts = if answered.exists(params![envelope.id])? {
                        Some(pending_parts(&mut outbox, &envelope.id)?)
                    } else {
                        None
                    };
                    let live_stream = live_stream_of(&mut streams, &envelope.id)?;
                    unfinished.push(Unfinished { envelope: envelope.clone(), pending_parts, live_stream });
                }
            }
            tx.commit()?;
            Ok(Fetched::Unfinished(unfinished, unreadable))
        }
    }
}

/// Column `index` as text, whatever the cell holds: SQLite checks no encoding and keeps no
/// page checksums, so a flipped bit (or another tool's write) can leave bytes that are not
/// UTF-8, or a blob, where text was stored. Read strictly, one such cell failed the whole read,
/// recovery included, on every start; read this way, the damage stays in its record (whose
/// JSON then fails to parse and is skipped, or keeps a replacement character).
fn lossy_text(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<String> {
    use rusqlite::types::ValueRef;
    Ok(match row.get_ref(index)? {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        ValueRef::Null => String::new(),
        ValueRef::Integer(number) => number.to_string(),
        ValueRef::Real(number) => number.to_string(),
    })
}

/// A key column (an id later writes are matched on) as text, or `None` if it is not UTF-8:
/// read lossily, it would match nothing.
fn key_text(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Option<String>> {
    use rusqlite::types::ValueRef;
    Ok(match row.get_ref(index)? {
        ValueRef::Text(bytes) => std::str::from_utf8(bytes).ok().map(str::to_owned),
        _ => None,
    })
}

/// The streamed message recorded for an envelope; one whose record this build cannot read is
/// left out (the answer then goes into a new message, as without a record).
fn live_stream_of(
    streams: &mut rusqlite::CachedStatement<'_>,
    envelope_id: &str,
) -> Result<Option<LiveStream>, rusqlite::Error> {
    let Some(json) = streams.query_row(params![envelope_id], |row| lossy_text(row, 0)).optional()? else {
        return Ok(None);
    };
    match serde_json::from_str(&json) {
        Ok(stream) => Ok(Some(stream)),
        Err(error) => {
            tracing::warn!(%envelope_id, %error, "A streamed message's record is unreadable; the answer goes into a new one.");
            Ok(None)
        }
    }
}

/// Where envelopes this build cannot read are set aside (one JSON object per line:
/// `envelope_id`, `envelope` as journaled): a rollback to an older build, or a bug, must not
/// make an accepted message vanish without a trace an operator could act on.
fn unreadable_path(db: &Path) -> PathBuf {
    super::beside(db, ".unreadable.jsonl")
}

/// Appends one unreadable envelope to `path`, synced before it is finished in the log.
///
/// NOTE: plain blocking I/O, on the caller's thread: this runs at start-up, before any request
/// is served, and only for envelopes that could not be read.
fn set_aside(path: &Path, envelope_id: &str, json: &str) -> std::io::Result<()> {
    use std::io::Write;
    let line = serde_json::json!({ "envelope_id": envelope_id, "envelope": json }).to_string();
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_data()?;
    super::sync_directory_of(path)
}

/// A journaled envelope, or `None` (logged) if it cannot be read.
///
/// NOTE: an unreadable envelope is logged and skipped rather than failing recovery as a whole:
/// one bad entry must not stop every later restart.
fn parse_envelope(envelope_id: &str, json: &str) -> Option<Envelope> {
    match serde_json::from_str::<Envelope>(json) {
        Ok(envelope) => Some(envelope),
        Err(error) => {
            tracing::error!(%envelope_id, %error, "Journaled envelope is unreadable; skipped.");
            None
        }
    }
}

/// The pending outbox parts of `envelope_id`, in order; unreadable ones are logged and skipped.
fn pending_parts(
    outbox: &mut rusqlite::CachedStatement<'_>,
    envelope_id: &str,
) -> Result<Vec<Delivery>, rusqlite::Error> {
    let mut parts = Vec::new();
    let mut rows = outbox.query(params![envelope_id])?;
    while let Some(part) = rows.next()? {
        // A damaged id would never match its row again: the part sent at every start.
        let Some(delivery_id) = key_text(part, 0)? else {
            tracing::error!(%envelope_id, "An outbox part's id is not UTF-8 (a damaged database?); skipped.");
            continue;
        };
        let json = lossy_text(part, 1)?;
        match serde_json::from_str::<Delivery>(&json) {
            Ok(delivery) => parts.push(delivery),
            Err(error) => {
                tracing::error!(%envelope_id, %delivery_id, %error, "Outbox part is unreadable; skipped.");
            }
        }
    }
    Ok(parts)
}

// ---------------------------------------------------------------------------------------------
// The trait

impl Store for SqliteStore {
    fn accept<'a>(
        &'a self,
        envelope: &'a Envelope,
        dedupe_ttl: Duration,
    ) -> BoxFuture<'a, Result<Acceptance, StoreError>> {
        Box::pin(async move {
            // Encoded here, on the caller's thread, so the log's thread only copies bytes.
            let op = LogOp::Accept {
                claim: claim_key(envelope.channel.as_str(), &envelope.platform_message_id),
                envelope_id: envelope.id.clone(),
                envelope: serde_json::to_string(envelope).map_err(SqliteError::from)?,
                ttl_ms: duration_ms(dedupe_ttl),
            };
            match self.log(op).await? {
                Logged::Accepted(acceptance) => Ok(acceptance),
                _ => Err(SqliteError::Mismatch("accept").into()),
            }
        })
    }

    fn record_answer<'a>(
        &'a self,
        envelope_id: &'a str,
        session_key: &'a str,
        turn: Option<Turn>,
        parts: &'a [Delivery],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let parts = parts
                .iter()
                .map(|part| Ok(Part { delivery_id: part.delivery_id.clone(), json: serde_json::to_string(part)? }))
                .collect::<Result<Vec<_>, serde_json::Error>>()
                .map_err(SqliteError::from)?;
            let open_in_log = match self.log(LogOp::IsOpen { envelope_id: envelope_id.to_owned() }).await? {
                Logged::IsOpen(open) => open,
                _ => return Err(SqliteError::Mismatch("record_answer").into()),
            };
            let op = WriteOp::RecordAnswer {
                envelope_id: envelope_id.to_owned(),
                session_key: session_key.to_owned(),
                turn,
                parts,
                open_in_log,
            };
            self.write_done(op, "record_answer").await
        })
    }

    fn part_delivered<'a>(&'a self, delivery_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write_done(WriteOp::PartDelivered { delivery_id: delivery_id.to_owned() }, "part_delivered"))
    }

    fn part_failed<'a>(&'a self, delivery_id: &'a str, reason: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let op = WriteOp::PartFailed { delivery_id: delivery_id.to_owned(), reason: reason.to_owned() };
        Box::pin(self.write_done(op, "part_failed"))
    }

    fn record_stream<'a>(
        &'a self,
        envelope_id: &'a str,
        stream: &'a LiveStream,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let json = serde_json::to_string(stream).map_err(SqliteError::from)?;
            self.write_done(WriteOp::RecordStream { envelope_id: envelope_id.to_owned(), json }, "record_stream").await
        })
    }

    fn finish<'a>(&'a self, envelope_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // The log first: once the finish is durable, recovery never asks about this envelope
            // again, so a crash before the SQLite side only leaves unused rows behind.
            match self.log(LogOp::Finish { envelope_id: envelope_id.to_owned() }).await? {
                Logged::Finished => {}
                _ => return Err(SqliteError::Mismatch("finish").into()),
            }
            self.write_done(WriteOp::ForgetAnswer { envelope_id: envelope_id.to_owned() }, "finish").await
        })
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<Unfinished>, StoreError>> {
        Box::pin(async move {
            let logged = match self.log(LogOp::Open).await? {
                Logged::Open(logged) => logged,
                _ => return Err(SqliteError::Mismatch("unfinished").into()),
            };
            let mut readable = Vec::with_capacity(logged.len());
            for OpenEnvelope { envelope_id, json } in logged {
                match parse_envelope(&envelope_id, &json) {
                    Some(envelope) => readable.push(envelope),
                    // Set aside, then finished, or it would hold its segment, and every later
                    // one, forever.
                    None => {
                        if self.set_aside(&envelope_id, &json) {
                            // The log's finish is what counts (a failure fails the start, as
                            // before); its answer and pending parts, if any, go too, or, if
                            // that fails, at the next start's cleanup of closed envelopes.
                            drop(self.log(LogOp::Finish { envelope_id: envelope_id.clone() }).await?);
                            let forget = WriteOp::ForgetAnswer { envelope_id: envelope_id.clone() };
                            if let Err(error) = self.write_done(forget, "finish").await {
                                tracing::warn!(envelope = %envelope_id, %error, "Failed to forget the answer of an unreadable logged envelope; the next start does.");
                            }
                        }
                    }
                }
            }
            let logged = readable;
            match self.read(ReadOp::Unfinished { logged }).await? {
                Fetched::Unfinished(unfinished, unreadable) => {
                    // Rows of an older schema: finished there, or logged at every start, never
                    // pruned.
                    for (envelope_id, json) in unreadable {
                        if self.set_aside(&envelope_id, &json) {
                            self.finish(&envelope_id).await?;
                        }
                    }
                    Ok(unfinished)
                }
                _ => Err(SqliteError::Mismatch("unfinished").into()),
            }
        })
    }

    fn prune(&self, before: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            // In chunks, each its own write: one statement removing a year of history would hold
            // every other write (answers, deliveries) behind it, and grow the WAL by all of it
            // before a checkpoint could run.
            let before_ms = system_time_ms(before);
            let mut total: u64 = 0;
            loop {
                match self.write(WriteOp::Prune { before_ms, limit: PRUNE_CHUNK_ROWS }).await? {
                    Written::Pruned { removed, more } => {
                        total = total.saturating_add(removed);
                        if !more {
                            return Ok(total);
                        }
                    }
                    _ => return Err(SqliteError::Mismatch("prune").into()),
                }
            }
        })
    }

    fn history<'a>(&'a self, session_key: &'a str, max_turns: usize) -> BoxFuture<'a, Result<Vec<Turn>, StoreError>> {
        Box::pin(async move {
            let op = ReadOp::History { session_key: session_key.to_owned(), max_turns: to_i64(max_turns) };
            match self.read(op).await? {
                Fetched::History(turns) => Ok(turns),
                _ => Err(SqliteError::Mismatch("history").into()),
            }
        })
    }

    fn append_turn<'a>(&'a self, session_key: &'a str, turn: Turn) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write_done(WriteOp::AppendTurn { session_key: session_key.to_owned(), turn }, "append_turn"))
    }

    fn clear_history<'a>(&'a self, session_key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write_done(WriteOp::ClearHistory { session_key: session_key.to_owned() }, "clear_history"))
    }

    fn forget_turn<'a>(&'a self, envelope_id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write_done(WriteOp::ForgetTurn { envelope_id: envelope_id.to_owned() }, "forget_turn"))
    }

    fn save_parked(&self, users: Vec<ParkedUser>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.write_done(WriteOp::SaveParked { users }, "save_parked"))
    }

    fn load_parked(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>, StoreError>> {
        Box::pin(async move {
            match self.read(ReadOp::Parked).await? {
                Fetched::Parked(records) => Ok(records),
                _ => Err(SqliteError::Mismatch("load_parked").into()),
            }
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // Each thread serves its queue in order and answers a batch only once it is written
            // (and synced): a job queued last is answered after everything queued before it.
            // An id no envelope has: the log writes nothing for it.
            match self.log(LogOp::IsOpen { envelope_id: String::new() }).await? {
                Logged::IsOpen(_) => {}
                _ => return Err(SqliteError::Mismatch("flush").into()),
            }
            self.write_done(WriteOp::Barrier, "flush").await
        })
    }

    /// Served by `/healthz`, on the webhooks' public port: no path (the log names it).
    fn health(&self) -> Result<(), String> {
        if self.broken.load(Ordering::Acquire) {
            return Err("the SQLite store refuses writes after a failed fsync, another disk error or a stopped \
                        syncer (logged); check the disk and restart yizhan"
                .to_owned());
        }
        // Every thread runs as long as the store does; one that ended (a bug: a panic) leaves
        // its callers failing, or, for the checkpointer, the WAL growing, until a restart.
        if let Some(stopped) = self.threads.iter().find(|thread| thread.is_finished()) {
            return Err(format!(
                "the SQLite store's thread {} has stopped (a bug); restart yizhan",
                stopped.thread().name().unwrap_or("unnamed")
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use yizhan_channel_core::{Reply, ReplyHandle, Sender};

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let nanos = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            let name =
                format!("yizhan-sqlite-{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
            Self(std::env::temp_dir().join(name))
        }

        /// In a subdirectory that does not exist yet: `open` must create it.
        fn db(&self) -> PathBuf {
            self.0.join("data").join("store.db")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ok<T, E: fmt::Display>(result: Result<T, E>) -> T {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Default options with small inbound log segments (each is zero-filled before use).
    fn test_options() -> SqliteOptions {
        SqliteOptions { log_segment_bytes: 64 << 10, ..SqliteOptions::default() }
    }

    fn open(dir: &TempDir, max_turns_kept: usize) -> SqliteStore {
        ok(SqliteStore::open(&dir.db(), SqliteOptions { max_turns_kept, ..test_options() }))
    }

    /// A `PowerLoss` store whose fsync and writeback start are `sync` and `start`.
    fn open_with_disk(
        dir: &TempDir,
        sync: impl FnMut() -> std::io::Result<()> + Send + 'static,
        start: impl FnMut() -> std::io::Result<()> + Send + 'static,
    ) -> SqliteStore {
        let options = SqliteOptions { durability: Durability::PowerLoss, ..test_options() };
        let wal_disk = move |_sync, _writeback| -> (SyncWal, StartWriteback) { (Box::new(sync), Box::new(start)) };
        let segment_sync: SyncSegment = Box::new(|segment: &File| segment.sync_data());
        ok(SqliteStore::open_inner(&dir.db(), options, wal_disk, segment_sync, &mut File::sync_all))
    }

    use crate::store::test_envelope as envelope;

    // Linux: the second open, watched here, is refused by the log's lock, which only Linux has.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn what_a_killed_run_left_is_synced_before_it_is_read() {
        let dir = TempDir::new();
        // Left open (as a `kill -9` leaves it): its write-ahead log stays beside the database.
        let store = open(&dir, 10);
        ok(store.accept(&envelope("m1"), TTL).await);
        ok(store.record_answer(&envelope("m1").id, "c:u", Some(turn(1)), &[]).await);
        let wal = dir.db().with_extension("db-wal");
        assert!(wal.exists(), "no write-ahead log at {}", wal.display());
        // Opened again (by a second process, as after the kill: the log's lock is the first's,
        // so this open fails after the sync, which is what is watched).
        let mut synced = Vec::new();
        let wal_disk = |sync: File, writeback: File| -> (SyncWal, StartWriteback) {
            (Box::new(move || sync.sync_data()), writeback_starter(writeback))
        };
        let segment_sync: SyncSegment = Box::new(|segment: &File| segment.sync_data());
        let mut record = |file: &File| {
            synced.push(file.metadata().map(|meta| (meta.is_dir(), meta.len()))?);
            Ok(())
        };
        let second = SqliteStore::open_inner(&dir.db(), test_options(), wal_disk, segment_sync, &mut record);
        assert!(second.is_err(), "a second process opened a store in use");
        // The database, its log, and the directory holding both, before anything was read.
        assert_eq!(synced.len(), 3, "{synced:?}");
        assert!(!synced[0].0 && !synced[1].0 && synced[1].1 > 0 && synced[2].0, "{synced:?}");
        drop(store);
        // A database that does not exist yet: only its directory.
        let fresh = TempDir::new();
        ok(std::fs::create_dir_all(fresh.db().parent().unwrap_or(Path::new("."))));
        let mut count = 0;
        ok(sync_before_reading(&fresh.db(), &mut |_: &File| {
            count += 1;
            Ok(())
        }));
        assert_eq!(count, 1);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_symlinked_database_has_the_log_beside_its_target_synced() {
        let dir = TempDir::new();
        let target = dir.0.join("real").join("store.db");
        // Left open, as a `kill -9` leaves it: its write-ahead log stays beside the target.
        let store = ok(SqliteStore::open(&target, test_options()));
        ok(store.accept(&envelope("m1"), TTL).await);
        ok(store.record_answer(&envelope("m1").id, "c:u", Some(turn(1)), &[]).await);
        let link = dir.0.join("link.db");
        ok(std::os::unix::fs::symlink(&target, &link));
        let mut synced = Vec::new();
        ok(sync_before_reading(&link, &mut |file: &File| {
            synced.push(file.metadata().map(|meta| (meta.is_dir(), meta.len()))?);
            Ok(())
        }));
        assert_eq!(synced.len(), 3, "{synced:?}");
        assert!(!synced[0].0 && !synced[1].0 && synced[1].1 > 0 && synced[2].0, "{synced:?}");
        drop(store);
    }

    fn part(envelope: &Envelope, index: usize) -> Delivery {
        Delivery {
            delivery_id: crate::delivery::part_id(&envelope.id, index),
            channel: envelope.channel.clone(),
            conversation: envelope.conversation.clone(),
            recipient: envelope.sender.clone(),
            reply_handle: envelope.reply_handle.clone(),
            reply: Reply::text(format!("part {index}")),
        }
    }

    fn turn(i: usize) -> Turn {
        Turn { question: format!("q{i}"), answer: format!("a{i}") }
    }

    const TTL: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_message_id_is_accepted_once_within_the_window() {
        let dir = TempDir::new();
        let store = open(&dir, 10);
        let first = envelope("m1");
        assert_eq!(ok(store.accept(&first, TTL).await), Acceptance::New);
        assert_eq!(ok(store.accept(&envelope("m1"), TTL).await), Acceptance::Duplicate);
        assert_eq!(ok(store.accept(&envelope("m2"), TTL).await), Acceptance::New);
        let pending = ok(store.unfinished().await);
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].envelope, first);
        assert_eq!(pending[0].pending_parts, None);
        ok(store.finish(&first.id).await);
        assert_eq!(ok(store.unfinished().await).len(), 1);
    }

    #[tokio::test]
    async fn an_expired_claim_can_be_taken_again() {
        let dir = TempDir::new();
        let store = open(&dir, 10);
        assert_eq!(ok(store.accept(&envelope("m1"), Duration::ZERO).await), Acceptance::New);
        assert_eq!(ok(store.accept(&envelope("m1"), Duration::ZERO).await), Acceptance::New);
        assert_eq!(ok(store.unfinished().await).len(), 2);
    }

    #[tokio::test]
    async fn history_keeps_the_most_recent_turns_and_can_be_cleared() {
        let dir = TempDir::new();
        let store = open(&dir, 3);
        for i in 0..5 {
            ok(store.append_turn("k", turn(i)).await);
        }
        ok(store.append_turn("other", turn(9)).await);
        let turns = ok(store.history("k", 2).await);
        assert_eq!(turns.iter().map(|t| t.question.as_str()).collect::<Vec<_>>(), ["q3", "q4"]);
        let all = ok(store.history("k", 10).await);
        assert_eq!(all.iter().map(|t| t.question.as_str()).collect::<Vec<_>>(), ["q2", "q3", "q4"]);
        assert!(ok(store.history("k", 0).await).is_empty());
        ok(store.clear_history("k").await);
        assert!(ok(store.history("k", 10).await).is_empty());
        assert_eq!(ok(store.history("other", 10).await), [turn(9)]);
    }

    #[tokio::test]
    async fn unfinished_after_one_delivered_part_returns_only_the_remaining_part() {
        let dir = TempDir::new();
        let store = open(&dir, 10);
        let asked = envelope("m1");
        ok(store.accept(&asked, TTL).await);
        let parts = [part(&asked, 0), part(&asked, 1), part(&asked, 2)];
        ok(store.record_answer(&asked.id, "k", Some(turn(1)), &parts).await);
        assert_eq!(ok(store.history("k", 10).await), [turn(1)]);
        ok(store.part_delivered(&parts[0].delivery_id).await);
        let pending = ok(store.unfinished().await);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].pending_parts.as_deref(), Some(&parts[1..]));

        // A failed part is kept for operators but is no longer pending.
        ok(store.part_failed(&parts[1].delivery_id, "blocked by user").await);
        assert_eq!(ok(store.unfinished().await)[0].pending_parts.as_deref(), Some(&parts[2..]));

        ok(store.finish(&asked.id).await);
        assert!(ok(store.unfinished().await).is_empty());
        // Parts recorded for a finished envelope would never be sent: none are stored.
        ok(store.record_answer(&asked.id, "k", None, &parts).await);
        assert!(ok(store.unfinished().await).is_empty());
    }

    /// A part the platform confirmed stays confirmed even if its caller is gone before the writer
    /// gets to it (a shutdown dropping in-flight futures): otherwise recovery would send it again.
    /// A WAL fsync that, while `hold` is set, counts itself in `held` and waits (at most 10 s,
    /// so that a failing test cannot hang in the store's drop).
    fn sync_held_while(
        hold: Arc<AtomicBool>,
        held: Arc<std::sync::atomic::AtomicUsize>,
    ) -> impl FnMut() -> std::io::Result<()> + Send + 'static {
        move || {
            let started = std::time::Instant::now();
            if hold.load(Ordering::SeqCst) {
                held.fetch_add(1, Ordering::SeqCst);
            }
            while hold.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        }
    }

    /// `flush` (what the exit waits on) answers only once the writes queued before it are
    /// synced.
    #[tokio::test]
    async fn flush_returns_once_every_write_queued_before_it_is_synced() {
        use std::sync::atomic::AtomicUsize;
        let dir = TempDir::new();
        let hold = Arc::new(AtomicBool::new(false));
        let syncs_held = Arc::new(AtomicUsize::new(0));
        let sync = sync_held_while(Arc::clone(&hold), Arc::clone(&syncs_held));
        let store = Arc::new(open_with_disk(&dir, sync, || Ok(())));
        let answered = envelope("m1");
        ok(store.accept(&answered, TTL).await);
        let parts = [part(&answered, 0)];
        ok(store.record_answer(&answered.id, "k", None, &parts).await);

        hold.store(true, Ordering::SeqCst);
        let delivered = {
            let (store, id) = (Arc::clone(&store), parts[0].delivery_id.clone());
            tokio::spawn(async move { store.part_delivered(&id).await.map_err(|e| e.to_string()) })
        };
        until("the delivered part's batch in its sync", || syncs_held.load(Ordering::SeqCst) >= 1).await;
        let flushed = {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.flush().await.map_err(|e| e.to_string()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!flushed.is_finished(), "flushed while a write queued before it was not synced");
        hold.store(false, Ordering::SeqCst);
        ok(ok(flushed.await));
        ok(ok(delivered.await));
        assert_eq!(ok(store.unfinished().await)[0].pending_parts.as_deref(), Some(&[][..]));
    }

    #[tokio::test]
    async fn a_delivered_part_is_recorded_even_when_its_caller_gave_up_waiting() {
        let dir = TempDir::new();
        let hold = Arc::new(AtomicBool::new(false));
        let syncs_held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // The writer waits for the held syncer, and jobs queue up.
        let sync = sync_held_while(Arc::clone(&hold), Arc::clone(&syncs_held));
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let committed = Arc::clone(&commits);
        // Called by the writer after each commit (it starts the batch's writeback).
        let start = move || {
            committed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        let store = Arc::new(open_with_disk(&dir, sync, start));
        let answered = envelope("m1");
        ok(store.accept(&answered, TTL).await);
        let parts = [part(&answered, 0)];
        ok(store.record_answer(&answered.id, "k", None, &parts).await);

        hold.store(true, Ordering::SeqCst);
        let commits_before = commits.load(Ordering::SeqCst);
        // The first write holds the syncer, the second the writer (handing over to the syncer).
        let busy = |key: &'static str| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.append_turn(key, turn(1)).await.map_err(|e| e.to_string()) })
        };
        let first = busy("first");
        until("the first write held in the syncer", || syncs_held.load(Ordering::SeqCst) >= 1).await;
        let second = busy("second");
        until("the second write committed", || commits.load(Ordering::SeqCst) >= commits_before + 2).await;
        let delivered = {
            let (store, id) = (Arc::clone(&store), parts[0].delivery_id.clone());
            tokio::spawn(async move { store.part_delivered(&id).await.map_err(|e| e.to_string()) })
        };
        // Queued behind the held batch; then its caller goes away.
        tokio::time::sleep(Duration::from_millis(100)).await;
        delivered.abort();
        hold.store(false, Ordering::SeqCst);
        ok(ok(first.await));
        ok(ok(second.await));
        // Anything queued after the abandoned job is written after it.
        ok(store.append_turn("after", turn(2)).await);

        let pending = ok(store.unfinished().await);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].pending_parts.as_deref(), Some(&[][..]), "the delivered part is not sent again");
    }

    #[tokio::test]
    async fn health_reports_a_store_thread_that_stopped() {
        let dir = TempDir::new();
        let mut store = open(&dir, 10);
        assert!(store.health().is_ok());
        // Closing the readers' queue ends them, as a panic would.
        store.reads.take();
        until("a reader stopped", || store.threads.iter().any(|thread| thread.is_finished())).await;
        let health = store.health();
        assert!(
            health.as_ref().is_err_and(|why| why.contains("sqlite-reader") && why.contains("stopped")),
            "{health:?}"
        );
    }

    #[tokio::test]
    async fn reopening_the_file_preserves_claims_journal_outbox_and_history() {
        let dir = TempDir::new();
        let (received, answered, finished) = (envelope("m1"), envelope("m2"), envelope("m3"));
        let parts = [part(&answered, 0), part(&answered, 1)];
        {
            let store = open(&dir, 10);
            for e in [&received, &answered, &finished] {
                assert_eq!(ok(store.accept(e, TTL).await), Acceptance::New);
            }
            ok(store.record_answer(&answered.id, "k", Some(turn(1)), &parts).await);
            ok(store.part_delivered(&parts[0].delivery_id).await);
            ok(store.finish(&finished.id).await);
            ok(store.append_turn("k", turn(2)).await);
        }
        let store = open(&dir, 10);
        for id in ["m1", "m2", "m3"] {
            assert_eq!(ok(store.accept(&envelope(id), TTL).await), Acceptance::Duplicate);
        }
        let pending = ok(store.unfinished().await);
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0], Unfinished { envelope: received, pending_parts: None, live_stream: None });
        assert_eq!(
            pending[1],
            Unfinished { envelope: answered, pending_parts: Some(parts[1..].to_vec()), live_stream: None }
        );
        assert_eq!(ok(store.history("k", 10).await), [turn(1), turn(2)]);
    }

    /// The message an answer is streamed into comes back with its open envelope after a restart
    /// (the latest record of it), and goes with the finish, not with pruning.
    #[tokio::test]
    async fn a_recorded_live_stream_comes_back_with_its_open_envelope_until_finished() {
        let dir = TempDir::new();
        let (asked, answered, finished) = (envelope("s1"), envelope("s2"), envelope("s3"));
        let stream =
            |card: &str, sequence_base| LiveStream { handle: serde_json::json!({ "card_id": card }), sequence_base };
        {
            let store = open(&dir, 10);
            for e in [&asked, &answered, &finished] {
                ok(store.accept(e, TTL).await);
            }
            ok(store.record_stream(&asked.id, &stream("c1", 0)).await);
            ok(store.record_stream(&asked.id, &stream("c1", 4_194_304)).await);
            ok(store.record_stream(&answered.id, &stream("c2", 0)).await);
            ok(store.record_answer(&answered.id, "k", None, &[part(&answered, 0)]).await);
            ok(store.record_stream(&finished.id, &stream("c3", 0)).await);
            ok(store.finish(&finished.id).await);
            // A crash between the log's finish and the SQLite side of it.
            let cut_short = envelope("s4");
            ok(store.accept(&cut_short, TTL).await);
            ok(store.record_stream(&cut_short.id, &stream("c4", 0)).await);
            ok(store.log(LogOp::Finish { envelope_id: cut_short.id.clone() }).await);
        }
        let store = open(&dir, 10);
        let rows = |card: &str| -> i64 {
            let conn = ok(Connection::open(dir.db()));
            let pattern = format!("%\"{card}\"%");
            ok(conn
                .query_row("SELECT count(*) FROM live_stream WHERE stream LIKE ?1", params![pattern], |row| row.get(0)))
        };
        assert_eq!((rows("c3"), rows("c4")), (0, 0), "records of finished envelopes are gone");
        let pending = ok(store.unfinished().await);
        let streams: Vec<_> = pending.iter().map(|unfinished| unfinished.live_stream.clone()).collect();
        assert_eq!(streams, [Some(stream("c1", 4_194_304)), Some(stream("c2", 0))]);
        assert_eq!(pending[1].pending_parts.as_deref(), Some(&[part(&answered, 0)][..]));
        ok(store.finish(&answered.id).await);
        assert_eq!(ok(store.unfinished().await).len(), 1);
        // Pruning leaves an open envelope's record, however old: a second restart needs it.
        let later = SystemTime::now() + Duration::from_secs(60);
        ok(store.prune(later).await);
        assert_eq!(ok(store.unfinished().await)[0].live_stream, Some(stream("c1", 4_194_304)));
    }

    /// `forget_turn` takes out the turn recorded with one envelope's answer, and nothing else.
    #[tokio::test]
    async fn a_forgotten_turn_is_the_one_recorded_with_its_answer() {
        let dir = TempDir::new();
        let store = open(&dir, 10);
        let (first, second) = (envelope("f1"), envelope("f2"));
        for e in [&first, &second] {
            ok(store.accept(e, TTL).await);
        }
        ok(store.record_answer(&first.id, "k", Some(turn(1)), &[part(&first, 0)]).await);
        ok(store.record_answer(&second.id, "k", Some(turn(2)), &[part(&second, 0)]).await);
        ok(store.append_turn("k", turn(3)).await);
        ok(store.forget_turn(&first.id).await);
        ok(store.forget_turn("never-answered").await);
        assert_eq!(ok(store.history("k", 10).await), [turn(2), turn(3)]);
    }

    /// Pruning goes in chunks, each its own write, so that other writes are not held behind one
    /// long delete (nor the WAL grown by all of it at once); together they remove everything due.
    #[tokio::test]
    async fn pruning_removes_in_chunks_until_nothing_is_due() {
        let dir = TempDir::new();
        drop(open(&dir, 10));
        let due = 2 * PRUNE_CHUNK_ROWS + 500;
        {
            // One transaction: one sync, not one per row.
            let mut conn = ok(Connection::open(dir.db()));
            let tx = ok(conn.transaction());
            {
                let mut insert = ok(tx.prepare(
                    "INSERT INTO history (session_key, question, answer, created_at) VALUES ('k', 'q', 'a', 0)",
                ));
                for _ in 0..due {
                    ok(insert.execute([]));
                }
            }
            ok(tx.commit());
        }
        let store = open(&dir, 10);
        let before_ms = now_ms();
        match ok(store.write(WriteOp::Prune { before_ms, limit: PRUNE_CHUNK_ROWS }).await) {
            Written::Pruned { removed, more } => assert_eq!((removed, more), (PRUNE_CHUNK_ROWS as u64, true)),
            other => panic!("{other:?}"),
        }
        assert_eq!(ok(store.prune(SystemTime::now()).await), (due - PRUNE_CHUNK_ROWS) as u64);
        let conn = ok(Connection::open(dir.db()));
        let left: i64 = ok(conn.query_row("SELECT count(*) FROM history", [], |row| row.get(0)));
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn concurrent_accepts_are_group_committed_and_each_id_is_won_once() {
        let dir = TempDir::new();
        let store = Arc::new(open(&dir, 10));
        let mut tasks = Vec::new();
        for task in 0..50 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for i in 0..20 {
                    // 1000 accepts of 500 ids: every id is raced by two tasks.
                    let id = format!("m{}", (task * 20 + i) % 500);
                    let acceptance = store.accept(&envelope(&id), TTL).await;
                    outcomes.push((id, acceptance.map_err(|e| e.to_string())));
                }
                outcomes
            }));
        }
        let mut wins: HashMap<String, usize> = HashMap::new();
        for task in tasks {
            for (id, acceptance) in ok(task.await) {
                *wins.entry(id).or_default() += usize::from(ok(acceptance) == Acceptance::New);
            }
        }
        assert_eq!(wins.len(), 500);
        assert!(wins.values().all(|won| *won == 1));
        assert_eq!(ok(store.unfinished().await).len(), 500);
    }

    #[tokio::test]
    async fn one_failing_operation_rolls_back_alone() {
        let dir = TempDir::new();
        let store = Arc::new(open(&dir, 10));
        let taken = envelope("m0");
        ok(store.accept(&taken, TTL).await);
        // Same envelope id under a new platform id: the inbound log refuses a second open entry.
        let mut clash = envelope("clash");
        clash.id = taken.id.clone();
        let mut tasks = Vec::new();
        for i in 1..=20 {
            let store = Arc::clone(&store);
            let e = if i == 10 { clash.clone() } else { envelope(&format!("m{i}")) };
            tasks.push(tokio::spawn(async move { store.accept(&e, TTL).await.map_err(|e| e.to_string()) }));
        }
        let mut failures = 0;
        for task in tasks {
            match ok(task.await) {
                Ok(acceptance) => assert_eq!(acceptance, Acceptance::New),
                Err(_) => failures += 1,
            }
        }
        assert_eq!(failures, 1);
        assert_eq!(ok(store.unfinished().await).len(), 20);
        // The failed operation's dedupe claim was rolled back with it.
        assert_eq!(ok(store.accept(&envelope("clash"), TTL).await), Acceptance::New);
    }

    #[tokio::test]
    async fn one_failing_sqlite_operation_rolls_back_alone() {
        let dir = TempDir::new();
        let store = Arc::new(open(&dir, 10));
        {
            // A trigger stands in for a failure that only one operation of a batch meets.
            let conn = ok(Connection::open(dir.db()));
            ok(conn.execute_batch(
                "CREATE TRIGGER boom BEFORE INSERT ON history WHEN NEW.question = 'boom'
                 BEGIN SELECT RAISE(ABORT, 'boom'); END;",
            ));
        }
        let mut tasks = Vec::new();
        for i in 0..20 {
            let store = Arc::clone(&store);
            let question = if i == 10 { "boom".to_owned() } else { format!("q{i}") };
            let turn = Turn { question, answer: "a".into() };
            tasks.push(tokio::spawn(async move {
                store.append_turn(&format!("k{i}"), turn).await.map_err(|e| e.to_string())
            }));
        }
        let mut failures = 0;
        for task in tasks {
            failures += usize::from(ok(task.await).is_err());
        }
        assert_eq!(failures, 1);
        for i in 0..20 {
            assert_eq!(ok(store.history(&format!("k{i}"), 10).await).len(), usize::from(i != 10), "k{i}");
        }
    }

    #[tokio::test]
    async fn a_missing_inbound_log_is_an_error_once_the_database_has_used_one() {
        let dir = TempDir::new();
        drop(open(&dir, 10));
        let log = inbound_log::log_dir(&dir.db());
        ok(std::fs::remove_dir_all(&log));
        let refused = SqliteStore::open(&dir.db(), test_options()).map(|_| ()).err().map(|e| e.to_string());
        assert!(refused.as_deref().is_some_and(|e| e.contains("is missing")), "{refused:?}");
        // The operator's way to start without it.
        ok(std::fs::create_dir(&log));
        drop(open(&dir, 10));
    }

    #[tokio::test]
    async fn a_log_with_open_messages_beside_a_new_database_is_an_error() {
        let dir = TempDir::new();
        {
            let store = open(&dir, 10);
            ok(store.accept(&envelope("m1"), TTL).await);
        }
        for file in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{file}", dir.db().display()));
        }
        let refused = SqliteStore::open(&dir.db(), test_options()).map(|_| ()).err().map(|e| e.to_string());
        assert!(refused.as_deref().is_some_and(|e| e.contains("holds 1 message(s)")), "{refused:?}");
        // Refused before the new database was marked as using a log: refused again.
        let refused = SqliteStore::open(&dir.db(), test_options()).map(|_| ()).err().map(|e| e.to_string());
        assert!(refused.as_deref().is_some_and(|e| e.contains("holds 1 message(s)")), "{refused:?}");
        // Starting afresh: both gone.
        ok(std::fs::remove_dir_all(inbound_log::log_dir(&dir.db())));
        for file in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{file}", dir.db().display()));
        }
        let store = open(&dir, 10);
        assert!(ok(store.unfinished().await).is_empty());
    }

    #[tokio::test]
    async fn answers_left_behind_by_a_crash_inside_finish_are_forgotten_at_startup() {
        let dir = TempDir::new();
        let (done, waiting) = (envelope("m1"), envelope("m2"));
        {
            let store = open(&dir, 10);
            ok(store.accept(&done, TTL).await);
            ok(store.accept(&waiting, TTL).await);
            ok(store.record_answer(&done.id, "k", None, &[part(&done, 0)]).await);
            ok(store.record_answer(&waiting.id, "k", None, &[part(&waiting, 0)]).await);
            // The log's half of `finish` only, as if the process died before the SQLite half.
            ok(store.log(LogOp::Finish { envelope_id: done.id.clone() }).await);
        }
        let store = open(&dir, 10);
        let unfinished = ok(store.unfinished().await);
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].pending_parts.as_deref(), Some(&[part(&waiting, 0)][..]));
        drop(store);
        let conn = ok(Connection::open(dir.db()));
        let rows = |sql: &str| -> i64 { ok(conn.query_row(sql, params![done.id], |row| row.get(0))) };
        assert_eq!(rows("SELECT COUNT(*) FROM answered WHERE envelope_id = ?1"), 0);
        assert_eq!(rows("SELECT COUNT(*) FROM outbox WHERE envelope_id = ?1"), 0);
    }

    #[tokio::test]
    async fn an_unreadable_logged_envelope_is_skipped_and_finished() {
        let dir = TempDir::new();
        let store = open(&dir, 10);
        let op = LogOp::Accept {
            claim: claim_key("c", "bad"),
            envelope_id: "bad".into(),
            envelope: "{not json".into(),
            ttl_ms: 60_000,
        };
        ok(store.log(op).await);
        ok(store.accept(&envelope("good"), TTL).await);
        assert_eq!(ok(store.unfinished().await).len(), 1);
        let still_open = ok(store.log(LogOp::IsOpen { envelope_id: "bad".into() }).await);
        assert!(matches!(still_open, Logged::IsOpen(false)), "{still_open:?}");
        // Set aside as journaled, for an operator (a rollback to an older build, say).
        let aside = ok(std::fs::read_to_string(unreadable_path(&dir.db())));
        let line: serde_json::Value = ok(serde_json::from_str(aside.trim_end()));
        assert_eq!(line, serde_json::json!({"envelope_id": "bad", "envelope": "{not json"}));
    }

    #[tokio::test]
    async fn cells_that_are_not_utf8_do_not_stop_recovery() {
        let dir = TempDir::new();
        let (first, second) = (envelope("m1"), envelope("m2"));
        {
            let store = open(&dir, 10);
            ok(store.accept(&first, TTL).await);
            ok(store.accept(&second, TTL).await);
            ok(store.record_answer(&first.id, "k", None, &[part(&first, 0), part(&first, 1), part(&first, 2)]).await);
            let stream = LiveStream { handle: serde_json::json!({"card_id": "c"}), sequence_base: 0 };
            ok(store.record_stream(&second.id, &stream).await);
            let parked = ParkedUser { channel: "c".into(), user: "u".into(), record: Some("[]".into()) };
            ok(store.save_parked(vec![parked]).await);
            ok(store.append_turn("k", Turn { question: "q".into(), answer: "a".into() }).await);
        }
        {
            let conn = ok(Connection::open(dir.db()));
            let part_id = part(&first, 1).delivery_id;
            ok(conn.execute("UPDATE outbox SET delivery = CAST(X'7B22FF' AS TEXT) WHERE delivery_id = ?1", [part_id]));
            // An id no later write could match: skipped, not sent at every start.
            let third = part(&first, 2).delivery_id;
            ok(conn.execute("UPDATE outbox SET delivery_id = CAST(X'FF' AS TEXT) WHERE delivery_id = ?1", [third]));
            ok(conn.execute("UPDATE live_stream SET stream = CAST(X'FF' AS TEXT)", []));
            ok(conn.execute("UPDATE parked SET record = X'5B5DFF'", []));
            ok(conn.execute("UPDATE history SET answer = CAST(X'61FF' AS TEXT)", []));
            // Marks with ids no envelope has, a time that is not a number, a claim's expiry
            // that is not one either: each stopped every start.
            ok(conn.execute("INSERT INTO answered VALUES (CAST(X'FF' AS TEXT), 0)", []));
            ok(conn.execute("INSERT INTO live_stream VALUES (CAST(X'FE' AS TEXT), '{}', 0)", []));
            ok(conn.execute("UPDATE parked SET saved_at = 'x'", []));
            ok(conn.execute(
                "INSERT INTO journal (envelope_id, envelope, state, created_at, claim, claim_expires_at)
                 VALUES ('j', '{}', 'finished', 0, zeroblob(16), 'never')",
                [],
            ));
        }
        let store = open(&dir, 10);
        let unfinished = ok(store.unfinished().await);
        assert_eq!(unfinished.len(), 2, "{unfinished:?}");
        // The damaged parts are skipped, their sibling kept; the unreadable stream record is as none.
        assert_eq!(unfinished[0].pending_parts.as_deref(), Some(&[part(&first, 0)][..]));
        assert_eq!(unfinished[1].live_stream, None);
        let parked = ok(store.load_parked().await);
        assert_eq!(parked.iter().map(|(record, _)| record.as_str()).collect::<Vec<_>>(), ["[]\u{fffd}"]);
        let history = ok(store.history("k", 10).await);
        assert_eq!(history, [Turn { question: "q".into(), answer: "a\u{fffd}".into() }]);
    }

    #[tokio::test]
    async fn migrations_are_idempotent() {
        let dir = TempDir::new();
        let first = envelope("m1");
        {
            let store = open(&dir, 10);
            ok(store.accept(&first, TTL).await);
        }
        for _ in 0..2 {
            let store = open(&dir, 10);
            assert_eq!(ok(store.unfinished().await).len(), 1);
        }
        let conn = ok(Connection::open(dir.db()));
        let version: i64 = ok(conn.pragma_query_value(None, "user_version", |row| row.get(0)));
        assert_eq!(version, to_i64(MIGRATIONS.len()));
    }

    /// Retention's deletes find their rows through an index, not by scanning the table (each
    /// chunk holds every other write).
    #[tokio::test]
    async fn retention_finds_failed_parts_through_an_index() {
        let dir = TempDir::new();
        drop(open(&dir, 10));
        let conn = ok(Connection::open(dir.db()));
        let plan: Vec<String> = ok(ok(conn.prepare(
            "EXPLAIN QUERY PLAN SELECT rowid FROM outbox WHERE state = 'failed' AND updated_at < ?1 LIMIT ?2",
        ))
        .query_map(params![0, 1], |row| row.get::<_, String>(3))
        .and_then(Iterator::collect));
        assert!(plan.iter().any(|step| step.contains("INDEX outbox_failed")), "{plan:?}");
    }

    #[tokio::test]
    async fn a_database_from_a_newer_version_is_refused() {
        let dir = TempDir::new();
        drop(open(&dir, 10));
        {
            let conn = ok(Connection::open(dir.db()));
            ok(conn.pragma_update(None, "user_version", 999));
        }
        let error = SqliteStore::open(&dir.db(), test_options()).map(|_| ()).err();
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("schema version 999"), "{message}");
    }

    #[tokio::test]
    async fn a_garbage_file_is_an_error_not_a_panic() {
        let dir = TempDir::new();
        ok(std::fs::create_dir_all(&dir.0));
        let path = dir.0.join("garbage.db");
        ok(std::fs::write(&path, "this is not a database, just some text. ".repeat(200)));
        let message = SqliteStore::open(&path, test_options()).map(|_| ()).err().map(|e| e.to_string());
        let message = message.unwrap_or_default();
        assert!(message.contains("not a database") && message.contains("garbage.db"), "{message}");
    }

    #[tokio::test]
    async fn prune_removes_old_rows_and_keeps_new_ones() {
        let dir = TempDir::new();
        let store = open(&dir, 10);
        let (done, open_one, expired) = (envelope("m1"), envelope("m2"), envelope("m3"));
        ok(store.accept(&done, TTL).await);
        ok(store.accept(&open_one, TTL).await);
        ok(store.accept(&expired, Duration::ZERO).await);
        let parts = [part(&open_one, 0), part(&open_one, 1)];
        ok(store.record_answer(&open_one.id, "k", Some(turn(1)), &parts).await);
        ok(store.part_failed(&parts[0].delivery_id, "rejected").await);
        ok(store.append_turn("k", turn(2)).await);
        ok(store.finish(&done.id).await);

        // Nothing is older than an hour ago.
        let hour = Duration::from_secs(3600);
        assert_eq!(ok(store.prune(SystemTime::now() - hour).await), 0);
        assert_eq!(ok(store.history("k", 10).await).len(), 2);
        assert_eq!(ok(store.accept(&envelope("m1"), TTL).await), Acceptance::Duplicate);

        // Everything is older than an hour from now: two turns and the failed part go.
        // Unfinished entries, pending parts, and the finished entry (its claim is live) stay.
        assert_eq!(ok(store.prune(SystemTime::now() + hour).await), 3);
        assert!(ok(store.history("k", 10).await).is_empty());
        let pending = ok(store.unfinished().await);
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].pending_parts.as_deref(), Some(&parts[1..]));
        drop(store);
        let store = open(&dir, 10);
        assert_eq!(ok(store.accept(&envelope("m1"), TTL).await), Acceptance::Duplicate);
        // Finished entries of the inbound log go with their segments, not here (see
        // `inbound_log`'s tests).
    }

    #[tokio::test]
    async fn claims_schema_1_kept_in_the_dedupe_table_still_count_after_the_upgrade() {
        let dir = TempDir::new();
        ok(std::fs::create_dir_all(dir.0.join("data")));
        let waiting = envelope("old-live");
        {
            // A database as schema 1 left it: a claim per message in `dedupe`.
            let conn = ok(Connection::open(dir.db()));
            ok(conn.execute_batch(MIGRATIONS[0]));
            ok(conn.pragma_update(None, "user_version", 1));
            let live = now_ms() + 60_000;
            ok(conn.execute("INSERT INTO dedupe VALUES ('c', 'old-live', ?1), ('c', 'old-lapsed', 0)", [live]));
            ok(conn.execute(
                "INSERT INTO journal (envelope_id, envelope, state, created_at) VALUES (?1, ?2, 'received', 0)",
                params![waiting.id, ok(serde_json::to_string(&waiting))],
            ));
        }
        let store = open(&dir, 10);
        assert_eq!(
            ok(store.unfinished().await),
            [Unfinished { envelope: waiting, pending_parts: None, live_stream: None }]
        );
        assert_eq!(ok(store.accept(&envelope("old-live"), TTL).await), Acceptance::Duplicate);
        assert_eq!(ok(store.accept(&envelope("old-lapsed"), TTL).await), Acceptance::New);
        // The writer's first batch sweeps the lapsed row away.
        ok(store.append_turn("k", turn(1)).await);
        let conn = ok(Connection::open(dir.db()));
        let left: i64 = ok(conn.query_row("SELECT COUNT(*) FROM dedupe", [], |row| row.get(0)));
        assert_eq!(left, 1);
    }

    #[tokio::test]
    async fn an_unreadable_envelope_schema_1_journaled_is_set_aside_and_finished() {
        let dir = TempDir::new();
        ok(std::fs::create_dir_all(dir.0.join("data")));
        {
            let conn = ok(Connection::open(dir.db()));
            ok(conn.execute_batch(MIGRATIONS[0]));
            ok(conn.pragma_update(None, "user_version", 1));
            ok(conn.execute(
                "INSERT INTO journal (envelope_id, envelope, state, created_at) VALUES ('bad', '{not json', 'received', 0)",
                [],
            ));
        }
        let store = open(&dir, 10);
        assert_eq!(ok(store.unfinished().await), []);
        let aside = ok(std::fs::read_to_string(unreadable_path(&dir.db())));
        let line: serde_json::Value = ok(serde_json::from_str(aside.trim_end()));
        assert_eq!(line, serde_json::json!({"envelope_id": "bad", "envelope": "{not json"}));
        drop(store);
        let conn = ok(Connection::open(dir.db()));
        let state: String =
            ok(conn.query_row("SELECT state FROM journal WHERE envelope_id = 'bad'", [], |row| row.get(0)));
        assert_eq!(state, "finished", "so that it is pruned, not logged at every start");
    }

    /// An overlapping start (an upgrade's new binary while the old one runs) is refused before
    /// it migrates: the running process must not find its schema changed under it.
    #[test]
    fn a_database_in_use_is_not_migrated_by_a_second_process() {
        let dir = TempDir::new();
        ok(std::fs::create_dir_all(dir.0.join("data")));
        {
            let conn = ok(Connection::open(dir.db()));
            ok(conn.execute_batch(MIGRATIONS[0]));
            ok(conn.pragma_update(None, "user_version", 1));
        }
        let log_dir = inbound_log::log_dir(&dir.db());
        ok(inbound_log::create_dir(&log_dir));
        let _held = ok(inbound_log::lock_dir(&log_dir));
        let refused = SqliteStore::open(&dir.db(), SqliteOptions::default()).err().map(|e| e.to_string());
        assert!(refused.as_deref().is_some_and(|e| e.contains("in use")), "{refused:?}");
        let conn = ok(Connection::open(dir.db()));
        let version: i64 = ok(conn.pragma_query_value(None, "user_version", |row| row.get(0)));
        assert_eq!(version, 1, "not migrated");
    }

    #[tokio::test]
    async fn a_failed_fsync_fails_the_waiting_writes_and_every_later_one() {
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&syncs);
        let sync = move || match counted.fetch_add(1, Ordering::SeqCst) {
            0 => Ok(()),
            _ => Err(std::io::Error::other("injected EIO")),
        };
        let store = open_with_disk(&dir, sync, || Ok(()));
        ok(store.append_turn("a", turn(1)).await);
        let failed = store.append_turn("b", turn(2)).await.err().map(|e| e.to_string());
        assert!(failed.as_deref().is_some_and(|e| e.contains("injected EIO")), "{failed:?}");
        // Later writes fail without another fsync: a second one could wrongly succeed.
        let later = store.append_turn("k", turn(1)).await.err().map(|e| e.to_string());
        assert!(later.as_deref().is_some_and(|e| e.contains("restart yizhan")), "{later:?}");
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
        // Refused by the writer, not committed and then failed: nothing of it is in the file.
        assert!(ok(store.history("k", 10).await).is_empty());
        assert!(store.health().is_err_and(|why| why.contains("failed fsync")));
        // Accepts are refused too: the inbound log shares the verdict.
        assert!(store.accept(&envelope("m1"), TTL).await.is_err());
    }

    #[tokio::test]
    async fn power_loss_durability_answers_sqlite_writes_only_after_the_wal_is_synced() {
        let dir = TempDir::new();
        let (synced_tx, synced_rx) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(synced_rx);
        // Each fsync waits until the test lets it through (or gives up, so a failing test cannot
        // hang in the store's drop).
        let sync = move || {
            let gate = gate.lock().map_err(|_| std::io::Error::other("poisoned"))?;
            gate.recv_timeout(Duration::from_secs(10)).map_err(std::io::Error::other)
        };
        let store = Arc::new(open_with_disk(&dir, sync, || Ok(())));
        let append = |key: &'static str| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.append_turn(key, turn(1)).await.map_err(|e| e.to_string()) })
        };
        let mut first = append("k");
        // Committed (a reader sees it) but not answered while the fsync is held back.
        let committed = tokio::time::timeout(Duration::from_secs(10), async {
            while ok(store.history("k", 10).await).is_empty() {
                tokio::task::yield_now().await;
            }
        });
        assert!(committed.await.is_ok());
        let held_back = Duration::from_millis(200);
        assert!(tokio::time::timeout(held_back, &mut first).await.is_err(), "answered before the fsync");
        let mut second = append("j");
        assert!(tokio::time::timeout(held_back, &mut second).await.is_err(), "answered before the fsync");
        for _ in 0..4 {
            ok(synced_tx.send(()));
        }
        ok(ok(first.await));
        ok(ok(second.await));
    }

    #[tokio::test]
    async fn power_loss_durability_answers_new_and_duplicate_only_after_the_inbound_log_is_synced() {
        let dir = TempDir::new();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        // Each log sync says it began, then waits until the test lets it through (or gives up,
        // so that a failing test cannot hang in the store's drop).
        let segment_sync: SyncSegment = Box::new(move |segment: &File| {
            let _ = entered_tx.send(());
            gate_rx.recv_timeout(Duration::from_secs(10)).map_err(std::io::Error::other)?;
            segment.sync_data()
        });
        let wal_disk = |sync: File, writeback: File| -> (SyncWal, StartWriteback) {
            (Box::new(move || sync.sync_data()), writeback_starter(writeback))
        };
        let options = SqliteOptions { durability: Durability::PowerLoss, ..test_options() };
        let store =
            Arc::new(ok(SqliteStore::open_inner(&dir.db(), options, wal_disk, segment_sync, &mut File::sync_all)));
        let accept = |id: &'static str| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.accept(&envelope(id), TTL).await.map_err(|e| e.to_string()) })
        };
        let mut first = accept("m1");
        until("m1's sync began", || entered_rx.try_recv().is_ok()).await;
        let held_back = Duration::from_millis(200);
        assert!(tokio::time::timeout(held_back, &mut first).await.is_err(), "answered before the sync");
        // A retry must not hear "duplicate" before the claim it relies on is on disk either.
        let mut retry = accept("m1");
        assert!(tokio::time::timeout(held_back, &mut retry).await.is_err(), "duplicate before the sync");
        for _ in 0..4 {
            ok(gate_tx.send(()));
        }
        assert_eq!(ok(ok(first.await)), Acceptance::New);
        assert_eq!(ok(ok(retry.await)), Acceptance::Duplicate);
    }

    /// Waits (on the test's runtime, without blocking it) until `done` holds.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::task::yield_now().await;
            }
        });
        assert!(waited.await.is_ok(), "gave up waiting until {what}");
    }

    #[tokio::test]
    async fn a_batch_is_started_towards_the_disk_before_it_waits_for_the_syncer() {
        let dir = TempDir::new();
        let started = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&started);
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let start = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        // Each fsync says it began, then waits until the test lets it through (or gives up, so
        // that a failing test cannot hang in the store's drop).
        let sync = move || {
            let _ = entered_tx.send(());
            gate_rx.recv_timeout(Duration::from_secs(10)).map_err(std::io::Error::other)
        };
        let store = Arc::new(open_with_disk(&dir, sync, start));
        let append = |key: &'static str| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.append_turn(key, turn(1)).await.map_err(|e| e.to_string()) })
        };
        let first = append("m1");
        until("m1's fsync began", || entered_rx.try_recv().is_ok()).await;
        assert_eq!(started.load(Ordering::SeqCst), 1);
        // The syncer is busy with m1, so the writer must hold m2 until it is free; m2's writeback
        // has to start before that wait, not after it.
        let second = append("m2");
        until("m2's writeback started", || started.load(Ordering::SeqCst) == 2).await;
        assert!(!first.is_finished(), "answered before its fsync");
        for _ in 0..4 {
            ok(gate_tx.send(()));
        }
        ok(ok(first.await));
        ok(ok(second.await));
    }

    #[tokio::test]
    async fn a_failed_writeback_start_fails_its_batch_and_breaks_the_store() {
        let dir = TempDir::new();
        let syncs = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&syncs);
        let sync = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        let store = open_with_disk(&dir, sync, || Err(std::io::Error::other("injected EIO")));
        let failed = store.append_turn("m1", turn(1)).await.err().map(|e| e.to_string());
        assert!(failed.as_deref().is_some_and(|e| e.contains("injected EIO")), "{failed:?}");
        let later = store.append_turn("k", turn(1)).await.err().map(|e| e.to_string());
        assert!(later.as_deref().is_some_and(|e| e.contains("restart yizhan")), "{later:?}");
        assert!(store.health().is_err());
        // Nobody was told "done" through the syncer either.
        assert_eq!(syncs.load(Ordering::SeqCst), 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn refusals_to_start_writeback_lose_nothing_and_io_errors_may() {
        for errno in [libc::EINVAL, libc::ENOSYS, libc::EOPNOTSUPP, libc::ESPIPE, libc::ENOMEM] {
            assert!(loses_nothing(&std::io::Error::from_raw_os_error(errno)), "errno {errno}");
        }
        for errno in [libc::EIO, libc::ENOSPC, libc::EDQUOT, libc::EBADF] {
            assert!(!loses_nothing(&std::io::Error::from_raw_os_error(errno)), "errno {errno}");
        }
        // A character device cannot be written back (ESPIPE): the production starter only loses
        // its head start.
        let dev_null = ok(File::open("/dev/null"));
        assert!(start_writeback(&dev_null).is_err());
        assert!(writeback_starter(dev_null)().is_ok());
    }

    #[test]
    fn the_writeback_syscall_accepts_a_regular_file_with_dirty_pages() {
        let dir = TempDir::new();
        let path = dir.db();
        ok(std::fs::create_dir_all(ok(path.parent().ok_or("no parent"))));
        let mut file = ok(File::options().read(true).write(true).create(true).truncate(true).open(&path));
        ok(std::io::Write::write_all(&mut file, &[7u8; 64 * 1024]));
        // Only that the kernel takes these arguments (bad flags: EINVAL); whether it starts
        // any writeback is not observable here.
        ok(start_writeback(&file));
        ok(start_writeback(&file));
    }

    #[tokio::test]
    async fn the_checkpointer_copies_committed_pages_into_the_database_file_in_the_background() {
        let dir = TempDir::new();
        let store = Arc::new(open(&dir, 10));
        let file_size = || std::fs::metadata(dir.db()).map_or(0, |meta| meta.len());
        let before = file_size();
        // About 1.6 MB of history rows: far below the writer's own checkpoint threshold
        // (`CHECKPOINT_PAGES`), so only the checkpointer thread can move them into the file.
        let writes = (0..2_000).map(|i| {
            let store = Arc::clone(&store);
            async move { store.append_turn(&format!("k{i}"), realistic_turn(i)).await }
        });
        for written in futures_util::future::join_all(writes).await {
            ok(written);
        }
        // Usually within one `CHECKPOINT_INTERVAL`; the bound only matters if it never happens.
        let deadline = Instant::now() + Duration::from_secs(20);
        while file_size() < before + 1_000_000 {
            assert!(
                Instant::now() < deadline,
                "nothing was checkpointed: the file grew from {before} to {} bytes",
                file_size()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The WAL header's checkpoint sequence number, which SQLite bumps whenever it restarts the
    /// WAL from the beginning.
    fn wal_restarts(db: &Path) -> u32 {
        use std::io::Read;
        // Only the header: the WAL of a store that never restarts grows with every round.
        let mut header = [0_u8; 16];
        let read = std::fs::File::open(wal_path(db)).and_then(|mut wal| wal.read_exact(&mut header));
        read.map_or(0, |()| u32::from_be_bytes([header[12], header[13], header[14], header[15]]))
    }

    #[tokio::test]
    async fn the_wal_keeps_restarting_under_steady_writes() {
        let dir = TempDir::new();
        let options = SqliteOptions {
            durability: Durability::ProcessCrash,
            checkpoint_pages: 32,
            checkpoint_interval: Duration::from_millis(1),
            ..test_options()
        };
        let store = Arc::new(ok(SqliteStore::open(&dir.db(), options)));
        let first = wal_restarts(&dir.db());
        // Rounds of concurrent writes, so that commits keep coming; bounded only so that a
        // WAL that never restarts fails the test instead of hanging it. This checks the outcome,
        // whichever thread brings it about (between rounds the checkpointer may copy everything
        // itself); `once_asked_the_writer_restarts_the_wal_by_itself` checks the writer's part.
        for round in 0..5_000 {
            if wal_restarts(&dir.db()).wrapping_sub(first) >= 3 {
                return;
            }
            let writes = (0..16).map(|i| {
                let store = Arc::clone(&store);
                async move { store.append_turn(&format!("k{round}-{i}"), realistic_turn(i)).await }
            });
            for written in futures_util::future::join_all(writes).await {
                ok(written);
            }
        }
        panic!("the WAL restarted {} times in 80,000 writes", wal_restarts(&dir.db()).wrapping_sub(first));
    }

    #[tokio::test]
    async fn once_asked_the_writer_restarts_the_wal_by_itself() {
        let dir = TempDir::new();
        // The checkpointer rests an hour before its first pass and never asks for a restart, so
        // only the writer can copy frames into the database file.
        let options = SqliteOptions {
            durability: Durability::ProcessCrash,
            checkpoint_pages: i64::MAX,
            checkpoint_interval: Duration::from_secs(3600),
            ..test_options()
        };
        let store = ok(SqliteStore::open(&dir.db(), options));
        for i in 0..20 {
            ok(store.append_turn(&format!("k{i}"), realistic_turn(i)).await);
        }
        let before = wal_restarts(&dir.db());
        for i in 20..40 {
            ok(store.append_turn(&format!("k{i}"), realistic_turn(i)).await);
        }
        assert_eq!(wal_restarts(&dir.db()), before, "nothing but the writer may restart the WAL here");

        store.request_wal_restart();
        // The writer copies the frames after this batch (its answer goes out first) ...
        ok(store.append_turn("k40", realistic_turn(40)).await);
        // ... so this transaction starts on a fully copied WAL, which restarts it.
        ok(store.append_turn("k41", realistic_turn(41)).await);
        assert_eq!(wal_restarts(&dir.db()), before + 1);
    }

    #[test]
    fn checkpoint_outcomes_tell_disk_failures_from_passes_cut_short() {
        let failure = |code| Err(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None));
        assert_eq!(checkpoint_outcome(Ok((0, 40, 40))), Checkpointed::Done { complete: true, frames: 40 });
        // Stopped at a reader's snapshot.
        assert_eq!(checkpoint_outcome(Ok((0, 40, 12))), Checkpointed::Done { complete: false, frames: 40 });
        // Another checkpoint was running: SQLite reports the counts as -1.
        assert_eq!(checkpoint_outcome(Ok((1, -1, -1))), Checkpointed::Done { complete: false, frames: -1 });
        assert!(matches!(checkpoint_outcome(failure(rusqlite::ffi::SQLITE_IOERR_FSYNC)), Checkpointed::DiskFailed(_)));
        assert!(matches!(checkpoint_outcome(failure(rusqlite::ffi::SQLITE_IOERR_WRITE)), Checkpointed::DiskFailed(_)));
        assert!(matches!(checkpoint_outcome(failure(rusqlite::ffi::SQLITE_IOERR)), Checkpointed::DiskFailed(_)));
        assert!(matches!(checkpoint_outcome(failure(rusqlite::ffi::SQLITE_BUSY)), Checkpointed::Failed(_)));
        // A lock or shared-memory failure loses nothing.
        assert!(matches!(checkpoint_outcome(failure(rusqlite::ffi::SQLITE_IOERR_SHMLOCK)), Checkpointed::Failed(_)));
        assert!(matches!(checkpoint_outcome(failure(rusqlite::ffi::SQLITE_IOERR_LOCK)), Checkpointed::Failed(_)));
    }

    #[tokio::test]
    async fn live_claims_are_restored_at_startup_and_lapsed_ones_do_not_count() {
        let dir = TempDir::new();
        {
            let store = open(&dir, 10);
            ok(store.accept(&envelope("m1"), Duration::ZERO).await);
            ok(store.accept(&envelope("m2"), TTL).await);
        }
        let store = open(&dir, 10);
        assert_eq!(ok(store.accept(&envelope("m1"), TTL).await), Acceptance::New);
        assert_eq!(ok(store.accept(&envelope("m2"), TTL).await), Acceptance::Duplicate);
    }

    /// Nanoseconds of CPU this process's live threads have used, and the writer thread's share
    /// (from `/proc/self/task/*/schedstat`, nanosecond resolution unlike `utime`/`stime`).
    fn cpu_ns() -> (u64, u64) {
        let (mut total, mut writer) = (0, 0);
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return (0, 0) };
        for task in tasks.flatten() {
            let path = task.path();
            let ran = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|stat| stat.split_whitespace().next().and_then(|ns| ns.parse::<u64>().ok()))
                .unwrap_or(0);
            total += ran;
            if std::fs::read_to_string(path.join("comm")).is_ok_and(|comm| comm.trim() == "sqlite-writer") {
                writer += ran;
            }
        }
        (total, writer)
    }

    /// A history turn about the size of a real envelope's JSON.
    fn realistic_turn(i: usize) -> Turn {
        let question = format!("{i}: 请帮我把下面这段话翻译成英文，并解释一下其中的成语：这件事情我们要从长计议，不能操之过急，否则就会欲速则不达。");
        Turn { answer: question.repeat(3), question }
    }

    /// An envelope the size of a real one (its JSON is about 700 bytes).
    fn realistic_envelope(message_id: &str) -> Envelope {
        let mut e = envelope(message_id);
        e.channel_kind = "wechat_mp".into();
        e.received_at_ms = 1_717_171_717_171;
        e.conversation.id = "oGZUI0egBJY1zhBYw2KhdUfwVJJE".into();
        e.sender = Sender { id: "oGZUI0egBJY1zhBYw2KhdUfwVJJE".into(), name: Some("张三".into()) };
        e.content = vec![yizhan_channel_core::Segment::Text {
            text: "请帮我把下面这段话翻译成英文，并解释一下其中的成语：这件事情我们要从长计议，不能操之过急，\
                   否则就会欲速则不达。另外，明天下午三点的会议改到四点了，请提醒大家准时参加。谢谢！"
                .into(),
        }];
        e.reply_handle = ReplyHandle(serde_json::json!({
            "to_user": "oGZUI0egBJY1zhBYw2KhdUfwVJJE",
            "from_user": "gh_3f8b2c1d9e7a",
            "msg_id": message_id,
            "create_time": 1_717_171_717,
            "passive_deadline_ms": 1_717_171_721_671_i64,
        }));
        e
    }

    async fn run_benchmark(durability: Durability) {
        const TOTAL: usize = 50_000;
        const TASKS: usize = 64;
        let dir = TempDir::new();
        let options = SqliteOptions { max_turns_kept: 10, durability, ..test_options() };
        let store = Arc::new(ok(SqliteStore::open(&dir.db(), options)));
        let size = ok(serde_json::to_string(&realistic_envelope(&format!("om_{:032x}", 0)))).len();
        let (cpu_before, writer_before) = cpu_ns();
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                for i in (task..TOTAL).step_by(TASKS) {
                    // Platform ids in no particular order, as Feishu's and WeCom's are.
                    let scrambled = (i as u128 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
                    let e = realistic_envelope(&format!("om_{scrambled:032x}"));
                    let begun = std::time::Instant::now();
                    ok(store.accept(&e, TTL).await);
                    slowest = slowest.max(begun.elapsed());
                }
                slowest
            }));
        }
        let mut slowest = Duration::ZERO;
        for task in tasks {
            slowest = slowest.max(ok(task.await));
        }
        let elapsed = started.elapsed();
        let (cpu_after, writer_after) = cpu_ns();
        let per_accept_us = |ns: u64| ns as f64 / 1_000.0 / TOTAL as f64;
        println!(
            "{durability:?}: {TOTAL} accepts ({size}-byte envelopes) from {TASKS} tasks in {elapsed:?}: \
             {:.0} accepts/s, CPU {:.1} µs/accept (writer thread {:.1} µs/accept), slowest accept {slowest:?}",
            TOTAL as f64 / elapsed.as_secs_f64(),
            per_accept_us(cpu_after - cpu_before),
            per_accept_us(writer_after - writer_before),
        );
    }

    /// Throughput and CPU per `accept`, the ack path's cost; run with
    /// `cargo test --release --lib -p yizhan store::sqlite -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore]
    async fn benchmark_accepts_per_second() {
        run_benchmark(Durability::ProcessCrash).await;
        run_benchmark(Durability::PowerLoss).await;
    }
}
