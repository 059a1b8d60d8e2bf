//! Answers carried in the platform's own webhook response (WeChat's passive reply), and answers
//! parked until the user writes again.
//!
//! WeChat waits 5 s for the HTTP answer to a message, then retries the same MsgId twice (about
//! 15 s in all). A passive reply costs no API quota and needs no customer-service permission, so
//! in `auto` and `passive` mode every attempt is held open while the answer is produced:
//! - attempts 1 and 2 wait for the answer until shortly before their deadline (the margin), then
//!   are held open past it and left to lapse (answering anything, even `success`, would end
//!   WeChat's retries; and an answer taken after the deadline could be written to a connection
//!   WeChat has given up on, so it waits in the job for the next attempt instead);
//! - attempt 3 waits until shortly before its deadline, then answers `success` (or with the
//!   user's oldest parked answer, see `reply_with_parked`); the answer then goes out through
//!   the send API (`auto`) or is parked (`passive`). An attempt that begins already past that
//!   point (after a slow read or journal write) takes nothing; the last one then answers
//!   `success`, leaves parked text parked, and the answer is pushed. So is an answer the last
//!   attempt takes after WeChat closed its connection (the request queued before its handler
//!   began; actix-web runs the handler on).
//!
//! All attempts share one job (one LLM call). An answer that became ready between attempts waits
//! in the job for the next attempt, and is pushed if no attempt comes for it. Either way its
//! session waits until it has left, the rest of a long answer included ([`AnswerGone`]), before
//! it starts on the user's next message.
//!
//! Parked answers (the send API refused: no permission, outside the 48-hour window, out of
//! quota) go out passively with the user's next message, or when they send the continue word.
//!
//! A passive reply written near the deadline can still reach WeChat too late (the request
//! queued before the handler ran, the network is slow), and WeChat then drops it and retries.
//! Since WeChat retries only a request it got no answer to in time, a retry of a message
//! already answered passively proves that reply was lost: it gets the same reply again
//! ([`PassiveSlots::reply_again`]) instead of `success`, which would end the retries with the
//! start of the answer gone. In `auto` mode the rest of a long answer went out through the send
//! API when the first reply was written, so the start then arrives after it: late, but shown.

use crate::store::{ParkedUser, Store};
use dashmap::DashMap;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use yizhan_channel_core::{ChannelId, Delivery, Envelope};

type Hasher = foldhash::fast::RandomState;

/// Resolves once `done` holds, checking it again each time `notify` wakes its waiters
/// (`notify_waiters`): registered before each check, so a wake-up in between is not missed.
async fn notified_until(notify: &Notify, done: impl Fn() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}

/// Locks `mutex`, whose data stays consistent even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many times WeChat sends one message (the first try and two retries) before it gives up.
pub const PASSIVE_ATTEMPTS: u32 = 3;

/// How long after a message reached Yizhan a platform retry of it may still come, for a
/// platform that tries again each `window`: a window per attempt, and one more for clocks and
/// the network (20 s for WeChat).
pub fn retries_span(window: Duration) -> Duration {
    window.saturating_mul(PASSIVE_ATTEMPTS + 1)
}

/// What the next attempt should do when the answer is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    /// Wait the whole window and let the attempt lapse if not ready.
    Lapse,
    /// Wait until the margin before the deadline, then answer `success`.
    Last,
}

#[derive(Debug, Default)]
struct JobState {
    /// The answer, once produced and not yet taken.
    parts: Option<HeldAnswer>,
    /// No attempt will come any more: hand the answer to the send path.
    push: bool,
    /// Attempts seen (WeChat sends up to three).
    attempts: u32,
    /// Attempts waiting in [`PassiveJob::take`] now.
    waiting: u32,
    /// The server is about to close its connections: attempts stop waiting at once.
    stop_waiting: bool,
}

/// Counts an attempt as waiting for as long as it lives (a dropped handler included).
struct Waiting<'a>(&'a PassiveJob);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.waiting = state.waiting.saturating_sub(1);
    }
}

/// One message whose answer may leave through a webhook response.
#[derive(Debug)]
pub struct PassiveJob {
    state: Mutex<JobState>,
    ready: Notify,
    /// The envelope journaled for the message. A platform retry parses into an envelope of its
    /// own, with a fresh id that was never journaled: whichever attempt takes the answer must
    /// finish and send as this one.
    envelope: Envelope,
    /// When the message reached Yizhan, on the monotonic clock: its age is read from the wall
    /// clock once, as the job opens, so that a clock step later does not move when retries end.
    received: tokio::time::Instant,
}

/// What happened to an answer offered to its job.
#[derive(Debug)]
pub enum Offer {
    /// Parked in the job for an attempt to take; resolves once whoever took it is done with it.
    Held(AnswerGone),
    /// No attempt will take it: send it the normal way.
    Push(Vec<Delivery>),
}

/// An answer held in a job for an attempt, the fallback timer or shutdown to take.
#[derive(Debug)]
pub struct HeldAnswer {
    pub parts: Vec<Delivery>,
    /// Kept by whoever takes the answer until it has left (sent, parked or left pending):
    /// dropping it lets the session that offered the answer go on to its next turn.
    pub gone: GoneSignal,
}

/// See [`HeldAnswer::gone`].
#[derive(Debug)]
pub struct GoneSignal {
    _sender: oneshot::Sender<()>,
}

/// Resolves once a held answer's [`GoneSignal`] is dropped. The session awaits it: the next
/// turn's answer (an instant one, or one a still-open attempt of its own carries) would
/// otherwise reach the user before this one, whose attempt or send-API rest comes later.
#[derive(Debug)]
pub struct AnswerGone(oneshot::Receiver<()>);

impl AnswerGone {
    /// Waits until the answer has left.
    pub async fn wait(self) {
        // Only ever dropped, never sent: the error is the signal.
        let _ = self.0.await;
    }
}

impl PassiveJob {
    /// A job for `envelope`'s answer, with no attempt seen yet.
    pub fn new(envelope: Envelope) -> Self {
        let now = tokio::time::Instant::now();
        let age_ms =
            yizhan_channel_common::unix_millis(std::time::SystemTime::now()).saturating_sub(envelope.received_at_ms);
        // A message from the future (the clock stepped back) is taken as just received.
        let age = Duration::from_millis(u64::try_from(age_ms).unwrap_or(0));
        let received = now.checked_sub(age).unwrap_or(now);
        Self { state: Mutex::default(), ready: Notify::new(), envelope, received }
    }

    /// How long until no platform retry of the message can come any more, for a platform that
    /// tries again each `window` (see [`retries_span`]).
    pub fn retries_over_in(&self, window: Duration) -> Duration {
        let now = tokio::time::Instant::now();
        self.received
            .checked_add(retries_span(window))
            .map_or(Duration::MAX, |over| over.saturating_duration_since(now))
    }

    /// The envelope journaled for the message (not a retry's).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts `count` attempts made before this job existed (a message resumed after a restart:
    /// the platform's next try may be its last, and must answer rather than lapse).
    pub fn assume_earlier_attempts(&self, count: u32) {
        let mut state = self.lock();
        state.attempts = state.attempts.max(count);
    }

    /// Counts an attempt and says how it should wait, with its number (for [`Self::take`]). An
    /// earlier attempt still waiting stops: the platform sends a retry only once it has given
    /// up on the attempt before. `unseen`: how many attempts came before this one by the
    /// message's age, counted if this is the first the job sees (in the same step, so that two
    /// attempts beginning at once do not both count them).
    pub fn begin_attempt(&self, max_attempts: u32, unseen: Option<u32>) -> (AttemptKind, u32) {
        let mut state = self.lock();
        if state.attempts == 0 {
            state.attempts = unseen.unwrap_or(0);
        }
        state.attempts += 1;
        let number = state.attempts;
        let kind = if number >= max_attempts { AttemptKind::Last } else { AttemptKind::Lapse };
        drop(state);
        self.ready.notify_waiters();
        (kind, number)
    }

