//! The inbound log: where the SQLite store journals accepted envelopes, and their dedupe claims,
//! before the platform is acknowledged.
//!
//! Why not a SQLite table: on the accept path every microsecond of CPU and every thread hand-off
//! shows in the acknowledgement rate. A journal row cost the writer thread about 10 µs (three
//! B-tree inserts, about nine 4 KiB WAL frames per commit) and its fsync a hand-off to a syncer
//! thread; an append to a preallocated file, fsynced by the thread that wrote it, costs a
//! fraction of either (docs/benchmarks.md). Answers, the outbox and history stay in SQLite,
//! where they need its transactions.
//!
//! # Files
//!
//! `<database>.inbound/<number, 16 hex digits>.log`, segments of
//! [`SqliteOptions::log_segment_bytes`](super::SqliteOptions) each, written front to back. A
//! segment is zero-filled and fsynced (with its directory) by the **preparer thread** before
//! the writer takes it, so that an `fdatasync` after an append only has data to flush: writing
//! into a file's unallocated or unwritten blocks would make every `fdatasync` commit the
//! filesystem's metadata journal too. Envelope records leave the last sixteenth of each
//! segment to finish records (unused while fresh segments come: about 6% more zero-filling),
//! so that answered messages are still marked done while none can be made (a full disk). At
//! startup the previous run's spare, never written, becomes the first segment; other segments never written (or left half prepared by a crash)
//! are deleted. `LOCK` in the directory is `flock`ed for as long as the log is open: one
//! process per log. A database that has used a log refuses to open without its directory (see
//! `SqliteStore::open`).
//!
//! # Records
//!
//! `[payload length: u32 LE][CRC-32 of (segment number LE, payload): u32 LE][payload]`, where
//! the payload is either
//! - accept: `1, seq u64, claim [16], claim expiry i64 (Unix ms), id length u16, id, envelope JSON`
//! - finish: `2, id`
//! - carry: `3, seq u64, original seq u64, time carried i64 (Unix ms), id length u16, id,
//!   envelope JSON`: an open envelope journaled again (see Lifetimes).
//!
//! A zero length, a record running past the end or a wrong CRC ends what can be read there:
//! where a crash tore the last batch, whose callers were never answered, or damage on the disk.
//! The scan then looks for the next record that passes its CRC (and is followed by another, or
//! by the zeros after the last): after a torn tail there is none as a rule (after a restart the
//! writer never appends behind one; it starts a new segment; a power loss can land a later page
//! of the torn batch, whose records are then read: messages never acknowledged, answered once),
//! and after damage the rest of the segment is read as before (logged as an error: the damaged
//! records are lost; the search is bounded, see `next_readable_record`). The CRC covers the
//! segment number so that nothing written under another number can pass for a record here.
//!
//! # Lifetimes
//!
//! An accepted envelope is open until its finish record. A segment is deleted once it is not
//! the one being written, holds no open envelope, all its dedupe claims have lapsed, and every
//! older segment is gone (its finish records may be what closes envelopes of older segments,
//! so they may not disappear first). Envelopes still open an hour after every claim of the
//! oldest segment lapsed are journaled again in the active segment, so that one envelope stuck
//! somewhere cannot keep every segment after its own; of two accept records for one envelope,
//! the later one counts.

use super::claims::{ClaimKey, Claims};
use super::Acceptance;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

const ACCEPT: u8 = 1;
const FINISH: u8 = 2;
const CARRY: u8 = 3;
/// Length and CRC.
const HEADER: usize = 8;
/// Kind, seq, claim, expiry and id length: the accept payload before the id.
const ACCEPT_FIXED: usize = 1 + 8 + 16 + 8 + 2;
/// Kind, seq, original seq, time carried and id length: the carry payload before the id.
const CARRY_FIXED: usize = 1 + 8 + 8 + 8 + 2;

/// The part of each segment (1/16: 2 MiB, some 30,000 finish records, of the default 32 MiB)
/// that envelope records leave to finish records (see `InboundLog::append_envelope_record`).
const FINISH_RESERVE_DIVISOR: u64 = 16;

/// See [`prepare_segment`].
const ZERO_FILL_CHUNK: usize = 256 << 10;

/// How often, at most, the writer forgets lapsed claims and deletes finished segments.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// How long past the lapse of the oldest segment's claims its open envelopes wait before they
/// are journaled again (see `InboundLog::carry_forward_stuck`), in ms. Not at once: with a short
/// `dedupe_ttl_secs`, envelopes queued behind a slow model outlive their claims while still
/// being worked on, and copying them over and over would only cost writes.
const CARRY_FORWARD_AFTER_MS: i64 = 3_600_000;

/// How long a carry forward that could not free its segment waits before it tries again.
const CARRY_RETRY_AFTER: Duration = Duration::from_secs(600);

/// What the log thread is asked to do.
#[derive(Debug)]
pub(super) enum LogOp {
    /// Claim and journal an envelope (see `Store::accept`).
    Accept { claim: ClaimKey, envelope_id: String, envelope: String, ttl_ms: i64 },
    /// Close an open envelope; a no-op for one that is not open.
    Finish { envelope_id: String },
    /// The open envelopes, oldest first, with their JSON.
    Open,
    /// Whether an envelope is open.
    IsOpen { envelope_id: String },
}

/// What a [`LogOp`] produced.
#[derive(Debug)]
pub(super) enum Logged {
    Accepted(Acceptance),
    Finished,
    Open(Vec<OpenEnvelope>),
    IsOpen(bool),
}

/// An envelope accepted and not finished.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct OpenEnvelope {
    pub envelope_id: String,
    pub json: String,
}

pub(super) type LogReply = oneshot::Sender<Result<Logged, String>>;

pub(super) struct LogJob {
    pub op: LogOp,
    pub reply: LogReply,
}

/// Makes a segment's appended bytes durable (`fdatasync` in production); `None` for
/// `Durability::ProcessCrash`, which answers after the write.
pub(super) type SyncSegment = Box<dyn FnMut(&File) -> std::io::Result<()> + Send>;

/// The log's directory for the database at `db`.
pub(super) fn log_dir(db: &Path) -> PathBuf {
    super::beside(db, ".inbound")
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:016x}.log"))
}

/// The segment numbers in `dir`, ascending; other files are left alone.
fn segment_numbers(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(stem) = name.to_str().and_then(|name| name.strip_suffix(".log")) else { continue };
        // Exactly the names `segment_path` makes: `from_str_radix` alone would also take
        // `000000000000000A` or `+000000000000001`, which are then opened under another name.
        if stem.len() == 16 && stem.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            if let Ok(number) = u64::from_str_radix(stem, 16) {
                numbers.push(number);
            }
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

fn crc(segment: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one framed record to `buf`.
fn frame(buf: &mut Vec<u8>, segment: u64, payload: &[u8]) {
    // Payloads are bounded by the segment size, itself far below 4 GiB.
    let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&length.to_le_bytes());
    buf.extend_from_slice(&crc(segment, payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

fn accept_payload(seq: u64, claim: &ClaimKey, expires_at: i64, envelope_id: &str, envelope: &[u8]) -> Option<Vec<u8>> {
    envelope_payload(ACCEPT, [&seq.to_le_bytes(), claim, &expires_at.to_le_bytes()], envelope_id, envelope)
}

fn carry_payload(seq: u64, original_seq: u64, carried_at: i64, envelope_id: &str, envelope: &[u8]) -> Option<Vec<u8>> {
    let fields: [&[u8]; 3] = [&seq.to_le_bytes(), &original_seq.to_le_bytes(), &carried_at.to_le_bytes()];
    envelope_payload(CARRY, fields, envelope_id, envelope)
}

/// `kind`, its fixed fields, the id's length (u16), the id and the envelope; `None` for an id
/// too long for its length field.
fn envelope_payload(kind: u8, fields: [&[u8]; 3], envelope_id: &str, envelope: &[u8]) -> Option<Vec<u8>> {
    let id_length = u16::try_from(envelope_id.len()).ok()?;
    let fixed = 1 + fields.iter().map(|field| field.len()).sum::<usize>() + 2;
    let mut payload = Vec::with_capacity(fixed + envelope_id.len() + envelope.len());
    payload.push(kind);
    for field in fields {
        payload.extend_from_slice(field);
    }
    payload.extend_from_slice(&id_length.to_le_bytes());
    payload.extend_from_slice(envelope_id.as_bytes());
    payload.extend_from_slice(envelope);
    Some(payload)
}

fn finish_payload(envelope_id: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(1 + envelope_id.len());
    payload.push(FINISH);
    payload.extend_from_slice(envelope_id.as_bytes());
    payload
}

/// A record read back.
#[derive(Debug, PartialEq)]
enum Record<'a> {
    Accept {
        seq: u64,
        claim: ClaimKey,
        expires_at: i64,
        envelope_id: &'a str,
        envelope_at: usize,
        envelope_len: usize,
    },
    Finish {
        envelope_id: &'a str,
    },
    /// An open envelope journaled again (see `InboundLog::carry_forward_stuck`).
    Carry {
        seq: u64,
        original_seq: u64,
        carried_at: i64,
        envelope_id: &'a str,
        envelope_at: usize,
        envelope_len: usize,
    },
}

/// The id (its length at `fixed - 2`) and the envelope's place after `fixed` bytes of
/// `payload`, which starts at `start` in its segment.
fn id_and_envelope(payload: &[u8], fixed: usize, start: usize) -> Option<(&str, usize, usize)> {
    let id_length = u16::from_le_bytes(payload.get(fixed - 2..fixed)?.try_into().ok()?) as usize;
    let id_end = fixed.checked_add(id_length)?;
    let envelope_id = std::str::from_utf8(payload.get(fixed..id_end)?).ok()?;
    Some((envelope_id, start + id_end, payload.len().checked_sub(id_end)?))
}

/// Reads the record at `at` in `data` (a whole segment); `None` where the segment ends. The
/// envelope's place is given relative to `data`.
fn read_record(data: &[u8], at: usize, segment: u64) -> Option<(Record<'_>, usize)> {
    let header = data.get(at..at.checked_add(HEADER)?)?;
    let length = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let stored_crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    if length == 0 {
        return None;
    }
    let start = at + HEADER;
    let payload = data.get(start..start.checked_add(length)?)?;
    if crc(segment, payload) != stored_crc {
        return None;
    }
    let next = start + length;
    match payload[0] {
        ACCEPT if payload.len() >= ACCEPT_FIXED => {
            let seq = u64::from_le_bytes(payload[1..9].try_into().ok()?);
            let claim: ClaimKey = payload[9..25].try_into().ok()?;
            let expires_at = i64::from_le_bytes(payload[25..33].try_into().ok()?);
            let (envelope_id, envelope_at, envelope_len) = id_and_envelope(payload, ACCEPT_FIXED, start)?;
            Some((Record::Accept { seq, claim, expires_at, envelope_id, envelope_at, envelope_len }, next))
        }
        CARRY if payload.len() >= CARRY_FIXED => {
            let seq = u64::from_le_bytes(payload[1..9].try_into().ok()?);
            let original_seq = u64::from_le_bytes(payload[9..17].try_into().ok()?);
            let carried_at = i64::from_le_bytes(payload[17..25].try_into().ok()?);
            let (envelope_id, envelope_at, envelope_len) = id_and_envelope(payload, CARRY_FIXED, start)?;
            Some((Record::Carry { seq, original_seq, carried_at, envelope_id, envelope_at, envelope_len }, next))
        }
        FINISH => Some((Record::Finish { envelope_id: std::str::from_utf8(&payload[1..]).ok()? }, next)),
        _ => None,
    }
}

/// Where the first readable record at or after `from` starts in `data` (a whole segment), if
/// any. Positions whose length field is zero (the zero-filled rest of a segment) are passed
/// over at once; a record must pass its CRC, which covers the segment number, and be followed by
/// another readable record or by the zeros after the last one, to count (a CRC that matches by
/// chance, one in four billion, is not taken for a record). The bytes checked are bounded by
/// `budget`, spent as they go: garbage full of plausible lengths would otherwise cost a CRC over
/// megabytes at each of millions of positions, holding up the start for hours.
fn next_readable_record(data: &[u8], from: usize, segment: u64, budget: &mut usize) -> Option<usize> {
    let last = data.len().checked_sub(HEADER)?;
    let readable = |start: usize, budget: &mut usize| {
        let length = data.get(start..start + 4).and_then(|field| field.try_into().ok()).map(u32::from_le_bytes)?;
        // A length past the segment's end fails before any CRC: only the others cost.
        if (length as usize).saturating_add(start + HEADER) > data.len() {
            return None;
        }
        let Some(left) = budget.checked_sub(length as usize) else {
            *budget = 0;
            return None;
        };
        *budget = left;
        read_record(data, start, segment).map(|(_, next)| next)
    };
    let confirmed = |next: usize, budget: &mut usize| {
        let ends_there = data.get(next..).is_some_and(|rest| rest.len() < HEADER || rest[..4] == [0; 4]);
        ends_there || readable(next, budget).is_some()
    };
    let mut at = from;
    while at <= last {
        // The next byte that can start a non-zero length field.
        let nonzero = data.get(at..)?.iter().position(|byte| *byte != 0)?;
        let candidate = (at + nonzero).saturating_sub(3).max(at);
        for start in candidate..=(at + nonzero).min(last) {
            if *budget == 0 {
                return None;
            }
            if readable(start, budget).is_some_and(|next| confirmed(next, budget)) {
                return Some(start);
            }
        }
        at = at + nonzero + 1;
    }
    None
}

/// How many bytes, in multiples of a segment's size, the scan may check looking past damage in
/// one segment (see [`next_readable_record`]): a few passes over it, some tens of milliseconds.
const RESYNC_BUDGET_SEGMENTS: usize = 4;

/// Where an open envelope's JSON is.
#[derive(Debug, Clone, Copy)]
struct OpenEntry {
    /// Its accept's seq: its place in arrival order (a carried copy keeps its original's).
    seq: u64,
    segment: u64,
    at: u64,
    len: usize,
}

/// The open envelopes by id. A B-tree, not a hash map: the map only grows while the model is
/// slow or down, and a hash map's resize (every doubling, all entries at once, on the thread
/// every acknowledgement waits for) stalled it for up to 80 ms at 400,000 entries; ids begin
/// with their arrival time, so inserts land at the tree's right edge.
type OpenEntries = BTreeMap<String, OpenEntry>;

/// What the log knows about one segment.
#[derive(Debug)]
struct SegmentInfo {
    number: u64,
    /// Open envelopes accepted in it.
    open: usize,
    /// The latest claim expiry of its accepts.
    claims_until: i64,
}

/// Everything read back from the segments at startup.
pub(super) struct Scanned {
    open: OpenEntries,
    segments: VecDeque<SegmentInfo>,
    claims: Vec<(ClaimKey, i64)>,
    next_seq: u64,
    next_segment: u64,
    /// The last segment, if it was never written to (the spare a previous run prepared): the
    /// next writer starts in it instead of leaving it behind.
    blank_last: Option<u64>,
    /// Held while the log is in use (see [`lock_dir`]).
    lock: Option<File>,
}

impl Scanned {
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    pub fn is_open(&self, envelope_id: &str) -> bool {
        self.open.contains_key(envelope_id)
    }
}

/// Takes `dir/LOCK` for this process (`flock`, released when the file closes or the process
/// dies): two processes writing one log would delete and overwrite each other's segments.
#[cfg(target_os = "linux")]
pub(super) fn lock_dir(dir: &Path) -> std::io::Result<Option<File>> {
    use std::os::fd::AsRawFd;
    let file = File::options().read(true).write(true).create(true).truncate(false).open(dir.join("LOCK"))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            error.kind(),
            format!("{} is in use by another process ({error}); one yizhan per database", dir.display()),
        ));
    }
    Ok(Some(file))
}

#[cfg(not(target_os = "linux"))]
pub(super) fn lock_dir(_dir: &Path) -> std::io::Result<Option<File>> {
    Ok(None)
}

/// Creates `dir` if it is missing, durably.
pub(super) fn create_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// [`scan_locked`], creating and locking the directory first.
#[cfg(test)]
pub(super) fn scan(dir: &Path, now: i64, segment_bytes: u64) -> std::io::Result<Scanned> {
    create_dir(dir)?;
    let lock = lock_dir(dir)?;
    scan_locked(dir, now, segment_bytes, lock)
}

/// Reads every segment in `dir`, oldest first, holding the directory's `lock` (from
/// [`lock_dir`]). Blank segments (never written) are deleted, but for the last one; so are
/// segments left half prepared by a crash, and the oldest ones with nothing open and no live
/// claim left. `segment_bytes` is the size a reusable blank segment must have.
pub(super) fn scan_locked(dir: &Path, now: i64, segment_bytes: u64, lock: Option<File>) -> std::io::Result<Scanned> {
    scan_syncing(dir, now, segment_bytes, lock, &mut |file: &File| file.sync_data())
}

/// [`scan`], with `sync` for each segment that holds records. Those are synced before anything
/// is decided on them: a run killed between a batch's write and its sync leaves records that
/// this run reads from the page cache but that are not on disk yet; answering a retry as a
/// duplicate on such a claim, or deleting what such a finish or carried copy freed, would then
/// be undone by a power loss.
fn scan_syncing(
    dir: &Path,
    now: i64,
    segment_bytes: u64,
    lock: Option<File>,
    sync: &mut dyn FnMut(&File) -> std::io::Result<()>,
) -> std::io::Result<Scanned> {
    let mut scanned = Scanned {
        open: OpenEntries::new(),
        segments: VecDeque::new(),
        claims: Vec::new(),
        next_seq: 1,
        next_segment: 1,
        blank_last: None,
        lock,
    };
    let numbers = segment_numbers(dir)?;
    let mut data = Vec::new();
    for (index, &number) in numbers.iter().enumerate() {
        data.clear();
        let mut file = File::open(segment_path(dir, number))?;
        file.read_to_end(&mut data)?;
        let mut info = SegmentInfo { number, open: 0, claims_until: i64::MIN };
        let mut at = 0;
        let mut last_seq = None;
        let mut resync_budget = data.len().saturating_mul(RESYNC_BUDGET_SEGMENTS);
        loop {
            let Some((record, next)) = read_record(&data, at, number) else {
                // The end of what was written, a batch a crash tore (nothing readable after it:
                // the writer never appends behind a torn tail), or damage to the disk, after
                // which this segment's later records are still read: dropped, its finishes
                // would bring answered messages back, and its accepts lose acknowledged ones.
                let Some(resumed) = next_readable_record(&data, at.saturating_add(1), number, &mut resync_budget)
                else {
                    break;
                };
                tracing::error!(
                    segment = %segment_path(dir, number).display(),
                    unreadable_from = at,
                    readable_again_at = resumed,
                    "Inbound log segment damaged: the records in between are lost (a message \
                     accepted there will not be answered; one finished there may be answered again). \
                     Check the disk."
                );
                at = resumed;
                continue;
            };
            // An accept, or a carried copy (its claim lapsed long ago; its segment is kept for
            // an hour from the carry, as a claim would keep it), which replaces the earlier
            // record of the same envelope and keeps its place in the order.
            let (seq, order, claim, kept_until, envelope_id, envelope_at, envelope_len) = match record {
                Record::Finish { envelope_id } => {
                    close(&mut scanned.open, &mut scanned.segments, &mut info, envelope_id);
                    at = next;
                    continue;
                }
                Record::Accept { seq, claim, expires_at, envelope_id, envelope_at, envelope_len } => {
                    (seq, seq, Some((claim, expires_at)), expires_at, envelope_id, envelope_at, envelope_len)
                }
                Record::Carry { seq, original_seq, carried_at, envelope_id, envelope_at, envelope_len } => {
                    (seq, original_seq, None, carried_at, envelope_id, envelope_at, envelope_len)
                }
            };
            if last_seq.is_some_and(|last| seq <= last) {
                // Never written by this log's writer, whose seqs only grow.
                tracing::error!(segment = number, seq, "Inbound log record out of order; rest of segment skipped.");
                break;
            }
            last_seq = Some(seq);
            scanned.next_seq = scanned.next_seq.max(seq.saturating_add(1));
            close(&mut scanned.open, &mut scanned.segments, &mut info, envelope_id);
            info.open += 1;
            info.claims_until = info.claims_until.max(kept_until);
            if let Some((claim, expires_at)) = claim.filter(|(_, expires_at)| *expires_at > now) {
                scanned.claims.push((claim, expires_at));
            }
            let entry = OpenEntry { seq: order, segment: number, at: envelope_at as u64, len: envelope_len };
            scanned.open.insert(envelope_id.to_owned(), entry);
            at = next;
        }
        let rest = data.get(at..).unwrap_or_default();
        if let Some(offset) = rest.iter().position(|byte| *byte != 0) {
            // A crash can tear the last batch a run wrote; damage looks the same. Either way
            // nothing after this point is read, so say where.
            tracing::error!(
                segment = %segment_path(dir, number).display(),
                valid_up_to = at,
                next_nonzero_byte = at + offset,
                "Inbound log segment has bytes after its last readable record: a write torn by a \
                 crash (then those messages were never acknowledged) or damage to the disk."
            );
        }
        scanned.next_segment = number.checked_add(1).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "inbound log segment number too large")
        })?;
        if at == 0 && rest.iter().all(|byte| *byte == 0) {
            // Never written: it holds nothing, not even finish records, so it can go in any
            // order. The last one is kept for reuse if it was fully prepared.
            if index + 1 == numbers.len() && data.len() as u64 == segment_bytes {
                scanned.blank_last = Some(number);
            } else {
                std::fs::remove_file(segment_path(dir, number))?;
            }
            continue;
        }
        sync(&file)?;
        scanned.segments.push_back(info);
    }
    // Before the writer asks for a fresh segment: on a full disk, this may be what makes room.
    delete_finished_segments(dir, &mut scanned.segments, now);
    File::open(dir)?.sync_all()?;
    Ok(scanned)
}