    /// Sleeps for `wait`, or until [`PassiveSlots::stop_waiting`]: an attempt held open past
    /// the platform's deadline must still answer before the connections close.
    pub async fn sleep_unless_stopped(&self, wait: Duration) {
        self.wait_for(wait, |state| state.stop_waiting.then_some(())).await;
    }

    /// Waits up to `wait` until `decide` (asked at once and at every change to the job) says
    /// what to return; `None` if it never did.
    async fn wait_for<R>(&self, wait: Duration, mut decide: impl FnMut(&mut JobState) -> Option<R>) -> Option<R> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Registered before asking, so a change in between is not missed.
            notified.as_mut().enable();
            if let Some(decided) = decide(&mut self.lock()) {
                return Some(decided);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Attempts counted so far, those estimated from the message's age included (see
    /// [`Self::begin_attempt`]).
    pub fn attempts_seen(&self) -> u32 {
        self.lock().attempts
    }

    /// Waits up to `wait` for the answer, for attempt number `this_attempt` (from
    /// [`Self::begin_attempt`]); takes it if it arrives. Once a later attempt begins, this one
    /// stops waiting (returns `None`), so the answer goes to the attempt the platform still
    /// listens to, not to a connection it gave up on (a handler that began late, behind a
    /// queue, outlives its client).
    pub async fn take(&self, this_attempt: u32, wait: Duration) -> Option<HeldAnswer> {
        self.lock().waiting += 1;
        let _waiting = Waiting(self);
        self.wait_for(wait, |state| {
            if state.attempts > this_attempt {
                return Some(None);
            }
            if let Some(parts) = state.parts.take() {
                return Some(Some(parts));
            }
            state.stop_waiting.then_some(None)
        })
        .await
        .flatten()
    }

    /// No attempt will take the answer any more (the last one gave up, or the fallback timer
    /// ran out): the answer if it is here, and any later one is to be pushed.
    pub fn give_up(&self) -> Option<HeldAnswer> {
        let mut state = self.lock();
        state.push = true;
        state.parts.take()
    }

    /// Hands the produced answer to the job.
    pub fn offer(&self, parts: Vec<Delivery>) -> Offer {
        let mut state = self.lock();
        if state.push {
            return Offer::Push(parts);
        }
        let (sender, receiver) = oneshot::channel();
        state.parts = Some(HeldAnswer { parts, gone: GoneSignal { _sender: sender } });
        drop(state);
        self.ready.notify_waiters();
        Offer::Held(AnswerGone(receiver))
    }

    /// [`offer`](Self::offer) once the server takes no new connections, so that no platform
    /// retry can come: held only for an attempt waiting now, else to be pushed.
    pub fn offer_while_closing(&self, parts: Vec<Delivery>) -> Offer {
        let mut state = self.lock();
        if state.waiting == 0 {
            state.push = true;
        }
        drop(state);
        self.offer(parts)
    }

    /// At shutdown: unless an attempt waits now, no attempt will come; the answer held for one,
    /// if any, is returned to be pushed, and a later one will be pushed too.
    fn release_unwatched(&self) -> Option<HeldAnswer> {
        let mut state = self.lock();
        if state.waiting > 0 {
            return None;
        }
        state.push = true;
        state.parts.take()
    }
}

/// Jobs by (channel, platform message id), and parked answers by (channel, user).
#[derive(Debug, Default)]
pub struct PassiveSlots {
    jobs: DashMap<(ChannelId, String), Arc<PassiveJob>, Hasher>,
    parked: DashMap<(ChannelId, String), Parked, Hasher>,
    /// Set at shutdown, once no new connection (so no platform retry) can come in.
    closing: std::sync::atomic::AtomicBool,
    /// Set by [`PassiveSlots::stop_waiting`]: jobs opened later do not wait either.
    stopping: std::sync::atomic::AtomicBool,
    /// Woken by [`PassiveSlots::stop_waiting`], for attempts whose job left the map meanwhile.
    stop_notify: Notify,
    /// Messages answered with parked text (the continue word), to the answer that text came
    /// from: what of it is parked again keeps that answer's place in the queue.
    continuing: DashMap<String, String, Hasher>,
    /// Passive replies given in the last [`REPLIED_FOR`], by (channel, platform message id).
    replied: DashMap<(ChannelId, String), Replied, Hasher>,
    /// When `replied` is next swept of old replies.
    replied_sweeps: Mutex<yizhan_channel_common::SweepClock>,
    /// The parked texts' lengths, summed over every user (see [`MAX_PARKED_BYTES`]).
    parked_bytes: std::sync::atomic::AtomicUsize,
    /// Answers whose start is still being sent while their end, beyond the send quota, is
    /// parked already (by the id the text is parked under): that end must not be shown first.
    leaving: DashMap<String, String, Hasher>,
    /// Users whose parked answers changed since they were last saved (see
    /// [`PassiveSlots::save_parked`]).
    unsaved: Mutex<Unsaved>,
    /// Woken when a user's parked answers change.
    unsaved_notify: Notify,
    /// The number of the last batch of changes saved (or given up on).
    saved: AtomicU64,
    /// Woken when a batch was saved.
    saved_notify: Notify,
    /// Messages whose answer parked text, to the batch that saves it: a message is finished
    /// only once that batch is saved (see [`PassiveSlots::parked_saved`]).
    parked_by: DashMap<String, u64, Hasher>,
    /// Held while batches are saved, so that they are saved in order.
    saving: tokio::sync::Mutex<()>,
    /// The user of each message that took parked text (the continue word) and has not
    /// finished yet (see [`Parked::taken`]).
    taken_by: DashMap<String, (ChannelId, String), Hasher>,
}

/// Changes to parked answers not saved yet.
#[derive(Debug, Default)]
struct Unsaved {
    /// Whether parked answers are saved at all (see [`PassiveSlots::keep_parked_durably`]).
    durable: bool,
    /// Users whose parked answers changed since the last batch was taken.
    users: HashSet<(ChannelId, String)>,
    /// Batches taken so far: the changes noted now go in batch `taken + 1`.
    taken: u64,
    /// Saves failed in a row.
    failures: u64,
}

/// A passive reply already given, kept for the platform's retries (see the module docs).
#[derive(Debug)]
struct Replied {
    /// The journaled envelope, without its content (the reply needs its handle and sender).
    envelope: Envelope,
    /// The reply's text, as rendered.
    text: String,
    /// When it was given.
    at: std::time::Instant,
}

/// How long a passive reply is kept for retries: WeChat's three attempts span about 15 s from
/// the first; twice that leaves room for a retry that queued.
const REPLIED_FOR: Duration = Duration::from_secs(30);

/// One user's parked answers, oldest first.
#[derive(Debug)]
struct Parked {
    texts: VecDeque<ParkedText>,
    /// Text taken by messages (the continue word) that have not finished yet, in the order
    /// taken: saved as taken until then, so that a crash neither loses it (its message not
    /// answered yet) nor shows it twice (see [`PassiveSlots::restore_taken`]). Beside the queue,
    /// under the same lock, so that a save sees it in one place or the other.
    taken: Vec<ParkedText>,
    /// When text was last parked for the user or taken by them; [`PARKED_FOR`] later, if
    /// neither happened since, the queue is dropped (see [`PassiveSlots::forget_parked_before`]).
    parked_at: std::time::Instant,
}

impl Parked {
    /// The user's parked answers as saved.
    fn record(&self, channel: &ChannelId, user: &str) -> ParkedRecord {
        ParkedRecord {
            channel: channel.as_str().to_owned(),
            user: user.to_owned(),
            texts: self.taken.iter().chain(&self.texts).cloned().collect(),
            age_secs: self.parked_at.elapsed().as_secs(),
        }
    }