/// Forgets `envelope_id` as open, counting it off its segment (`current` is the segment being
/// read or written, not yet in `segments`).
fn close(open: &mut OpenEntries, segments: &mut VecDeque<SegmentInfo>, current: &mut SegmentInfo, envelope_id: &str) {
    let Some(entry) = open.remove(envelope_id) else { return };
    if let Some(info) = segment_info(segments, current, entry.segment) {
        info.open = info.open.saturating_sub(1);
    }
}

/// What is known of segment `number`: `current` (the one being read or written) or one of
/// `segments` (ascending).
fn segment_info<'a>(
    segments: &'a mut VecDeque<SegmentInfo>,
    current: &'a mut SegmentInfo,
    number: u64,
) -> Option<&'a mut SegmentInfo> {
    if number == current.number {
        Some(current)
    } else {
        segments.binary_search_by_key(&number, |info| info.number).ok().and_then(|index| segments.get_mut(index))
    }
}

/// Creates segment `number` in `dir`: zero-filled to `bytes`, fsynced, directory fsynced.
///
/// In chunks of [`ZERO_FILL_CHUNK`], each synced before the next is written: the disk flushes
/// its cache for everyone, so a log `fdatasync` issued meanwhile waits for at most one chunk,
/// not for a whole segment of zeros. (Measured with one fsync per segment, p99 was 17–78 ms,
/// with chunks 9–15 ms; a stall since fixed elsewhere was in both, so the share of the chunks
/// in that is not known.)
pub(super) fn prepare_segment(dir: &Path, number: u64, bytes: u64) -> std::io::Result<File> {
    let path = segment_path(dir, number);
    let mut file = File::options().read(true).write(true).create_new(true).open(&path)?;
    let zeros = vec![0u8; ZERO_FILL_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let chunk = usize::try_from(left.min(zeros.len() as u64)).unwrap_or(zeros.len());
        file.write_all(&zeros[..chunk])?;
        file.sync_data()?;
        left -= chunk as u64;
    }
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Makes segment `number` of `bytes` in a directory ([`prepare_segment`]; tests fail it).
pub(super) type PrepareSegment = Box<dyn FnMut(&Path, u64, u64) -> std::io::Result<File> + Send>;

/// How long the preparer waits before trying a failed segment again.
pub(super) const PREPARE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How often a writer waiting for a segment checks whether its preparation failed.
const SPARE_POLL: Duration = Duration::from_millis(50);

/// How often a preparation that keeps failing is logged (every failure is retried).
const PREPARE_FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The writer's end of the preparer: segments made ahead, and why none is coming.
struct Spares {
    ready: std::sync::mpsc::Receiver<(u64, File)>,
    /// The last preparation's error, until one succeeds. The preparer ends once the writer's
    /// reference is gone.
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl Spares {
    /// The next segment: at once if one is ready; [`AppendError::NoSpare`] at once if the last
    /// preparation failed (so that the record is refused instead of waiting out the retries);
    /// otherwise when the one being prepared is done.
    fn next(&self) -> Result<(u64, File), AppendError> {
        use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
        let stopped = || AppendError::Write(std::io::Error::other("the segment preparer stopped"));
        match self.ready.try_recv() {
            Ok(spare) => return Ok(spare),
            Err(TryRecvError::Disconnected) => return Err(stopped()),
            Err(TryRecvError::Empty) => {}
        }
        loop {
            if let Some(error) = self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
                return Err(AppendError::NoSpare(std::io::Error::other(error)));
            }
            match self.ready.recv_timeout(SPARE_POLL) {
                Ok(spare) => return Ok(spare),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(stopped()),
            }
        }
    }
}

/// Keeps one segment ready ahead of the writer; ends when the writer is gone.
///
/// A failure (a full disk, say) is published in `failure`, for the writer to refuse the
/// records that need a segment meanwhile, and the same segment is tried again after
/// `retry_after` until it succeeds: the store goes on once the disk has room again, without a
/// restart. (A failure is not handed over like a segment: it would wait for the writer's next
/// rotation, maybe hours later, and refuse that batch with the disk long fine again.)
fn run_preparer(
    dir: &Path,
    mut number: u64,
    bytes: u64,
    ready: &std::sync::mpsc::SyncSender<(u64, File)>,
    failure: &Arc<std::sync::Mutex<Option<String>>>,
    prepare: &mut PrepareSegment,
    retry_after: Duration,
) {
    let mut last_logged: Option<Instant> = None;
    loop {
        match prepare(dir, number, bytes) {
            Ok(file) => {
                if failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take().is_some() {
                    tracing::info!(segment = number, "An inbound log segment could be prepared again.");
                }
                last_logged = None;
                if ready.send((number, file)).is_err() {
                    return;
                }
                let Some(next) = number.checked_add(1) else { return };
                number = next;
            }
            Err(error) => {
                if last_logged.is_none_or(|logged| logged.elapsed() >= PREPARE_FAILURE_LOG_EVERY) {
                    tracing::error!(segment = number, %error, "Cannot prepare an inbound log segment; messages are refused once the current one is full. Tried again every second.");
                    last_logged = Some(Instant::now());
                }
                // What a failure left would make the next try's `create_new` fail.
                if let Err(removed) = std::fs::remove_file(segment_path(dir, number)) {
                    if removed.kind() != std::io::ErrorKind::NotFound {
                        tracing::error!(segment = number, error = %removed, "Cannot remove a half-prepared inbound log segment.");
                    }
                }
                *failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error.to_string());
                if Arc::strong_count(failure) == 1 {
                    return;
                }
                std::thread::sleep(retry_after);
            }
        }
    }
}

/// Why a record could not join the batch.
enum AppendError {
    /// No fresh segment to rotate into (see [`run_preparer`]). Asked for before anything of
    /// the record is framed or the segment being left is written, so that only the record is
    /// refused: the rest of its batch goes on.
    NoSpare(std::io::Error),
    /// A write failed: the log breaks.
    Write(std::io::Error),
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoSpare(error) => write!(f, "no fresh inbound log segment: {error}"),
            Self::Write(error) => error.fmt(f),
        }
    }
}

/// The log thread's state.
pub(super) struct InboundLog {
    dir: PathBuf,
    segment_bytes: u64,
    active: File,
    active_info: SegmentInfo,
    /// Where the next record goes in `active`.
    offset: u64,
    segments: VecDeque<SegmentInfo>,
    open: OpenEntries,
    claims: Claims,
    next_seq: u64,
    spares: Spares,
    sync: Option<SyncSegment>,
    broken: Arc<AtomicBool>,
    /// The directory's lock, held as long as this log.
    _lock: Option<File>,
    last_housekeeping: Instant,
    /// Set when a carry forward could not free the oldest segment (see `carry_forward_stuck`).
    carry_paused_until: Option<Instant>,
    max_batch: usize,
    /// How long a batch short of `max_batch` waits for more jobs (`SqliteOptions::commit_delay`).
    commit_delay: Duration,
    /// Reused per batch.
    buf: Vec<u8>,
}

/// Why a record is refused while no fresh segment can be made: the log goes on (the platforms
/// retry what they are refused, and the preparer tries again).
fn no_room(error: &std::io::Error) -> String {
    format!("the inbound log has no room for now ({error}); try again later")
}

/// Why the log cannot go on.
const BROKEN: &str = "the inbound log refuses writes after a disk error; check the disk and restart yizhan";

impl InboundLog {
    /// Starts from `scanned` (claims restored from elsewhere are added), with the preparer
    /// thread creating segments (`prepare`: [`prepare_segment`], tried again after `retry_after`
    /// when it fails) from the next free number on. Returns the log and the preparer's handle.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        dir: PathBuf,
        scanned: Scanned,
        extra_claims: Vec<(ClaimKey, i64)>,
        segment_bytes: u64,
        max_batch: usize,
        commit_delay: Duration,
        sync: Option<SyncSegment>,
        broken: Arc<AtomicBool>,
        mut prepare: PrepareSegment,
        retry_after: Duration,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let Scanned { open, segments, mut claims, next_seq, next_segment, blank_last, lock } = scanned;
        claims.extend(extra_claims);
        let (ready, ready_rx) = std::sync::mpsc::sync_channel(0);
        let spares = Spares { ready: ready_rx, failure: Arc::default() };
        let failure = Arc::clone(&spares.failure);
        let preparer_dir = dir.clone();
        let preparer = std::thread::Builder::new().name("inbound-log-preparer".to_owned()).spawn(move || {
            run_preparer(&preparer_dir, next_segment, segment_bytes, &ready, &failure, &mut prepare, retry_after)
        })?;
        // A fresh segment after every start: never append behind a possibly torn tail. The
        // previous run's spare qualifies: nothing was ever written to it.
        let (number, active) = match blank_last {
            Some(number) => (number, File::options().read(true).write(true).open(segment_path(&dir, number))?),
            None => spares.next().map_err(|error| match error {
                AppendError::NoSpare(error) | AppendError::Write(error) => error,
            })?,
        };
        let log = Self {
            dir,
            segment_bytes,
            active,
            active_info: SegmentInfo { number, open: 0, claims_until: i64::MIN },
            offset: 0,
            segments,
            open,
            claims: {
                let claims = Claims::restored(claims);
                tracing::debug!(live = claims.len(), "Dedupe claims restored.");
                claims
            },
            next_seq,
            spares,
            sync,
            broken,
            _lock: lock,
            last_housekeeping: Instant::now().checked_sub(HOUSEKEEPING_EVERY).unwrap_or_else(Instant::now),
            carry_paused_until: None,
            max_batch: max_batch.max(1),
            commit_delay,
            buf: Vec::new(),
        };
        Ok((log, preparer))
    }

    /// Serves jobs until every sender is gone and the queue is drained.
    pub fn run(mut self, jobs: mpsc::Receiver<LogJob>) {
        super::serve_in_batches(jobs, self.max_batch, self.commit_delay, |batch| self.serve(batch));
    }

    fn serve(&mut self, batch: &mut Vec<LogJob>) {
        // A caller that gave up must not have its envelope journaled behind its back.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        if self.broken.load(Ordering::Acquire) {
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(BROKEN.to_owned()));
            }
            return;
        }
        let now = super::now_ms();
        let mut results = Vec::with_capacity(batch.len());
        // Segments written by this batch besides the active one (a rotation mid-batch).
        let mut filled: Vec<File> = Vec::new();
        let mut written = Ok(());
        self.buf.clear();
        // Sets, not lists: a batch can hold `max_batch` (1,024) jobs after a backlog, and each
        // job looks up the ones before it (1,024 accepts, release build, no sync: 5.9–6.3 ms
        // scanning lists, 1.6–2.5 ms with sets).
        let mut staged_open: HashMap<String, OpenEntry> = HashMap::new();
        let mut staged_finish: HashSet<String> = HashSet::new();
        for job in batch.iter() {
            let result = match &job.op {
                LogOp::Open => Ok(None),
                LogOp::IsOpen { envelope_id } => {
                    Ok(Some(Logged::IsOpen(self.open_now(&staged_open, &staged_finish, envelope_id))))
                }
                LogOp::Accept { claim, envelope_id, envelope, ttl_ms } => {
                    if self.claims.is_claimed(claim, now) {
                        Ok(Some(Logged::Accepted(Acceptance::Duplicate)))
                    } else if self.journaled(&staged_open, envelope_id) {
                        // Ids are fresh per webhook; two open entries under one id could never
                        // both be finished.
                        Err(format!("envelope {envelope_id} is already journaled"))
                    } else if self.next_seq == u64::MAX {
                        // Only a damaged or foreign segment can carry a seq this high (the scan
                        // resumes after the largest one read); never reuse or wrap one.
                        Err("the inbound log's sequence numbers are exhausted".to_owned())
                    } else {
                        let expires_at = now.saturating_add(*ttl_ms);
                        let payload =
                            accept_payload(self.next_seq, claim, expires_at, envelope_id, envelope.as_bytes());
                        let envelope_at = ACCEPT_FIXED + envelope_id.len();
                        match self.append_envelope_record(payload, envelope_at, self.next_seq, &mut filled) {
                            Err(AppendError::NoSpare(error)) => Err(no_room(&error)),
                            Err(AppendError::Write(error)) => {
                                written = Err(error);
                                break;
                            }
                            Ok(None) => Err("envelope (or its id) too large for the inbound log".to_owned()),
                            Ok(Some(entry)) => {
                                self.active_info.open += 1;
                                self.active_info.claims_until = self.active_info.claims_until.max(expires_at);
                                self.claims.stage(*claim, expires_at);
                                staged_open.insert(envelope_id.clone(), entry);
                                Ok(Some(Logged::Accepted(Acceptance::New)))
                            }
                        }
                    }
                }
                LogOp::Finish { envelope_id } => {
                    if self.open_now(&staged_open, &staged_finish, envelope_id) {
                        match self.append(&finish_payload(envelope_id), 0, &mut filled) {
                            Err(AppendError::NoSpare(error)) => Err(no_room(&error)),
                            Err(AppendError::Write(error)) => {
                                written = Err(error);
                                break;
                            }
                            Ok(None) => Err("envelope id too long for an inbound log segment".to_owned()),
                            Ok(Some(_)) => {
                                staged_finish.insert(envelope_id.clone());
                                Ok(Some(Logged::Finished))
                            }
                        }
                    } else {
                        Ok(Some(Logged::Finished))
                    }
                }
            };
            results.push(result);
        }
        if written.is_ok() {
            written = self.write_and_sync(&filled);
        }
        if let Err(error) = written {
            // Pages that failed to reach the disk may be dropped by the kernel without a later
            // fsync hearing of it: nothing more is accepted (as for the SQLite WAL).
            self.break_on(&error);
            self.claims.discard_staged();
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(format!("{BROKEN} ({error})")));
            }
            return;
        }
        self.claims.commit_staged();
        for (envelope_id, entry) in staged_open {
            self.open.insert(envelope_id, entry);
        }
        for envelope_id in staged_finish {
            close(&mut self.open, &mut self.segments, &mut self.active_info, &envelope_id);
        }
        for (job, result) in batch.drain(..).zip(results) {
            let answer = match result {
                Ok(Some(logged)) => Ok(logged),
                // `Open`, answered now that the batch's own accepts and finishes count.
                Ok(None) => self.list_open().map(Logged::Open).map_err(|error| error.to_string()),
                Err(error) => Err(error),
            };
            let _ = job.reply.send(answer);
        }
        if self.last_housekeeping.elapsed() >= HOUSEKEEPING_EVERY {
            self.last_housekeeping = Instant::now();
            self.claims.sweep(now);
            self.carry_forward_stuck(now);
            self.delete_finished_segments(now);
        }
    }

    /// Journals again, in the active segment, the envelopes that alone keep the oldest segment:
    /// still open an hour after every claim in it lapsed, so open for longer than the dedupe
    /// window and that hour (a bug or a store failure somewhere; nothing normal takes that
    /// long). Otherwise that segment, and every later one, would stay until a restart resumed
    /// them. The copies keep their originals' place in the order, are synced before the
    /// segment can go, and keep their own segment for an hour (so that a segment of copies is
    /// not copied again at once); a scan that meets both records keeps the later one.
    fn carry_forward_stuck(&mut self, now: i64) {
        if self.carry_paused_until.is_some_and(|until| Instant::now() < until) {
            return;
        }
        let stuck_since = now.saturating_sub(CARRY_FORWARD_AFTER_MS);
        let Some(front) = self.segments.front().filter(|front| front.open > 0 && front.claims_until <= stuck_since)
        else {
            return;
        };
        let (number, open) = (front.number, front.open);
        let mut stuck: Vec<(String, OpenEntry)> = self
            .open
            .iter()
            .filter(|(_, entry)| entry.segment == number)
            .map(|(envelope_id, entry)| (envelope_id.clone(), *entry))
            .collect();
        stuck.sort_unstable_by_key(|(_, entry)| entry.seq);
        let mut files = HashMap::new();
        let mut envelopes = Vec::with_capacity(stuck.len());
        for (_, entry) in &stuck {
            // As bytes: copied as they are, whatever they hold.
            match self.read_entry(&mut files, entry) {
                Ok(json) => envelopes.push(json),
                Err(error) => {
                    tracing::warn!(segment = number, %error, "Cannot read envelopes to carry forward; retried later.");
                    self.carry_paused_until = Some(Instant::now() + CARRY_RETRY_AFTER);
                    return;
                }
            }
        }
        self.buf.clear();
        let mut filled = Vec::new();
        let mut carried = Vec::with_capacity(stuck.len());
        let mut no_room = false;
        for ((envelope_id, original), envelope) in stuck.iter().zip(&envelopes) {
            if self.next_seq == u64::MAX {
                break;
            }
            let payload = carry_payload(self.next_seq, original.seq, now, envelope_id, envelope);
            let envelope_at = CARRY_FIXED + envelope_id.len();
            match self.append_envelope_record(payload, envelope_at, original.seq, &mut filled) {
                Ok(Some(entry)) => carried.push((envelope_id.clone(), entry)),
                Ok(None) => {}
                Err(AppendError::NoSpare(error)) => {
                    // Those carried so far are kept; the rest wait for the next try.
                    tracing::warn!(segment = number, %error, "No room to carry envelopes forward; retried later.");
                    self.carry_paused_until = Some(Instant::now() + CARRY_RETRY_AFTER);
                    no_room = true;
                    break;
                }
                Err(AppendError::Write(error)) => {
                    self.break_on(&error);
                    return;
                }
            }
        }
        if let Err(error) = self.write_and_sync(&filled) {
            self.break_on(&error);
            return;
        }
        if self.sync.is_none() && !carried.is_empty() {
            // Whatever the durability mode: the originals' segment is deleted (durably) once
            // the copies are counted, so the copies must be on disk first. Carries are rare.
            if let Err(error) = filled.iter().chain([&self.active]).try_for_each(File::sync_data) {
                self.break_on(&error);
                return;
            }
        }
        if !no_room && (carried.len() < stuck.len() || stuck.is_empty()) {
            // Too large for the segment size now configured, seqs exhausted, or (with nothing
            // found in it) counts gone wrong: the segment stays; say so, and do not spin on it.
            tracing::error!(
                segment = number,
                open,
                carried = carried.len(),
                "Inbound log segment kept by open envelopes that cannot be carried forward."
            );
            self.carry_paused_until = Some(Instant::now() + CARRY_RETRY_AFTER);
        }
        if !carried.is_empty() {
            tracing::warn!(
                segment = number,
                envelopes = carried.len(),
                "Envelopes open for over an hour past the dedupe window carried forward in the inbound log."
            );
        }
        for (envelope_id, entry) in carried {
            close(&mut self.open, &mut self.segments, &mut self.active_info, &envelope_id);
            if let Some(info) = segment_info(&mut self.segments, &mut self.active_info, entry.segment) {
                info.open += 1;
                info.claims_until = info.claims_until.max(now);
            }
            self.open.insert(envelope_id, entry);
        }
    }

    /// Stops the log, and the whole store, for good after a failed write or sync.
    fn break_on(&self, error: &dyn std::fmt::Display) {
        super::break_for_good(&self.broken, "writing the inbound log", &error.to_string());
    }

    /// The journaled JSON of `entry`, read back from its segment (kept open in `files` for the
    /// next entry).
    fn read_entry(&self, files: &mut HashMap<u64, File>, entry: &OpenEntry) -> std::io::Result<Vec<u8>> {
        let file = match files.entry(entry.segment) {
            std::collections::hash_map::Entry::Occupied(file) => file.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(File::open(segment_path(&self.dir, entry.segment))?)
            }
        };
        let mut json = vec![0; entry.len];
        file.read_exact_at(&mut json, entry.at)?;
        Ok(json)
    }

    /// Frames `payload`, an accept or carry record made under the next seq (which the caller
    /// has checked is not the last), into the batch buffer (see `append`). `envelope_at` is
    /// where the envelope starts in the payload; `order` the envelope's place among the open
    /// ones. Returns where its envelope lies, or `None` if the record could never fit.
    fn append_envelope_record(
        &mut self,
        payload: Option<Vec<u8>>,
        envelope_at: usize,
        order: u64,
        filled: &mut Vec<File>,
    ) -> Result<Option<OpenEntry>, AppendError> {
        let Some(payload) = payload else { return Ok(None) };
        // Envelopes leave the end of each segment to finishes, which can then still be written
        // while no fresh segment can be made (a full disk), and free segments for it.
        let Some(at) = self.append(&payload, self.segment_bytes / FINISH_RESERVE_DIVISOR, filled)? else {
            return Ok(None);
        };
        let entry = OpenEntry {
            seq: order,
            segment: self.active_info.number,
            at: at + (HEADER + envelope_at) as u64,
            len: payload.len().saturating_sub(envelope_at),
        };
        self.next_seq = self.next_seq.saturating_add(1);
        Ok(Some(entry))
    }

    /// Frames `payload` into the batch buffer for the active segment, rotating to a fresh
    /// segment first if it does not fit in all but the last `reserve` bytes of the segment.
    /// Returns the record's offset in its segment, or `None` if it could never fit a segment.
    fn append(&mut self, payload: &[u8], reserve: u64, filled: &mut Vec<File>) -> Result<Option<u64>, AppendError> {
        let size = (HEADER + payload.len()) as u64;
        let room = self.segment_bytes.saturating_sub(reserve);
        if size > room {
            return Ok(None);
        }
        if self.offset + self.buf.len() as u64 + size > room {
            // The spare first: until it is here, nothing of the batch is written.
            let (number, next) = self.spares.next()?;
            let tail = !self.buf.is_empty();
            if tail {
                self.active.write_all_at(&self.buf, self.offset).map_err(AppendError::Write)?;
                self.buf.clear();
            }
            let full = std::mem::replace(&mut self.active, next);
            // Synced with the batch if this batch wrote its tail (earlier batches synced the rest).
            if tail {
                filled.push(full);
            }
            let info =
                std::mem::replace(&mut self.active_info, SegmentInfo { number, open: 0, claims_until: i64::MIN });
            self.segments.push_back(info);
            self.offset = 0;
        }
        let at = self.offset + self.buf.len() as u64;
        frame(&mut self.buf, self.active_info.number, payload);
        Ok(Some(at))
    }

    fn write_and_sync(&mut self, filled: &[File]) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.active.write_all_at(&self.buf, self.offset)?;
            self.offset += self.buf.len() as u64;
        }
        if let Some(sync) = self.sync.as_mut() {
            for file in filled {
                sync(file)?;
            }
            if !self.buf.is_empty() {
                sync(&self.active)?;
            }
        }
        Ok(())
    }

    /// Whether `envelope_id` was open before this batch or is accepted in it (`staged`); the
    /// batch's finishes are not counted here.
    fn journaled(&self, staged: &HashMap<String, OpenEntry>, envelope_id: &str) -> bool {
        self.open.contains_key(envelope_id) || staged.contains_key(envelope_id)
    }

    /// Whether `envelope_id` is open as of this point of the batch: journaled, and not finished
    /// by an earlier job of the batch (`staged_finish`).
    fn open_now(
        &self,
        staged_open: &HashMap<String, OpenEntry>,
        staged_finish: &HashSet<String>,
        envelope_id: &str,
    ) -> bool {
        self.journaled(staged_open, envelope_id) && !staged_finish.contains(envelope_id)
    }

    /// The open envelopes, oldest first, read back from their segments.
    fn list_open(&self) -> std::io::Result<Vec<OpenEnvelope>> {
        let mut entries: Vec<(&String, &OpenEntry)> = self.open.iter().collect();
        entries.sort_unstable_by_key(|(_, entry)| entry.seq);
        let mut files = HashMap::new();
        let mut open = Vec::with_capacity(entries.len());
        for (envelope_id, entry) in entries {
            // Never skipped: an entry left out here would never be finished, and would keep its
            // segment for good. Damaged text then either still parses (and is answered) or is
            // finished as unreadable by the store.
            let json = String::from_utf8(self.read_entry(&mut files, entry)?).unwrap_or_else(|error| {
                tracing::error!(%envelope_id, "Journaled envelope is not UTF-8; read with replacement characters.");
                String::from_utf8_lossy(error.as_bytes()).into_owned()
            });
            open.push(OpenEnvelope { envelope_id: envelope_id.clone(), json });
        }
        Ok(open)
    }

    /// Deletes segments from the oldest on while they are done with (module docs).
    fn delete_finished_segments(&mut self, now: i64) {
        delete_finished_segments(&self.dir, &mut self.segments, now);
    }
}