    /// Whether nothing is parked or taken.
    fn is_empty(&self) -> bool {
        self.texts.is_empty() && self.taken.is_empty()
    }
}

impl Default for Parked {
    fn default() -> Self {
        Self { texts: VecDeque::new(), taken: Vec::new(), parked_at: std::time::Instant::now() }
    }
}

/// How long parked answers wait for their user to ask for them. Without a limit every user who
/// never came back would keep theirs for good.
pub const PARKED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// A parked text, with where it belongs and where it came from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(from = "SavedText", into = "SavedText")]
pub struct ParkedText {
    /// The message whose answer it is part of, which places it in the queue: text of that
    /// answer parked later goes behind it (empty for text put back: its place is known).
    pub place: String,
    /// The message whose answer parked it: the place's, or a message answered with parked
    /// text (the continue word) that parked the rest of that text again.
    pub source: String,
    /// The text.
    pub text: String,
    /// As saved only: the message answering with this text (the continue word), which has not
    /// finished yet (empty: parked). See [`PassiveSlots::restore_taken`].
    pub taken_by: String,
}

impl ParkedText {
    /// Text of `id`'s own answer.
    pub fn of(id: &str, text: &str) -> Self {
        Self { place: id.to_owned(), source: id.to_owned(), text: text.to_owned(), taken_by: String::new() }
    }
}

/// A [`ParkedText`] as saved: `[place, source, text]`, with `taken_by` fourth when set, or
/// `[place, text]` as earlier versions saved it (its source the place).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum SavedText {
    Taken(String, String, String, String),
    Triple(String, String, String),
    Pair(String, String),
}

impl From<SavedText> for ParkedText {
    fn from(saved: SavedText) -> Self {
        match saved {
            SavedText::Taken(place, source, text, taken_by) => Self { place, source, text, taken_by },
            SavedText::Triple(place, source, text) => Self { place, source, text, taken_by: String::new() },
            SavedText::Pair(place, text) => Self { source: place.clone(), place, text, taken_by: String::new() },
        }
    }
}

impl From<ParkedText> for SavedText {
    fn from(parked: ParkedText) -> Self {
        if parked.taken_by.is_empty() {
            SavedText::Triple(parked.place, parked.source, parked.text)
        } else {
            SavedText::Taken(parked.place, parked.source, parked.text, parked.taken_by)
        }
    }
}

/// One user's parked answers as saved in the store (see [`PassiveSlots::save_parked`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ParkedRecord {
    /// The channel id.
    pub channel: String,
    /// The user's platform id.
    pub user: String,
    /// The parked texts, oldest first.
    pub texts: Vec<ParkedText>,
    /// Seconds since text was last parked for the user (for [`PARKED_FOR`]).
    pub age_secs: u64,
}

/// Parked answers kept per user at most; older ones are dropped (and logged) beyond this.
const MAX_PARKED_PER_USER: usize = 8;

/// Users with parked answers kept at most. Parked answers are held in memory and most users never
/// come back for theirs (a 公众号 in passive mode, or whose send API fails, parks every late
/// answer), so beyond this the users whose text was parked longest ago lose theirs (logged).
const MAX_PARKED_USERS: usize = 100_000;

/// Bytes of parked text kept at most, over every user: answers can be long (a model's answer
/// may take megabytes), so a bound on users alone does not bound memory. Beyond it, as beyond
/// [`MAX_PARKED_USERS`], the users whose text was parked longest ago lose theirs.
const MAX_PARKED_BYTES: usize = 256 << 20;

/// The bytes of a queue's texts.
fn bytes_of<'a>(texts: impl IntoIterator<Item = &'a ParkedText>) -> usize {
    texts.into_iter().map(|parked| parked.text.len()).sum()
}

impl PassiveSlots {
    /// Opens a job for a journaled message that will be answered.
    pub fn open(&self, envelope: &Envelope) -> Arc<PassiveJob> {
        let job = self
            .jobs
            .entry((envelope.channel.clone(), envelope.platform_message_id.clone()))
            .or_insert_with(|| Arc::new(PassiveJob::new(envelope.clone())))
            .clone();
        if self.stopping.load(Ordering::SeqCst) {
            job.lock().stop_waiting = true;
        }
        job
    }

    /// The job of a message, if it is still open.
    pub fn get(&self, channel: &ChannelId, message_id: &str) -> Option<Arc<PassiveJob>> {
        self.jobs.get(&(channel.clone(), message_id.to_owned())).map(|job| job.clone())
    }

    /// At shutdown, once the server takes no new connections: platform retries can no longer
    /// reach a held answer, so answers wait only for attempts in progress. Returns the jobs
    /// whose answers were held for a retry, with their answers, to be pushed.
    pub fn close_for_shutdown(&self) -> Vec<(Arc<PassiveJob>, HeldAnswer)> {
        self.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        let jobs: Vec<Arc<PassiveJob>> = self.jobs.iter().map(|entry| entry.value().clone()).collect();
        jobs.into_iter().filter_map(|job| job.release_unwatched().map(|parts| (job, parts))).collect()
    }