/// Deletes segments from the front of `segments` (oldest first) while nothing in them is open
/// and their claims have lapsed at `now`.
fn delete_finished_segments(dir: &Path, segments: &mut VecDeque<SegmentInfo>, now: i64) {
    while let Some(front) = segments.front() {
        if front.open > 0 || front.claims_until > now {
            return;
        }
        let path = segment_path(dir, front.number);
        if let Err(error) = std::fs::remove_file(&path) {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), %error, "Cannot delete a finished inbound log segment.");
                return;
            }
        }
        // Durable before the next one goes: were a later segment's deletion to survive a power
        // loss and an earlier one's not, the earlier one's envelopes would come back without
        // the finish records the later one held.
        if let Err(error) = File::open(dir).and_then(|dir| dir.sync_all()) {
            tracing::warn!(dir = %dir.display(), %error, "Cannot sync the inbound log's directory.");
            return;
        }
        segments.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::claims::claim_key;

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            Self(std::env::temp_dir().join(format!("yizhan-inbound-{}-{n}", std::process::id())))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SEGMENT: u64 = 4096;

    fn start(dir: &TempDir, syncs: Arc<std::sync::atomic::AtomicUsize>) -> (InboundLog, std::thread::JoinHandle<()>) {
        let sync: SyncSegment = Box::new(move |_| {
            syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        start_with(dir, sync, Arc::new(AtomicBool::new(false)), Box::new(prepare_segment), PREPARE_RETRY_AFTER)
    }

    /// A log over `dir` (scanned now) with these sync, broken flag and segment preparation.
    fn start_with(
        dir: &TempDir,
        sync: SyncSegment,
        broken: Arc<AtomicBool>,
        prepare: PrepareSegment,
        retry_after: Duration,
    ) -> (InboundLog, std::thread::JoinHandle<()>) {
        let scanned = scan(&dir.0, crate::store::now_ms(), SEGMENT).unwrap_or_else(|e| panic!("{e}"));
        InboundLog::start(
            dir.0.clone(),
            scanned,
            Vec::new(),
            SEGMENT,
            64,
            Duration::ZERO,
            Some(sync),
            broken,
            prepare,
            retry_after,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Serves `ops` as one batch and returns their answers.
    fn serve(log: &mut InboundLog, ops: Vec<LogOp>) -> Vec<Result<Logged, String>> {
        let (mut batch, mut answers) = (Vec::new(), Vec::new());
        for op in ops {
            let (reply, answer) = oneshot::channel();
            batch.push(LogJob { op, reply });
            answers.push(answer);
        }
        log.serve(&mut batch);
        answers.into_iter().map(|answer| answer.blocking_recv().unwrap_or_else(|e| panic!("{e}"))).collect()
    }

    fn accept(id: &str, ttl_ms: i64) -> LogOp {
        LogOp::Accept {
            claim: claim_key("c", id),
            envelope_id: id.to_owned(),
            envelope: format!("{{\"id\":\"{id}\",\"text\":\"{}\"}}", "字".repeat(100)),
            ttl_ms,
        }
    }

    fn finish(id: &str) -> LogOp {
        LogOp::Finish { envelope_id: id.to_owned() }
    }

    fn open_ids(log: &mut InboundLog) -> Vec<String> {
        match serve(log, vec![LogOp::Open]).pop() {
            Some(Ok(Logged::Open(open))) => open.into_iter().map(|open| open.envelope_id).collect(),
            other => panic!("{other:?}"),
        }
    }

    fn segment_count(dir: &TempDir) -> usize {
        segment_numbers(&dir.0).map_or(0, |numbers| numbers.len())
    }

    /// The jobs of one batch see what the jobs before them in it did: an accept, a second
    /// accept under its id (refused), the lookups before and after its finish, and a second
    /// finish (nothing to do).
    #[test]
    fn the_jobs_of_one_batch_see_the_accepts_and_finishes_before_them() {
        let dir = TempDir::new();
        let (mut log, _preparer) = start(&dir, Arc::default());
        let reused_id = LogOp::Accept {
            claim: claim_key("c", "another"),
            envelope_id: "a".to_owned(),
            envelope: "{}".to_owned(),
            ttl_ms: 60_000,
        };
        let is_open = || LogOp::IsOpen { envelope_id: "a".into() };
        let answers = serve(
            &mut log,
            vec![
                is_open(),
                accept("a", 60_000),
                reused_id,
                is_open(),
                accept("b", 60_000),
                finish("a"),
                is_open(),
                finish("a"),
            ],
        );
        assert!(matches!(answers[0], Ok(Logged::IsOpen(false))), "{answers:?}");
        assert!(matches!(answers[1], Ok(Logged::Accepted(Acceptance::New))), "{answers:?}");
        assert!(matches!(answers[2], Err(ref error) if error.contains("already journaled")), "{answers:?}");
        assert!(matches!(answers[3], Ok(Logged::IsOpen(true))), "{answers:?}");
        assert!(matches!(answers[4], Ok(Logged::Accepted(Acceptance::New))), "{answers:?}");
        assert!(matches!(answers[5], Ok(Logged::Finished)), "{answers:?}");
        assert!(matches!(answers[6], Ok(Logged::IsOpen(false))), "{answers:?}");
        assert!(matches!(answers[7], Ok(Logged::Finished)), "{answers:?}");
        assert_eq!(open_ids(&mut log), ["b"]);
        assert_eq!(log.active_info.open, 1);
    }

    /// An accept refused for its record (too large, or an id already open) takes no claim: a
    /// retry of that message, in the same batch or later, is not answered as a duplicate.
    #[test]
    fn an_accept_refused_for_its_record_leaves_no_claim() {
        let dir = TempDir::new();
        let (mut log, _preparer) = start(&dir, Arc::default());
        let oversized = |id: &str, claim: &str| LogOp::Accept {
            claim: claim_key("c", claim),
            envelope_id: id.to_owned(),
            envelope: "x".repeat(SEGMENT as usize),
            ttl_ms: 60_000,
        };
        let answers = serve(&mut log, vec![oversized("big", "m1"), accept("m1", 60_000)]);
        assert!(matches!(answers[0], Err(ref error) if error.contains("too large")), "{answers:?}");
        assert!(matches!(answers[1], Ok(Logged::Accepted(Acceptance::New))), "{answers:?}");
        let answers = serve(&mut log, vec![oversized("big", "m2")]);
        assert!(answers[0].is_err(), "{answers:?}");
        assert!(matches!(serve(&mut log, vec![accept("m2", 60_000)])[0], Ok(Logged::Accepted(Acceptance::New))));

        // "m1" is open: a second accept under its id, for another message, is refused...
        let reused_id = LogOp::Accept {
            claim: claim_key("c", "m3"),
            envelope_id: "m1".to_owned(),
            envelope: "{}".to_owned(),
            ttl_ms: 60_000,
        };
        let answers = serve(&mut log, vec![reused_id]);
        assert!(matches!(answers[0], Err(ref error) if error.contains("already journaled")), "{answers:?}");
        // ...and that message is new when it comes under an id of its own.
        assert!(matches!(serve(&mut log, vec![accept("m3", 60_000)])[0], Ok(Logged::Accepted(Acceptance::New))));
        // A message already taken is still a duplicate.
        assert!(matches!(serve(&mut log, vec![accept("m1", 60_000)])[0], Ok(Logged::Accepted(Acceptance::Duplicate))));
    }

    /// A run killed between a batch's write and its sync leaves records the next run reads
    /// from the page cache: the scan syncs every segment holding records before using them.
    #[test]
    fn a_restart_syncs_the_records_it_reads_before_using_them() {
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut log, preparer) = start(&dir, syncs);
        assert!(matches!(serve(&mut log, vec![accept("m1", 60_000)]).pop(), Some(Ok(_))));
        drop(log);
        let _ = preparer.join();
        let mut synced = Vec::new();
        let lock = lock_dir(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        let scanned = scan_syncing(&dir.0, crate::store::now_ms(), SEGMENT, lock, &mut |file: &File| {
            synced.push(file.metadata().map(|meta| meta.len()).unwrap_or_default());
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(scanned.is_open("m1"));
        assert_eq!(synced, [SEGMENT], "the segment holding m1, and no blank one");
    }

    #[test]
    fn segments_fill_in_turn_and_go_oldest_first_once_finished_and_their_claims_lapsed() {
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut log, preparer) = start(&dir, Arc::clone(&syncs));
        // Claims that lapse at once, so that only open entries keep segments.
        let ids: Vec<String> = (0..30).map(|i| format!("e{i}")).collect();
        for id in &ids {
            assert!(matches!(serve(&mut log, vec![accept(id, 0)])[..], [Ok(Logged::Accepted(Acceptance::New))]));
        }
        // Counted in the log, not on disk, where the preparer's spare may or may not exist yet.
        let in_use = |log: &InboundLog| log.segments.len() + 1;
        assert!(in_use(&log) >= 3, "{} segments", in_use(&log));
        assert_eq!(syncs.load(Ordering::SeqCst), 30, "one sync per batch");
        assert_eq!(open_ids(&mut log), ids);

        // Everything but e0 finished: e0 holds its segment, and with it every later one (for an
        // hour past its claim, see `carry_forward_stuck`).
        let finishes = ids[1..].iter().map(|id| finish(id)).collect();
        serve(&mut log, finishes);
        log.last_housekeeping = Instant::now() - HOUSEKEEPING_EVERY;
        serve(&mut log, vec![LogOp::Open]);
        let kept = in_use(&log);
        assert!(kept >= 3, "{kept} segments");
        assert!(segment_count(&dir) >= kept, "a segment in use is on disk");
        assert_eq!(open_ids(&mut log), ["e0"]);

        serve(&mut log, vec![finish("e0")]);
        log.last_housekeeping = Instant::now() - HOUSEKEEPING_EVERY;
        serve(&mut log, vec![LogOp::Open]);
        // The one being written stays, and the spare the preparer made ahead.
        assert!(segment_count(&dir) <= 2, "{} segments", segment_count(&dir));
        drop(log);
        let _ = preparer.join();
    }

    #[test]
    fn a_live_claim_keeps_its_finished_segment() {
        let dir = TempDir::new();
        let (mut log, preparer) = start(&dir, Arc::new(std::sync::atomic::AtomicUsize::new(0)));
        serve(&mut log, vec![accept("kept", 3_600_000)]);
        for i in 0..20 {
            serve(&mut log, vec![accept(&format!("e{i}"), 0)]);
        }
        let mut all: Vec<LogOp> = (0..20).map(|i| finish(&format!("e{i}"))).collect();
        all.push(finish("kept"));
        serve(&mut log, all);
        log.last_housekeeping = Instant::now() - HOUSEKEEPING_EVERY;
        // By name, not by count: the preparer may add a spare at any moment.
        let oldest = segment_numbers(&dir.0).ok().and_then(|numbers| numbers.first().copied());
        serve(&mut log, vec![LogOp::Open]);
        let still_oldest = segment_numbers(&dir.0).ok().and_then(|numbers| numbers.first().copied());
        assert_eq!(still_oldest, oldest, "the first segment's claim is live");
        assert!(matches!(serve(&mut log, vec![accept("kept", 0)])[..], [Ok(Logged::Accepted(Acceptance::Duplicate))]));
        drop(log);
        let _ = preparer.join();
    }

    #[test]
    fn after_a_restart_open_entries_and_claims_come_back_and_a_torn_tail_is_not_read() {
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut log, preparer) = start(&dir, Arc::clone(&syncs));
        serve(&mut log, vec![accept("done", 3_600_000), accept("waiting", 3_600_000)]);
        serve(&mut log, vec![finish("done")]);
        let (torn_segment, torn_at) = (log.active_info.number, log.offset);
        drop(log);
        let _ = preparer.join();
        // A batch the crash tore: a record header whose payload never made it.
        let file = File::options().write(true).open(segment_path(&dir.0, torn_segment));
        let mut torn = Vec::new();
        frame(
            &mut torn,
            torn_segment,
            &accept_payload(9, &claim_key("c", "torn"), i64::MAX, "torn", b"{}").unwrap_or_default(),
        );
        torn.truncate(torn.len() - 3);
        file.and_then(|file| file.write_all_at(&torn, torn_at)).unwrap_or_else(|e| panic!("{e}"));

        let (mut log, preparer) = start(&dir, syncs);
        assert!(log.active_info.number > torn_segment, "a restart writes a fresh segment");
        assert_eq!(open_ids(&mut log), ["waiting"]);
        let answers = serve(&mut log, vec![accept("done", 1), accept("waiting", 1), accept("torn", 1)]);
        assert!(matches!(
            answers[..],
            [
                Ok(Logged::Accepted(Acceptance::Duplicate)),
                Ok(Logged::Accepted(Acceptance::Duplicate)),
                Ok(Logged::Accepted(Acceptance::New))
            ]
        ));
        drop(log);
        let _ = preparer.join();
    }

    /// Damage to a record in the middle of a segment (a flipped bit on the disk) loses that
    /// record only: the records after it are still read, so that a finish there does not bring
    /// its message back, nor an accept there go unanswered.
    #[test]
    fn damage_in_the_middle_of_a_segment_loses_only_the_damaged_record() {
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut log, preparer) = start(&dir, Arc::clone(&syncs));
        serve(&mut log, vec![accept("first", 3_600_000)]);
        let (segment, damaged_at) = (log.active_info.number, log.offset);
        serve(&mut log, vec![accept("damaged", 3_600_000)]);
        serve(&mut log, vec![accept("after", 3_600_000), finish("first")]);
        drop(log);
        let _ = preparer.join();
        let file = File::options().read(true).write(true).open(segment_path(&dir.0, segment));
        let file = file.unwrap_or_else(|e| panic!("{e}"));
        let mut byte = [0_u8];
        let inside = damaged_at + HEADER as u64 + 3;
        file.read_exact_at(&mut byte, inside).unwrap_or_else(|e| panic!("{e}"));
        byte[0] ^= 1;
        file.write_all_at(&byte, inside).unwrap_or_else(|e| panic!("{e}"));

        let (mut log, preparer) = start(&dir, syncs);
        assert_eq!(open_ids(&mut log), ["after"]);
        drop(log);
        let _ = preparer.join();
    }

    /// The search past damage is bounded (garbage of plausible lengths would otherwise cost a CRC
    /// over most of the segment at each position), and takes a record only if another record,
    /// or the zeros after the last, follow it.
    #[test]
    fn the_search_past_damage_is_bounded_and_wants_a_record_confirmed() {
        // Every fourth position a length of 1,000 bytes, as an array of small integers would be.
        let garbage: Vec<u8> = std::iter::repeat_n(1_000_u32.to_le_bytes(), 1 << 14).flatten().collect();
        let mut budget = 1 << 18;
        assert_eq!(next_readable_record(&garbage, 0, 3, &mut budget), None);
        assert_eq!(budget, 0, "spent, and the search ended there");
        let framed = |after: &[u8]| {
            let mut buf = vec![0xEE; 64];
            frame(&mut buf, 3, &finish_payload("e1"));
            buf.extend_from_slice(after);
            buf
        };
        let mut unbounded = usize::MAX;
        assert_eq!(next_readable_record(&framed(&[0; 16]), 0, 3, &mut unbounded), Some(64));
        assert_eq!(next_readable_record(&framed(&[0xEE; 16]), 0, 3, &mut unbounded), None, "garbage after it");
    }

    /// A record that passed its CRC but whose envelope is not UTF-8 (written by something else)
    /// is still listed, so that the store can answer or finish it.
    #[test]
    fn an_open_envelope_that_is_not_utf8_is_still_listed() {
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (log, preparer) = start(&dir, Arc::clone(&syncs));
        let (segment, at) = (log.active_info.number, log.offset);
        drop(log);
        let _ = preparer.join();
        let mut record = Vec::new();
        let payload = accept_payload(9, &claim_key("c", "bad"), i64::MAX, "bad", b"{\"text\":\"\xff\"}");
        frame(&mut record, segment, &payload.unwrap_or_default());
        let file = File::options().write(true).open(segment_path(&dir.0, segment));
        file.and_then(|file| file.write_all_at(&record, at)).unwrap_or_else(|e| panic!("{e}"));
        let (mut log, preparer) = start(&dir, syncs);
        let open = open_envelopes(&mut log);
        assert_eq!(open.len(), 1);
        assert_eq!((open[0].envelope_id.as_str(), open[0].json.as_str()), ("bad", "{\"text\":\"\u{fffd}\"}"));
        drop(log);
        let _ = preparer.join();
    }

    #[test]
    fn a_restart_deletes_finished_segments_before_asking_for_a_fresh_one() {
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut log, preparer) = start(&dir, Arc::clone(&syncs));
        let (done, kept) = (log.active_info.number, "kept");
        serve(&mut log, vec![accept("done", 1_000), accept(kept, 3_600_000)]);
        serve(&mut log, vec![finish("done")]);
        drop(log);
        let _ = preparer.join();
        let later = crate::store::now_ms() + 10_000;

        // `kept` is still open: its segment stays.
        let scanned = scan(&dir.0, later, SEGMENT).unwrap_or_else(|e| panic!("{e}"));
        assert!(segment_path(&dir.0, done).exists());
        drop(scanned);

        let (mut log, preparer) = start(&dir, Arc::clone(&syncs));
        serve(&mut log, vec![finish(kept)]);
        drop(log);
        let _ = preparer.join();
        // Now all of it is finished and the claims have lapsed: gone before any new segment.
        let scanned = scan(&dir.0, later + 3_600_000, SEGMENT).unwrap_or_else(|e| panic!("{e}"));
        assert!(!segment_path(&dir.0, done).exists());
        assert!(scanned.segments.iter().all(|info| info.number != done));
        assert!(scanned.open.is_empty());
    }

    /// Names `u64::from_str_radix` would take but `segment_path` never makes are someone
    /// else's files: left alone, not opened under another name or counted twice.
    #[test]
    fn files_named_almost_like_segments_are_left_alone() {
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut log, preparer) = start(&dir, Arc::clone(&syncs));
        serve(&mut log, vec![accept("kept", 3_600_000)]);
        let first = log.active_info.number;
        drop(log);
        let _ = preparer.join();
        // Read as the segment's own number, one of them, and as one with no file of its name.
        let foreign = [format!("+{first:015x}.log"), "00000000000000AB.log".to_owned()];
        for name in &foreign {
            std::fs::write(dir.0.join(name), b"not a segment").unwrap_or_else(|e| panic!("{e}"));
        }
        let (mut log, preparer) = start(&dir, Arc::clone(&syncs));
        assert_eq!(open_ids(&mut log), ["kept"]);
        drop(log);
        let _ = preparer.join();
        for name in &foreign {
            assert!(dir.0.join(name).exists(), "{name}");
        }
    }

    /// The open envelopes with their JSON.
    fn open_envelopes(log: &mut InboundLog) -> Vec<OpenEnvelope> {
        match serve(log, vec![LogOp::Open]).pop() {
            Some(Ok(Logged::Open(open))) => open,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_envelope_open_past_its_claims_is_carried_forward_and_its_segment_freed() {
        const TTL: i64 = 60_000;
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut log, preparer) = start(&dir, Arc::clone(&syncs));
        let first = log.active_info.number;
        // Two stuck envelopes whose ids sort against their arrival order, then one that came
        // later and is still within its dedupe window (its claim keeps its own segment).
        serve(&mut log, vec![accept("zz-stuck", TTL), accept("aa-stuck", TTL)]);
        for i in 0..30 {
            let id = format!("f{i}");
            serve(&mut log, vec![accept(&id, TTL)]);
            serve(&mut log, vec![finish(&id)]);
        }
        serve(&mut log, vec![accept("late", 100 * CARRY_FORWARD_AFTER_MS)]);
        let late_segment = log.active_info.number;
        for i in 30..60 {
            let id = format!("f{i}");
            serve(&mut log, vec![accept(&id, TTL)]);
            serve(&mut log, vec![finish(&id)]);
        }
        assert!(log.active_info.number > late_segment, "the copies go where no live claim is");
        let original = open_envelopes(&mut log);
        let ids: Vec<&str> = original.iter().map(|open| open.envelope_id.as_str()).collect();
        assert_eq!(ids, ["zz-stuck", "aa-stuck", "late"]);
        assert!(log.segments.len() >= 2, "rotated: {:?}", log.segments);
        let lapsed = crate::store::now_ms() + 2 * TTL;
        let later = lapsed + CARRY_FORWARD_AFTER_MS;

        // Everything else in the first segment is done and every claim has lapsed, yet the
        // open envelopes keep it, and with it every later segment; for an hour, as they may
        // still be on their way.
        log.delete_finished_segments(lapsed);
        log.carry_forward_stuck(lapsed);
        log.delete_finished_segments(lapsed);
        assert!(segment_path(&dir.0, first).exists());
        let synced = syncs.load(Ordering::SeqCst);
        log.carry_forward_stuck(later);
        assert!(syncs.load(Ordering::SeqCst) > synced, "the copies are synced before anything goes");
        assert_eq!(open_envelopes(&mut log), original, "same envelopes, same order");
        // The copies keep their segment for an hour from the carry, as a claim would.
        assert_eq!(log.open.get("zz-stuck").map(|entry| entry.segment), Some(log.active_info.number));
        assert!(log.active_info.claims_until >= later);
        // A crash here, before the deletion: the restart keeps the later copies, once each.
        drop(log);
        let _ = preparer.join();
        let scanned = scan(&dir.0, later, SEGMENT).unwrap_or_else(|e| panic!("{e}"));
        assert!(!segment_path(&dir.0, first).exists(), "the originals' segment went at the scan");
        assert_eq!(scanned.segments.iter().map(|info| info.open).sum::<usize>(), 3);
        let copies = scanned.open.get("aa-stuck").map(|entry| entry.segment);
        let copies = scanned.segments.iter().find(|info| Some(info.number) == copies);
        assert!(copies.is_some_and(|info| info.claims_until >= later), "{copies:?}");
        drop(scanned);

        let (mut log, preparer) = start(&dir, Arc::clone(&syncs));
        assert_eq!(open_envelopes(&mut log), original);
        for id in ["zz-stuck", "aa-stuck", "late"] {
            serve(&mut log, vec![finish(id)]);
        }
        assert!(open_envelopes(&mut log).is_empty());
        drop(log);
        let _ = preparer.join();
        let (mut log, preparer) = start(&dir, syncs);
        assert!(open_envelopes(&mut log).is_empty());
        drop(log);
        let _ = preparer.join();
    }

    #[test]
    fn a_record_with_the_last_seq_refuses_later_accepts_instead_of_wrapping() {
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (log, preparer) = start(&dir, Arc::clone(&syncs));
        let segment = log.active_info.number;
        drop(log);
        let _ = preparer.join();
        // A foreign or damaged segment whose (valid) record carries the largest seq there is.
        let mut record = Vec::new();
        let payload = accept_payload(u64::MAX, &claim_key("c", "last"), i64::MAX, "last", b"{}");
        frame(&mut record, segment, &payload.unwrap_or_default());
        let file = File::options().write(true).open(segment_path(&dir.0, segment));
        file.and_then(|file| file.write_all_at(&record, 0)).unwrap_or_else(|e| panic!("{e}"));

        let (mut log, preparer) = start(&dir, syncs);
        assert_eq!(open_ids(&mut log), ["last"]);
        let answers = serve(&mut log, vec![accept("next", 1)]);
        assert!(matches!(&answers[..], [Err(error)] if error.contains("exhausted")), "{answers:?}");
        assert_eq!(open_ids(&mut log), ["last"], "nothing journaled under a reused seq");
        drop(log);
        let _ = preparer.join();
    }

    #[test]
    fn restarts_reuse_the_unwritten_spare_instead_of_piling_up_segments() {
        let dir = TempDir::new();
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut log, preparer) = start(&dir, Arc::clone(&syncs));
        serve(&mut log, vec![accept("waiting", 3_600_000)]);
        let mut active = log.active_info.number;
        drop(log);
        let _ = preparer.join();
        for _ in 0..5 {
            let (log, preparer) = start(&dir, Arc::clone(&syncs));
            // The spare prepared right after the last active segment, not a newly made one.
            assert_eq!(log.active_info.number, active + 1);
            active = log.active_info.number;
            drop(log);
            let _ = preparer.join();
        }
        // The written segment, the active one and the spare.
        assert!(segment_count(&dir) <= 3, "{} segments", segment_count(&dir));
        let (mut log, preparer) = start(&dir, syncs);
        assert_eq!(open_ids(&mut log), ["waiting"]);
        drop(log);
        let _ = preparer.join();
    }

    #[test]
    fn a_second_process_cannot_open_a_log_in_use() {
        let dir = TempDir::new();
        let (log, preparer) = start(&dir, Arc::new(std::sync::atomic::AtomicUsize::new(0)));
        let second = scan(&dir.0, crate::store::now_ms(), SEGMENT).map(|_| ()).err().map(|e| e.to_string());
        assert!(second.as_deref().is_some_and(|e| e.contains("in use")), "{second:?}");
        drop(log);
        let _ = preparer.join();
        assert!(scan(&dir.0, crate::store::now_ms(), SEGMENT).is_ok(), "free again once the first is gone");
    }

    #[test]
    fn a_failed_sync_fails_the_batch_and_every_later_one() {
        let dir = TempDir::new();
        let broken = Arc::new(AtomicBool::new(false));
        let sync: SyncSegment = Box::new(|_| Err(std::io::Error::other("injected EIO")));
        let (mut log, preparer) =
            start_with(&dir, sync, Arc::clone(&broken), Box::new(prepare_segment), PREPARE_RETRY_AFTER);
        let answers = serve(&mut log, vec![accept("m1", 1000)]);
        assert!(matches!(&answers[..], [Err(e)] if e.contains("injected EIO")), "{answers:?}");
        assert!(broken.load(Ordering::SeqCst));
        // The claim went with the batch, and nothing more is written.
        let answers = serve(&mut log, vec![accept("m1", 1000)]);
        assert!(matches!(&answers[..], [Err(e)] if e.contains("restart yizhan")), "{answers:?}");
        drop(log);
        let _ = preparer.join();
    }

    /// A full disk: the preparer fails from its third segment on until the disk has room.
    /// A batch that rotates into the second segment and then needs a third keeps what fits and
    /// has only the rest refused; the log is not broken. Finishes still fit (the end of each
    /// segment is theirs), and the segments they free are deleted meanwhile, so that the
    /// preparer finds room. Once a segment can be made again the platform's retries are taken.
    #[test]
    fn a_segment_that_cannot_be_prepared_refuses_only_what_needs_it_and_the_log_goes_on() {
        let dir = TempDir::new();
        let broken = Arc::new(AtomicBool::new(false));
        let (calls, healed) = (Arc::new(std::sync::atomic::AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (counted, room) = (Arc::clone(&calls), Arc::clone(&healed));
        let prepare: PrepareSegment = Box::new(move |dir: &Path, number, bytes| {
            if counted.fetch_add(1, Ordering::SeqCst) >= 2 && !room.load(Ordering::SeqCst) {
                std::fs::write(segment_path(dir, number), b"half")?;
                return Err(std::io::Error::other("injected ENOSPC"));
            }
            prepare_segment(dir, number, bytes)
        });
        let sync: SyncSegment = Box::new(|_| Ok(()));
        let (mut log, preparer) = start_with(&dir, sync, Arc::clone(&broken), prepare, Duration::from_millis(1));
        // One accept at a time until the next one would not fit the first segment (claims that
        // lapse at once, so that the segment can go once its envelopes are finished).
        let record = |id: &str| match accept(id, 0) {
            LogOp::Accept { claim, envelope_id, envelope, .. } => {
                HEADER
                    + accept_payload(0, &claim, 0, &envelope_id, envelope.as_bytes()).map_or(0, |payload| payload.len())
            }
            _ => 0,
        };
        let envelope_room = SEGMENT - SEGMENT / FINISH_RESERVE_DIVISOR;
        let mut first_segment: Vec<String> = Vec::new();
        while log.offset + (record("m00") as u64) <= envelope_room {
            let id = format!("m{:02}", first_segment.len());
            let answers = serve(&mut log, vec![accept(&id, 0)]);
            assert!(matches!(answers.as_slice(), [Ok(Logged::Accepted(Acceptance::New))]), "{answers:?}");
            first_segment.push(id);
        }
        let first = log.active_info.number;
        // Rotates into the second segment at once, fills it, and needs a third.
        let mut ops: Vec<LogOp> = (0..30).map(|n| accept(&format!("r{n:02}"), 60_000)).collect();
        ops.push(LogOp::IsOpen { envelope_id: "m00".into() });
        let answers = serve(&mut log, ops);
        assert_ne!(log.active_info.number, first, "the batch did not rotate");
        let taken = answers[..30].iter().take_while(|answer| matches!(answer, Ok(Logged::Accepted(_)))).count();
        assert!(taken > 0, "{answers:?}");
        assert!(
            answers[taken..30].iter().all(|answer| matches!(answer, Err(e) if e.contains("injected ENOSPC"))),
            "{answers:?}"
        );
        assert!(matches!(answers[30], Ok(Logged::IsOpen(true))), "{:?}", answers[30]);
        assert!(!broken.load(Ordering::SeqCst));
        let mut accepted: Vec<String> = (0..taken).map(|n| format!("r{n:02}")).collect();
        assert_eq!(log.active_info.open, taken);
        // Still no segment: the first segment's envelopes are finished all the same (into the
        // second one's end), and the first segment is deleted.
        let finishes = first_segment.iter().map(|id| finish(id)).collect();
        let answers = serve(&mut log, finishes);
        assert!(answers.iter().all(|answer| matches!(answer, Ok(Logged::Finished))), "{answers:?}");
        log.last_housekeeping = Instant::now() - HOUSEKEEPING_EVERY;
        let answers = serve(&mut log, vec![accept("r29", 60_000)]);
        assert!(matches!(&answers[..], [Err(e)] if e.contains("injected ENOSPC")), "{answers:?}");
        assert!(!segment_path(&dir.0, first).exists(), "the finished segment is still there");
        // The disk has room again: the platform's retries are new (refused, they took no
        // claim) and taken once the preparer's next try made a segment.
        healed.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for n in taken..30 {
            let id = format!("r{n:02}");
            loop {
                match serve(&mut log, vec![accept(&id, 60_000)]).as_slice() {
                    [Ok(Logged::Accepted(Acceptance::New))] => break,
                    [Err(error)] if error.contains("injected ENOSPC") => {
                        assert!(std::time::Instant::now() < deadline, "the preparer never recovered");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    other => panic!("{other:?}"),
                }
            }
            accepted.push(id);
        }
        assert_eq!(open_ids(&mut log), accepted);
        assert!(calls.load(Ordering::SeqCst) >= 4 && !broken.load(Ordering::SeqCst));
        drop(log);
        let _ = preparer.join();
        let scanned = scan(&dir.0, crate::store::now_ms(), SEGMENT).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(scanned.open_count(), accepted.len());
    }

    #[test]
    fn records_read_back_and_a_wrong_segment_number_or_a_flipped_bit_ends_the_segment() {
        let claim = [7u8; 16];
        let mut buf = Vec::new();
        let accept = accept_payload(5, &claim, 99, "e1", b"{\"x\":1}").unwrap_or_default();
        frame(&mut buf, 3, &accept);
        let second = buf.len();
        frame(&mut buf, 3, &finish_payload("e1"));
        let end = buf.len();
        buf.extend_from_slice(&[0; 16]);

        let (record, next) = read_record(&buf, 0, 3).unwrap_or_else(|| panic!("accept not read"));
        let Record::Accept { seq, claim: read_claim, expires_at, envelope_id, envelope_at, envelope_len } = record
        else {
            panic!("not an accept")
        };
        assert_eq!((seq, read_claim, expires_at, envelope_id), (5, claim, 99, "e1"));
        assert_eq!(&buf[envelope_at..envelope_at + envelope_len], b"{\"x\":1}");
        assert_eq!(next, second);
        assert_eq!(read_record(&buf, second, 3), Some((Record::Finish { envelope_id: "e1" }, end)));
        assert!(read_record(&buf, end, 3).is_none(), "zeros end the segment");
        assert!(read_record(&buf, 0, 4).is_none(), "a record of another segment number is not one");
        let mut flipped = buf.clone();
        flipped[HEADER + 3] ^= 1;
        assert!(read_record(&flipped, 0, 3).is_none());
        assert!(read_record(&buf[..second - 1], 0, 3).is_none(), "a torn record is not one");
    }
}