    /// At shutdown, once the wait for unanswered messages is over and the connections are
    /// about to close: attempts still waiting for an answer stop waiting and answer now (a
    /// connection closed on an attempt with no response at all would make WeChat show its
    /// error page), and so does any that begins later.
    pub fn stop_waiting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop_notify.notify_waiters();
        let jobs: Vec<Arc<PassiveJob>> = self.jobs.iter().map(|entry| entry.value().clone()).collect();
        for job in jobs {
            job.lock().stop_waiting = true;
            job.ready.notify_waiters();
        }
    }

    /// Resolves once [`Self::stop_waiting`] was called (at once if it was).
    pub async fn stopped(&self) {
        notified_until(&self.stop_notify, || self.stopping.load(Ordering::SeqCst)).await;
    }

    /// Whether [`close_for_shutdown`](Self::close_for_shutdown) was called.
    pub fn is_closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Forgets a finished job.
    pub fn close(&self, channel: &ChannelId, message_id: &str) {
        self.jobs.remove(&(channel.clone(), message_id.to_owned()));
    }

    /// Parks text of the answer to `envelope_id` for the user's next message: after what is
    /// parked already, but before later text of the same answer (the end of an answer is
    /// parked for the send quota before its start can fail to send).
    ///
    /// Text of a message answered with parked text (see [`Self::unpark_for`]) is the rest of the
    /// answer it came from, which was at the front: it goes back before that answer's later
    /// text, or to the front.
    pub fn park(&self, channel: &ChannelId, user: &str, envelope_id: &str, text: String) {
        let continued = self.continuing.get(envelope_id).map(|original| original.value().clone());
        let mut parked = self.parked.entry((channel.clone(), user.to_owned())).or_default();
        parked.parked_at = std::time::Instant::now();
        let queue = &mut parked.texts;
        let (id, otherwise) = match continued {
            Some(original) => (original, 0),
            None => (envelope_id.to_owned(), queue.len()),
        };
        let at = queue.iter().position(|queued| queued.place == id).unwrap_or(otherwise);
        self.hold_bytes(text.len());
        queue.insert(at, ParkedText { place: id, source: envelope_id.to_owned(), text, taken_by: String::new() });
        // Text put at the front (the rest of what the user is reading) is not the one to drop.
        let dropped = Self::bound(channel, queue, at == 0);
        drop(parked);
        self.release_bytes(dropped);
        if let Some(batch) = self.changed(channel, user) {
            self.parked_by.insert(envelope_id.to_owned(), batch);
        }
        self.shed_oldest_users(MAX_PARKED_USERS, MAX_PARKED_BYTES);
    }

    /// From now on every change to parked answers is saved by [`Self::save_parked`] (to a store
    /// that outlives the process), and a message that parked text is finished only once it is
    /// saved ([`Self::parked_saved`]): `kill -9` then loses no parked answer.
    pub fn keep_parked_durably(&self) {
        lock(&self.unsaved).durable = true;
    }

    /// Notes that a user's parked answers changed; returns the batch that will save the change
    /// (`None` when nothing is saved).
    fn changed(&self, channel: &ChannelId, user: &str) -> Option<u64> {
        let mut unsaved = lock(&self.unsaved);
        if !unsaved.durable {
            return None;
        }
        unsaved.users.insert((channel.clone(), user.to_owned()));
        let batch = unsaved.taken + 1;
        drop(unsaved);
        self.unsaved_notify.notify_one();
        Some(batch)
    }

    /// Resolves when parked answers changed since the last [`Self::save_parked`] (at once if
    /// they did).
    pub async fn unsaved_changes(&self) {
        self.unsaved_notify.notified().await;
    }

    /// Saves the parked answers of every user whose answers changed, in batches, in order;
    /// `false` if a batch failed (its users are saved again with the next one).
    pub async fn save_parked(&self, store: &dyn Store) -> bool {
        let _in_order = self.saving.lock().await;
        loop {
            let (batch, users) = {
                let mut unsaved = lock(&self.unsaved);
                if unsaved.users.is_empty() {
                    return true;
                }
                unsaved.taken += 1;
                (unsaved.taken, std::mem::take(&mut unsaved.users))
            };
            // Read after the batch was taken: a change made meanwhile is in the next batch too.
            let mut saved = Vec::with_capacity(users.len());
            for (channel, user) in &users {
                match self.saved_record(channel, user).map(|record| serde_json::to_string(&record)).transpose() {
                    Ok(record) => {
                        saved.push(ParkedUser { channel: channel.as_str().to_owned(), user: user.clone(), record })
                    }
                    // Never happens to strings; the stored row stays as it was.
                    Err(error) => tracing::error!(%error, "Cannot encode a user's parked answers; not saved."),
                }
            }
            if let Err(error) = store.save_parked(saved).await {
                // Retried every second: said at the first failure, then once a minute.
                let failures = {
                    let mut unsaved = lock(&self.unsaved);
                    unsaved.failures += 1;
                    unsaved.failures
                };
                if failures % 60 == 1 {
                    tracing::error!(%error, failures, "Failed to save parked answers; retrying (their messages wait).");
                }
                lock(&self.unsaved).users.extend(users);
                self.unsaved_notify.notify_one();
                // Their messages wait for a later batch to save them: finished now, a crash would
                // lose the text. Unless the store refuses writes for good (until a restart,
                // which resumes those messages): then waiting would only hold their sessions.
                if store.health().is_err() {
                    self.saved.store(batch, Ordering::SeqCst);
                    self.saved_notify.notify_waiters();
                }
                return false;
            }
            lock(&self.unsaved).failures = 0;
            self.saved.store(batch, Ordering::SeqCst);
            self.saved_notify.notify_waiters();
        }
    }

    /// What is saved for a user: the text taken by messages not finished yet, then the queue.
    fn saved_record(&self, channel: &ChannelId, user: &str) -> Option<ParkedRecord> {
        let parked = self.parked.get(&(channel.clone(), user.to_owned()))?;
        (!parked.is_empty()).then(|| parked.record(channel, user))
    }

    /// Resolves text saved as taken by a message that had not finished (see
    /// [`Self::unpark_for`]): dropped if that message's answer was recorded (`Some(true)`: its
    /// parts carry the text) or it finished (`None`), parked again if it was not answered
    /// (`Some(false)`: it takes the text again). Returns whether anything was taken, and the
    /// messages whose recorded answer is text they took, each with that text's place (see
    /// [`Self::continue_in_place`]).
    pub fn restore_taken(
        record: &mut ParkedRecord,
        answered: impl Fn(&str) -> Option<bool>,
    ) -> (bool, Vec<(String, String)>) {
        let (mut had_taken, mut continuing) = (false, Vec::new());
        record.texts.retain_mut(|text| {
            if text.taken_by.is_empty() {
                return true;
            }
            had_taken = true;
            let taken_by = std::mem::take(&mut text.taken_by);
            match answered(&taken_by) {
                Some(false) => true,
                Some(true) => {
                    continuing.push((taken_by, text.place.clone()));
                    false
                }
                None => false,
            }
        });
        (had_taken, continuing)
    }

    /// Notes, after a restart, that `envelope_id` was answered with parked text of `place`: what
    /// of its answer is parked again keeps that place (see [`Self::park`]) until it finishes.
    pub fn continue_in_place(&self, envelope_id: &str, place: String) {
        self.continuing.insert(envelope_id.to_owned(), place);
    }

    /// Waits until the text `envelope_id`'s answer parked (or, answering with parked text,
    /// took: saved as taken) is saved (at once if it parked or took none, or nothing is saved).
    pub async fn parked_saved(&self, envelope_id: &str) {
        let Some((_, batch)) = self.parked_by.remove(envelope_id) else { return };
        notified_until(&self.saved_notify, || self.saved.load(Ordering::SeqCst) >= batch).await;
    }

    /// Takes the oldest parked text for a user to answer `envelope_id` (the continue word):
    /// what of it is parked again keeps its place (see [`Self::park`]) until
    /// [`Self::forget_answer`].
    ///
    /// The text is saved as taken by `envelope_id` until it finishes (see [`Parked::taken`]);
    /// wait for [`Self::parked_saved`] before recording it as that message's answer.
    pub fn unpark_for(&self, channel: &ChannelId, user: &str, envelope_id: &str) -> Option<String> {
        let key = (channel.clone(), user.to_owned());
        let taken = {
            let mut parked = self.parked.get_mut(&key)?;
            let front = parked.texts.pop_front()?;
            self.release_bytes(front.text.len());
            parked.parked_at = std::time::Instant::now();
            parked.taken.push(ParkedText { taken_by: envelope_id.to_owned(), ..front.clone() });
            front
        };
        self.taken_by.insert(envelope_id.to_owned(), key);
        self.continuing.insert(envelope_id.to_owned(), taken.place);
        if let Some(batch) = self.changed(channel, user) {
            self.parked_by.insert(envelope_id.to_owned(), batch);
        }
        Some(taken.text)
    }

    /// Whether `envelope_id` is being answered with parked text (see [`Self::unpark_for`]).
    pub fn is_continuation(&self, envelope_id: &str) -> bool {
        self.continuing.contains_key(envelope_id)
    }

    /// Forgets what [`Self::unpark_for`] and [`Self::mark_leaving`] noted for a finished message.
    pub fn forget_answer(&self, envelope_id: &str) {
        self.forget_answer_but_what_it_took(envelope_id);
        if let Some((_, key)) = self.taken_by.remove(envelope_id) {
            if let Some(mut parked) = self.parked.get_mut(&key) {
                parked.taken.retain(|text| text.taken_by != envelope_id);
            }
            self.parked.remove_if(&key, |_, parked| parked.is_empty());
            self.changed(&key.0, &key.1);
        }
    }

    /// [`Self::forget_answer`] for a message left for the next start: the parked text it took
    /// stays saved as taken, for the next start to resolve (see [`Self::restore_taken`]).
    pub fn forget_answer_but_what_it_took(&self, envelope_id: &str) {
        self.continuing.remove(envelope_id);
        self.leaving.remove(envelope_id);
        self.parked_by.remove(envelope_id);
    }

    /// Notes that `envelope_id`'s answer has parked its end while its start is still to be sent:
    /// until [`Self::forget_answer`], that end is not the oldest text to show.
    pub fn mark_leaving(&self, envelope_id: &str) {
        let parked_under = self.continuing.get(envelope_id).map_or_else(|| envelope_id.to_owned(), |id| id.clone());
        self.leaving.insert(envelope_id.to_owned(), parked_under);
    }

    /// Whether a user's oldest parked text must wait for an answer still on its way: the end
    /// of an answer whose start is still being sent, or any, while parked text taken by the
    /// continue word is (it is older).
    pub fn oldest_is_still_leaving(&self, channel: &ChannelId, user: &str) -> bool {
        let Some(parked) = self.parked.get(&(channel.clone(), user.to_owned())) else { return false };
        if !parked.taken.is_empty() {
            return true;
        }
        let Some(front) = parked.texts.front().map(|front| &front.place) else { return false };
        !front.is_empty() && self.leaving.iter().any(|entry| entry.value() == front)
    }

    /// Puts back text taken by [`Self::unpark`] that could not be delivered after all, so it is
    /// the next to come out again.
    pub fn put_back(&self, channel: &ChannelId, user: &str, text: String) {
        let mut parked = self.parked.entry((channel.clone(), user.to_owned())).or_default();
        parked.parked_at = std::time::Instant::now();
        self.hold_bytes(text.len());
        parked.texts.push_front(ParkedText {
            place: String::new(),
            source: String::new(),
            text,
            taken_by: String::new(),
        });
        let dropped = Self::bound(channel, &mut parked.texts, true);
        drop(parked);
        self.release_bytes(dropped);
        self.changed(channel, user);
        self.shed_oldest_users(MAX_PARKED_USERS, MAX_PARKED_BYTES);
    }

    /// Beyond `max_users` users with parked answers, or `max_bytes` of parked text, drops the
    /// answers of the users whose text was parked longest ago, down to nine tenths of both
    /// (so that the scan runs once per tenth, not at each new text).
    fn shed_oldest_users(&self, max_users: usize, max_bytes: usize) {
        let bytes = || self.parked_bytes.load(Ordering::Relaxed);
        if self.parked.len() <= max_users && bytes() <= max_bytes {
            return;
        }
        let mut ages: Vec<((ChannelId, String), std::time::Instant)> =
            self.parked.iter().map(|entry| (entry.key().clone(), entry.parked_at)).collect();
        ages.sort_unstable_by_key(|(_, parked_at)| *parked_at);
        let (users_wanted, bytes_wanted) = (max_users - max_users / 10, max_bytes - max_bytes / 10);
        let (mut users, mut answers) = (0, 0);
        for (key, parked_at) in ages {
            if self.parked.len() <= users_wanted && bytes() <= bytes_wanted {
                break;
            }
            // Unless text was parked for them meanwhile.
            // Not a user whose message is answering with text it took: that text is saved with
            // the entry until the message finishes.
            let droppable = |parked: &Parked| parked.parked_at <= parked_at && parked.taken.is_empty();
            if let Some((_, parked)) = self.parked.remove_if(&key, |_, parked| droppable(parked)) {
                users += 1;
                answers += parked.texts.len();
                self.release_bytes(bytes_of(&parked.texts));
                self.changed(&key.0, &key.1);
            }
        }
        tracing::warn!(users, answers, "Too many parked answers (users or bytes); the oldest users' were dropped.");
    }

    fn hold_bytes(&self, bytes: usize) {
        self.parked_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release_bytes(&self, bytes: usize) {
        let _ = self
            .parked_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| Some(held.saturating_sub(bytes)));
    }

    /// Beyond the bound, drops from the end opposite to where text was just added; returns the
    /// bytes dropped.
    fn bound(channel: &ChannelId, queue: &mut VecDeque<ParkedText>, added_at_front: bool) -> usize {
        let mut dropped = 0;
        while queue.len() > MAX_PARKED_PER_USER {
            let gone = if added_at_front { queue.pop_back() } else { queue.pop_front() };
            dropped += gone.map_or(0, |parked| parked.text.len());
            tracing::warn!(channel = %channel, "Too many parked answers for one user; dropped one.");
        }
        dropped
    }

    /// Takes the oldest parked text for a user.
    pub fn unpark(&self, channel: &ChannelId, user: &str) -> Option<String> {
        self.take_front(channel, user).map(|parked| parked.text)
    }

    /// The oldest parked text for a user.
    fn take_front(&self, channel: &ChannelId, user: &str) -> Option<ParkedText> {
        let key = (channel.clone(), user.to_owned());
        let mut parked = self.parked.get_mut(&key)?;
        let front = parked.texts.pop_front();
        self.release_bytes(front.as_ref().map_or(0, |parked| parked.text.len()));
        // The user is reading: what is left is not forgotten, or dropped first, as unwanted.
        parked.parked_at = std::time::Instant::now();
        let empty = parked.is_empty();
        drop(parked);
        if empty {
            self.parked.remove_if(&key, |_, parked| parked.is_empty());
        }
        if front.is_some() {
            self.changed(channel, user);
        }
        front
    }

    /// Drops the parked answers of users for whom nothing was parked or taken since `cutoff`;
    /// returns how many answers went.
    pub fn forget_parked_before(&self, cutoff: std::time::Instant) -> usize {
        let (mut forgotten, mut bytes, mut users) = (0, 0, Vec::new());
        self.parked.retain(|key, parked| {
            let keep = parked.parked_at >= cutoff || !parked.taken.is_empty();
            if !keep {
                forgotten += parked.texts.len();
                bytes += bytes_of(&parked.texts);
                users.push(key.clone());
            }
            keep
        });
        self.release_bytes(bytes);
        for (channel, user) in users {
            self.changed(&channel, &user);
        }
        forgotten
    }

    /// Remembers the passive reply given to `envelope` for [`REPLIED_FOR`], in case it reached
    /// the platform too late (see the module docs).
    pub fn remember_reply(&self, envelope: &Envelope, text: String) {
        let now = std::time::Instant::now();
        let sweep = self.replied_sweeps.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).due(now, REPLIED_FOR);
        if sweep {
            self.replied.retain(|_, replied| now.duration_since(replied.at) < REPLIED_FOR);
        }
        let envelope = Envelope { content: Vec::new(), ..envelope.clone() };
        let key = (envelope.channel.clone(), envelope.platform_message_id.clone());
        self.replied.insert(key, Replied { envelope, text, at: now });
    }

    /// The passive reply given lately to a message (its envelope and text), for a platform
    /// retry of it: the retry proves that reply did not arrive in time.
    pub fn reply_again(&self, channel: &ChannelId, message_id: &str) -> Option<(Envelope, String)> {
        let replied = self.replied.get(&(channel.clone(), message_id.to_owned()))?;
        (replied.at.elapsed() < REPLIED_FOR).then(|| (replied.envelope.clone(), replied.text.clone()))
    }

    /// Drops what `envelope_id`'s answer parked for a user (in its own place, or, for a message
    /// answered with parked text, in that text's): the message is left for the next start with
    /// its parts pending, which parks them again (parked here too, they would come back twice).
    pub fn forget_parked_of(&self, channel: &ChannelId, user: &str, envelope_id: &str) {
        let key = (channel.clone(), user.to_owned());
        if let Some(mut parked) = self.parked.get_mut(&key) {
            let before = bytes_of(&parked.texts);
            // Its own, and the rest of parked text it was answered with (the continue word),
            // parked again in that text's place.
            parked.texts.retain(|text| text.place != envelope_id && text.source != envelope_id);
            let after = bytes_of(&parked.texts);
            drop(parked);
            self.release_bytes(before - after);
            if before != after {
                self.changed(channel, user);
            }
        }
        self.parked.remove_if(&key, |_, parked| parked.is_empty());
    }

    /// Every user's parked answers.
    pub fn export_parked(&self) -> Vec<ParkedRecord> {
        self.parked
            .iter()
            .filter(|entry| !entry.value().is_empty())
            .map(|entry| {
                let ((channel, user), parked) = (entry.key(), entry.value());
                parked.record(channel, user)
            })
            .collect()
    }

    /// Takes back parked answers saved by [`Self::export_parked`] (each saved again); returns
    /// how many texts.
    pub fn import_parked(&self, records: Vec<ParkedRecord>) -> usize {
        self.import_parked_with(records, |_| true)
    }

    /// [`Self::import_parked`], saving again only the records `resave` names.
    /// Records of an invalid channel id are skipped; a user's bound applies as usual.
    ///
    /// A text already parked for its user is not taken again (a file taken back once may be
    /// found again after a crash). `resave` says whether a record is to be saved (it is not as
    /// the store has it): those whose texts the bound dropped are saved either way.
    pub fn import_parked_with(&self, records: Vec<ParkedRecord>, resave: impl Fn(&ParkedRecord) -> bool) -> usize {
        let mut imported = 0;
        for record in records {
            let Ok(channel) = ChannelId::parse(&record.channel) else { continue };
            let save = resave(&record);
            let now = std::time::Instant::now();
            let parked_at = now.checked_sub(Duration::from_secs(record.age_secs)).unwrap_or(now);
            let mut parked = self.parked.entry((channel.clone(), record.user.clone())).or_default();
            parked.parked_at = parked_at;
            for text in record.texts {
                // Text put back has no place: two such texts alike may both be wanted.
                if text.place.is_empty() || !parked.texts.contains(&text) {
                    imported += 1;
                    self.hold_bytes(text.text.len());
                    parked.texts.push_back(text);
                }
            }
            // From the back: the front is what the user reads next (a text taken back from a
            // message that had taken it among them).
            let dropped = Self::bound(&channel, &mut parked.texts, true);
            drop(parked);
            self.release_bytes(dropped);
            if save || dropped > 0 {
                self.changed(&channel, &record.user);
            }
        }
        self.shed_oldest_users(MAX_PARKED_USERS, MAX_PARKED_BYTES);
        imported
    }

    /// Whether a user has parked answers.
    pub fn has_parked(&self, channel: &ChannelId, user: &str) -> bool {
        self.parked.get(&(channel.clone(), user.to_owned())).is_some_and(|parked| !parked.texts.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yizhan_channel_core::{Conversation, ConversationKind, Reply, ReplyHandle, Sender};

    fn part(text: &str) -> Delivery {
        Delivery {
            delivery_id: "e-0".into(),
            channel: ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}")),
            conversation: Conversation { kind: ConversationKind::Direct, id: "u".into() },
            recipient: Sender { id: "u".into(), name: None },
            reply_handle: ReplyHandle::default(),
            reply: Reply::text(text),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_offered_while_an_attempt_waits_is_taken_by_it() {
        let job = Arc::new(PassiveJob::new(crate::store::test_envelope("m")));
        let waiter = {
            let job = job.clone();
            tokio::spawn(async move { job.take(0, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(matches!(job.offer(vec![part("答")]), Offer::Held(_)));
        let taken = waiter.await.ok().flatten();
        assert_eq!(taken.map(|held| held.parts[0].reply.text.clone()).as_deref(), Some("答"));
    }

    /// The session that offered an answer waits until whoever took it is done with it.
    #[tokio::test(start_paused = true)]
    async fn a_held_answer_is_gone_only_once_its_taker_is_done_with_it() {
        let job = PassiveJob::new(crate::store::test_envelope("m"));
        let Offer::Held(gone) = job.offer(vec![part("答")]) else { panic!("not held") };
        let mut gone = Box::pin(gone.wait());
        let taken = job.take(0, Duration::from_secs(5)).await;
        assert!(taken.is_some());
        assert!(tokio::time::timeout(Duration::from_secs(60), gone.as_mut()).await.is_err(), "gone while still taken");
        drop(taken);
        assert!(tokio::time::timeout(Duration::from_secs(1), gone).await.is_ok());
    }

    /// An attempt whose handler began late is still waiting when the platform, having given up
    /// on it, sends the next: the answer goes to the new one, which the platform listens to.
    #[tokio::test(start_paused = true)]
    async fn a_later_attempt_supersedes_one_still_waiting() {
        let job = Arc::new(PassiveJob::new(crate::store::test_envelope("m")));
        let (kind, first) = job.begin_attempt(3, None);
        assert_eq!(kind, AttemptKind::Lapse);
        let stale = {
            let job = job.clone();
            tokio::spawn(async move { job.take(first, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (kind, second) = job.begin_attempt(3, None);
        assert_eq!(kind, AttemptKind::Lapse);
        // The earlier attempt stops waiting as soon as the later one begins.
        assert!(stale.await.ok().flatten().is_none(), "the superseded attempt took the answer");
        let live = {
            let job = job.clone();
            tokio::spawn(async move { job.take(second, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(matches!(job.offer(vec![part("答")]), Offer::Held(_)));
        assert!(live.await.ok().flatten().is_some());
    }

    /// The slots' own stop signal, for an attempt whose job has left the map (its answer pushed
    /// at shutdown) while it is held open.
    #[tokio::test(start_paused = true)]
    async fn stopped_resolves_once_stop_waiting_was_called_even_when_called_late() {
        let slots = Arc::new(PassiveSlots::default());
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.stopped().await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        slots.stop_waiting();
        assert!(tokio::time::timeout(Duration::from_secs(1), waiter).await.is_ok());
        assert!(tokio::time::timeout(Duration::from_secs(1), slots.stopped()).await.is_ok());
    }

    /// Once the connections are about to close, no attempt waits: not one waiting now, nor one
    /// of a message that comes in after.
    #[tokio::test(start_paused = true)]
    async fn after_stop_waiting_no_attempt_waits_even_for_a_message_opened_later() {
        let slots = PassiveSlots::default();
        let earlier = slots.open(&crate::store::test_envelope("m1"));
        let (_, number) = earlier.begin_attempt(3, None);
        let waiting = {
            let earlier = earlier.clone();
            tokio::spawn(async move { earlier.take(number, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let stopped_at = tokio::time::Instant::now();
        slots.stop_waiting();
        assert!(waiting.await.ok().flatten().is_none());
        let later = slots.open(&crate::store::test_envelope("m2"));
        let (_, number) = later.begin_attempt(3, None);
        assert!(later.take(number, Duration::from_secs(5)).await.is_none());
        assert!(stopped_at.elapsed() < Duration::from_secs(1), "an attempt waited after stop_waiting");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_offered_between_attempts_waits_for_the_next_one() {
        let job = PassiveJob::new(crate::store::test_envelope("m"));
        let (kind, first) = job.begin_attempt(3, None);
        assert_eq!(kind, AttemptKind::Lapse);
        assert!(job.take(first, Duration::from_secs(5)).await.is_none());
        assert!(matches!(job.offer(vec![part("答")]), Offer::Held(_)));
        let (kind, second) = job.begin_attempt(3, None);
        assert_eq!(kind, AttemptKind::Lapse);
        assert!(job.take(second, Duration::from_secs(5)).await.is_some());
    }

    #[test]
    fn attempts_never_seen_count_only_before_the_first_seen() {
        let job = PassiveJob::new(crate::store::test_envelope("m"));
        assert_eq!(job.begin_attempt(3, Some(2)), (AttemptKind::Last, 3), "as old as the third");
        assert_eq!(job.begin_attempt(3, Some(2)), (AttemptKind::Last, 4), "counted, not estimated again");
        let job = PassiveJob::new(crate::store::test_envelope("n"));
        assert_eq!(job.begin_attempt(3, Some(0)), (AttemptKind::Lapse, 1));
        assert_eq!(job.begin_attempt(3, Some(2)), (AttemptKind::Lapse, 2), "the first seen set the count");
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_last_attempt_gives_up_the_answer_is_pushed() {
        let job = PassiveJob::new(crate::store::test_envelope("m"));
        for _ in 0..2 {
            assert_eq!(job.begin_attempt(3, None).0, AttemptKind::Lapse);
        }
        let (kind, last) = job.begin_attempt(3, None);
        assert_eq!(kind, AttemptKind::Last);
        assert!(job.take(last, Duration::from_millis(4_500)).await.is_none());
        assert!(job.give_up().is_none());
        assert!(matches!(job.offer(vec![part("答")]), Offer::Push(_)));
    }

    /// Once parked answers are kept durably, a message that parked text waits (in its finish)
    /// until that text is saved, and one answered with parked text until it is saved as taken;
    /// one that did neither does not wait.
    #[actix::test]
    async fn a_message_that_parked_text_waits_until_that_text_is_saved() {
        let slots = PassiveSlots::default();
        slots.keep_parked_durably();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        slots.park(&channel, "u", "e1", "后半段".into());
        slots.parked_saved("e0").await;
        let saved = slots.parked_saved("e1");
        tokio::pin!(saved);
        let early = tokio::time::timeout(Duration::from_millis(20), &mut saved).await;
        assert!(early.is_err(), "finished before its parked text was saved");
        slots.save_parked(&crate::store::MemoryStore::new(1)).await;
        let saved = tokio::time::timeout(Duration::from_secs(30), saved).await;
        assert!(saved.is_ok(), "still waiting once the text was saved");
        // Taken by the continue word: saved as taken before it is recorded as that answer.
        assert_eq!(slots.unpark_for(&channel, "u", "k").as_deref(), Some("后半段"));
        let taken = slots.parked_saved("k");
        tokio::pin!(taken);
        assert!(tokio::time::timeout(Duration::from_millis(20), &mut taken).await.is_err(), "not saved yet");
        slots.save_parked(&crate::store::MemoryStore::new(1)).await;
        assert!(tokio::time::timeout(Duration::from_secs(30), taken).await.is_ok());
    }

    /// Text taken by the continue word is saved as taken until that message finishes; taken
    /// back after a crash, it is parked again if the message was not answered yet, and dropped
    /// if it was (its recorded parts carry it) or it finished.
    #[test]
    fn text_taken_by_the_continue_word_is_saved_as_taken_until_that_message_finishes() {
        let (slots, channel) = two_parked();
        assert_eq!(slots.unpark_for(&channel, "u", "k").as_deref(), Some("一段"));
        let saved = slots.saved_record(&channel, "u").map(|record| record.texts).unwrap_or_default();
        let taken = ParkedText { taken_by: "k".into(), ..ParkedText::of("e1", "一段") };
        assert_eq!(saved, [taken.clone(), ParkedText::of("e2", "二段")]);
        // Left for the next start, it stays saved as taken (the next start resolves it).
        slots.forget_answer_but_what_it_took("k");
        let saved = slots.saved_record(&channel, "u").map(|record| record.texts).unwrap_or_default();
        assert_eq!(saved.first(), Some(&taken));
        slots.forget_answer("k");
        let saved = slots.saved_record(&channel, "u").map(|record| record.texts).unwrap_or_default();
        assert_eq!(saved, [ParkedText::of("e2", "二段")]);

        let record =
            |texts: Vec<ParkedText>| ParkedRecord { channel: "c".into(), user: "u".into(), texts, age_secs: 0 };
        let in_place = vec![("k".to_owned(), "e1".to_owned())];
        for (answered, expected, continuing) in [
            (Some(false), vec![ParkedText::of("e1", "一段"), ParkedText::of("e2", "二段")], vec![]),
            (Some(true), vec![ParkedText::of("e2", "二段")], in_place),
            (None, vec![ParkedText::of("e2", "二段")], vec![]),
        ] {
            let mut restored = record(vec![taken.clone(), ParkedText::of("e2", "二段")]);
            let found = PassiveSlots::restore_taken(&mut restored, |id| (id == "k").then_some(answered).flatten());
            assert_eq!(found, (true, continuing), "{answered:?}");
            assert_eq!(restored.texts, expected, "{answered:?}");
        }
        let mut untouched = record(vec![ParkedText::of("e2", "二段")]);
        assert_eq!(PassiveSlots::restore_taken(&mut untouched, |_| None), (false, vec![]));
    }

    /// Slots with 一段 (of e1) then 二段 (of e2) parked for user `u` of channel `c`.
    fn two_parked() -> (PassiveSlots, ChannelId) {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        slots.park(&channel, "u", "e1", "一段".into());
        slots.park(&channel, "u", "e2", "二段".into());
        (slots, channel)
    }

    /// While text taken by the continue word is on its way, later parked text waits for it.
    #[test]
    fn parked_text_waits_while_older_text_taken_by_the_continue_word_is_on_its_way() {
        let (slots, channel) = two_parked();
        assert!(!slots.oldest_is_still_leaving(&channel, "u"));
        assert_eq!(slots.unpark_for(&channel, "u", "k").as_deref(), Some("一段"));
        assert!(slots.oldest_is_still_leaving(&channel, "u"), "二段 shown while 一段 is still on its way");
        slots.forget_answer("k");
        assert!(!slots.oldest_is_still_leaving(&channel, "u"));
    }

    /// A message answered with parked text (the continue word) parks the rest of that text in
    /// its place; left for the next start with its parts pending, that rest is forgotten with
    /// its own parked text (the next start parks it again from the parts: kept too, the user
    /// would read it twice).
    #[test]
    fn forgetting_a_message_s_parked_text_takes_the_rest_it_parked_in_another_place() {
        let (slots, channel) = two_parked();
        assert_eq!(slots.unpark_for(&channel, "u", "k").as_deref(), Some("一段"));
        slots.park(&channel, "u", "k", "一段的后半".into());
        slots.forget_parked_of(&channel, "u", "k");
        let texts: Vec<String> = std::iter::from_fn(|| slots.unpark(&channel, "u")).collect();
        assert_eq!(texts, ["二段"]);
        // Saved by earlier versions as [place, text]: the source is the place.
        let legacy: ParkedText = serde_json::from_str(r#"["e3", "三段"]"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(legacy, ParkedText::of("e3", "三段"));
        let saved = serde_json::to_string(&ParkedText { source: "k".into(), ..legacy.clone() }).unwrap_or_default();
        assert_eq!(saved, r#"["e3","k","三段"]"#);
    }

    #[test]
    fn parked_answers_come_back_oldest_first_and_are_bounded() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        for i in 0..10 {
            slots.park(&channel, "u", &format!("e{i}"), format!("t{i}"));
        }
        assert!(slots.has_parked(&channel, "u"));
        assert_eq!(slots.unpark(&channel, "u").as_deref(), Some("t2"));
        for _ in 0..7 {
            assert!(slots.unpark(&channel, "u").is_some());
        }
        assert!(!slots.has_parked(&channel, "u"));
        assert_eq!(slots.unpark(&channel, "u"), None);
    }

    #[test]
    fn parked_answers_exported_and_imported_come_back_in_order_and_bounded() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}"));
        slots.park(&channel, "u", "e1", "一".into());
        slots.park(&channel, "u", "e2", "二".into());
        let records = slots.export_parked();
        assert_eq!(records.len(), 1);
        let json = serde_json::to_string(&records).unwrap_or_default();
        let back: Vec<ParkedRecord> = serde_json::from_str(&json).unwrap_or_default();
        let restarted = PassiveSlots::default();
        restarted.park(&channel, "u", "e0", "零".into());
        assert_eq!(restarted.import_parked(back), 2);
        let bad = ParkedRecord {
            channel: "not an id!".into(),
            user: "u".into(),
            texts: vec![ParkedText::of("e9", "九")],
            age_secs: 0,
        };
        assert_eq!(restarted.import_parked(vec![bad]), 0);
        let texts: Vec<String> = std::iter::from_fn(|| restarted.unpark(&channel, "u")).collect();
        assert_eq!(texts, ["零", "一", "二"]);
    }

    #[test]
    fn parked_answers_of_users_silent_since_the_cutoff_are_forgotten() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        slots.park(&channel, "gone", "e1", "a".into());
        slots.park(&channel, "gone", "e2", "b".into());
        slots.park(&channel, "back", "e3", "c".into());
        let now = std::time::Instant::now();
        let ago = |secs| now.checked_sub(Duration::from_secs(secs)).unwrap_or_else(|| panic!("uptime under {secs} s"));
        if let Some(mut gone) = slots.parked.get_mut(&(channel.clone(), "gone".to_owned())) {
            gone.parked_at = ago(2);
        }
        let cutoff = ago(1);
        assert_eq!(slots.forget_parked_before(cutoff), 2);
        assert!(!slots.has_parked(&channel, "gone"));
        assert_eq!(slots.unpark(&channel, "back").as_deref(), Some("c"));
    }

    #[test]
    fn beyond_the_user_bound_the_users_parked_longest_ago_lose_their_answers() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        let now = std::time::Instant::now();
        for user in 0..12u64 {
            slots.park(&channel, &format!("u{user}"), &format!("e{user}"), "答".into());
            if let Some(mut parked) = slots.parked.get_mut(&(channel.clone(), format!("u{user}"))) {
                // u0 parked longest ago, u11 last (later instants: the order is what counts).
                parked.parked_at = now + Duration::from_secs(user);
            }
        }
        slots.shed_oldest_users(10, usize::MAX);
        assert_eq!(slots.parked.len(), 9);
        for user in 0..3 {
            assert!(!slots.has_parked(&channel, &format!("u{user}")), "u{user}");
        }
        assert!(slots.has_parked(&channel, "u3") && slots.has_parked(&channel, "u11"));
        slots.shed_oldest_users(10, usize::MAX);
        assert_eq!(slots.parked.len(), 9, "within the bound, nothing goes");
        // 9 users with 3 bytes each: a budget of 10 bytes keeps the 3 parked last.
        slots.shed_oldest_users(usize::MAX, 10);
        assert_eq!(slots.parked.len(), 3);
        assert_eq!(slots.parked_bytes.load(Ordering::Relaxed), 9);
        assert!(slots.has_parked(&channel, "u9") && !slots.has_parked(&channel, "u8"));
    }

    #[test]
    fn the_parked_end_of_an_answer_still_being_sent_is_not_the_oldest_to_show() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        slots.mark_leaving("e1");
        slots.park(&channel, "u", "e1", "结尾".into());
        assert!(slots.oldest_is_still_leaving(&channel, "u"));
        assert!(!slots.oldest_is_still_leaving(&channel, "someone else"));
        slots.forget_answer("e1");
        assert!(!slots.oldest_is_still_leaving(&channel, "u"));
        // A continue word's answer parks its rest under the answer it continues.
        slots.park(&channel, "v", "e2", "旧".into());
        assert_eq!(slots.unpark_for(&channel, "v", "k1").as_deref(), Some("旧"));
        slots.mark_leaving("k1");
        slots.park(&channel, "v", "k1", "旧的后半".into());
        assert!(slots.oldest_is_still_leaving(&channel, "v"));
        slots.forget_answer("k1");
        assert!(!slots.oldest_is_still_leaving(&channel, "v"));
    }

    #[test]
    fn parked_bytes_are_counted_back_to_nothing_whichever_way_text_leaves() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        let held = || slots.parked_bytes.load(Ordering::Relaxed);
        for i in 0..MAX_PARKED_PER_USER + 2 {
            slots.park(&channel, "a", &format!("e{i}"), "一二".into());
        }
        assert_eq!(held(), MAX_PARKED_PER_USER * 6, "the per-user bound's drops are counted");
        slots.put_back(&channel, "a", "三".into());
        slots.park(&channel, "b", "x", "四".into());
        slots.forget_parked_of(&channel, "b", "x");
        while slots.unpark(&channel, "a").is_some() {}
        assert_eq!(held(), 0);
        slots.park(&channel, "c", "y", "五".into());
        slots.import_parked(slots.export_parked());
        assert_eq!(held(), 3, "a text already parked is not taken back a second time");
        slots.forget_parked_before(std::time::Instant::now() + Duration::from_secs(1));
        assert_eq!(held(), 0);
    }

    #[test]
    fn taking_parked_text_keeps_the_rest_from_expiring() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        slots.park(&channel, "reader", "e1", "一".into());
        slots.park(&channel, "reader", "e2", "二".into());
        let now = std::time::Instant::now();
        let ago = |secs| now.checked_sub(Duration::from_secs(secs)).unwrap_or_else(|| panic!("uptime under {secs} s"));
        if let Some(mut parked) = slots.parked.get_mut(&(channel.clone(), "reader".to_owned())) {
            parked.parked_at = ago(2);
        }
        assert_eq!(slots.unpark(&channel, "reader").as_deref(), Some("一"));
        assert_eq!(slots.forget_parked_before(ago(1)), 0);
        assert_eq!(slots.unpark(&channel, "reader").as_deref(), Some("二"));
    }

    #[test]
    fn the_rest_of_what_a_user_is_reading_survives_the_per_user_bound() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        for i in 0..MAX_PARKED_PER_USER {
            slots.park(&channel, "u", &format!("e{i}"), format!("t{i}"));
        }
        // 继续 (message c) takes t0; what of it does not fit is parked again at the front.
        assert_eq!(slots.unpark_for(&channel, "u", "c").as_deref(), Some("t0"));
        slots.park(&channel, "u", "c", "t0 的后半".into());
        slots.park(&channel, "u", "c", "t0 的中间".into());
        assert_eq!(slots.unpark(&channel, "u").as_deref(), Some("t0 的中间"));
        assert_eq!(slots.unpark(&channel, "u").as_deref(), Some("t0 的后半"));
    }

    #[test]
    fn text_put_back_comes_out_first() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        slots.park(&channel, "u", "e1", "older".into());
        slots.park(&channel, "u", "e2", "newer".into());
        let taken = slots.unpark(&channel, "u").unwrap_or_default();
        slots.put_back(&channel, "u", taken);
        assert_eq!(slots.unpark(&channel, "u").as_deref(), Some("older"));
        assert_eq!(slots.unpark(&channel, "u").as_deref(), Some("newer"));
    }

    /// The end of an answer is parked for the send quota before its start fails to send and is
    /// parked too: the start must still come out first, after older answers.
    #[test]
    fn the_start_of_an_answer_parked_after_its_end_comes_out_before_it() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        slots.park(&channel, "u", "e1", "older answer".into());
        slots.park(&channel, "u", "e2", "end".into());
        slots.park(&channel, "u", "e2", "start".into());
        let order: Vec<String> = std::iter::from_fn(|| slots.unpark(&channel, "u")).collect();
        assert_eq!(order, ["older answer", "start", "end"]);
    }

    /// 继续 (message e2) shows the start of answer e1; what of it does not fit is parked again
    /// and must come before the end of e1, not after answers parked since.
    #[test]
    fn what_the_continue_word_could_not_show_keeps_its_place() {
        let slots = PassiveSlots::default();
        let channel = ChannelId::parse("c").unwrap_or_else(|e| panic!("{e}"));
        slots.park(&channel, "u", "e1", "end".into());
        slots.park(&channel, "u", "e1", "start".into());
        slots.park(&channel, "u", "e3", "a newer answer".into());
        assert_eq!(slots.unpark_for(&channel, "u", "e2").as_deref(), Some("start"));
        slots.park(&channel, "u", "e2", "rest of start".into());
        slots.forget_answer("e2");
        let order: Vec<String> = std::iter::from_fn(|| slots.unpark(&channel, "u")).collect();
        assert_eq!(order, ["rest of start", "end", "a newer answer"]);
        assert!(slots.continuing.is_empty());
    }
}
