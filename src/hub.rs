//! The shared, read-only wiring every part of the core reaches through: store, LLM, channels,
//! texts, bounds, metrics. Built once at startup; cloning is an `Arc` bump.

use crate::config::{MenuAction, MessagesConfig, ReplyMode, SessionConfig};
use crate::delivery::passive::PassiveSlots;
use crate::delivery::ChannelActor;
use crate::llm::LlmActor;
use crate::metrics::Metrics;
use crate::store::{LiveStream, Store};
use actix::Addr;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use yizhan_channel_core::{Channel, ChannelId, Envelope};

/// The first wait before a failed finish is tried again (see `Hub::finish_later`); doubled each
/// time, up to [`FINISH_RETRY_LONGEST_DELAY`].
const FINISH_RETRY_FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a failed finish.
const FINISH_RETRY_LONGEST_DELAY: Duration = Duration::from_secs(60);
/// After how long a finish still failing is logged as a warning: a store failing that long
/// needs its operator.
const FINISH_RETRY_WARN_AFTER: Duration = Duration::from_secs(3_600);
/// The most failed finishes tried again at once: beyond, a message stays open for the next
/// start (which answers nothing already answered), rather than a task per message piling up
/// through a long disk-full spell.
const MOST_FINISH_RETRIES: usize = 10_000;
/// Failed finishes being tried again now (see `Hub::finish_later`).
static FINISH_RETRIES: AtomicUsize = AtomicUsize::new(0);

/// One configured channel account and what the core keeps for it.
pub struct ChannelEntry {
    /// The platform implementation.
    pub channel: Arc<dyn Channel>,
    /// Its delivery actor.
    pub outbound: Addr<ChannelActor>,
    /// This account's persona.
    pub system_prompt: String,
    /// Group messages are keyed per member rather than per group.
    pub group_per_user: bool,
    /// How answers go back.
    pub reply_mode: ReplyMode,
    /// How long the platform holds a webhook open for a passive reply (`None`: it doesn't).
    pub passive_window: Option<Duration>,
    /// The last passive attempt answers `success` this long before its deadline.
    pub passive_margin: Duration,
    /// Menu keys mapped to replies or prompts.
    pub menu: std::collections::HashMap<String, MenuAction>,
    /// Parts the send API accepts per user message (公众号: 5 in 48 h); `None`: no such quota.
    pub send_quota: Option<usize>,
}

impl ChannelEntry {
    /// Whether answers can be parked for this channel's users (a passive window, or a send
    /// quota whose overflow waits for the continue word). Elsewhere the continue word is
    /// ordinary text: "继续" asks the model to go on.
    pub fn can_park(&self) -> bool {
        self.passive_window.is_some() || self.send_quota.is_some()
    }

    /// How long the platform waits for each attempt before it tries again: its own passive
    /// window, never shorter than the one configured here (a window set short for safety does
    /// not make the platform give up or retry any sooner). Zero without a window.
    pub fn platform_window(&self) -> Duration {
        let configured = self.passive_window.unwrap_or_default();
        self.channel.capabilities().passive_reply_window.unwrap_or(configured).max(configured)
    }

    /// Whether webhook calls are held open for a passive answer.
    pub fn holds_for_passive(&self) -> bool {
        self.passive_window.is_some() && matches!(self.reply_mode, ReplyMode::Auto | ReplyMode::Passive)
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Hub(Arc<HubInner>);

/// The fields behind [`Hub`].
pub struct HubInner {
    /// Dedupe keys, journal, history.
    pub store: Arc<dyn Store>,
    /// The bounded LLM gateway.
    pub llm: Addr<LlmActor>,
    /// Channel accounts by id; fixed after startup, so read without locks.
    pub channels: HashMap<ChannelId, ChannelEntry, foldhash::fast::RandomState>,
    /// The hub's own words to users.
    pub messages: MessagesConfig,
    /// Conversation bounds.
    pub session: SessionConfig,
    /// How long platform message ids are remembered.
    pub dedupe_ttl: Duration,
    /// Metrics.
    pub metrics: Metrics,
    /// Passive-reply jobs and parked answers.
    pub passive: PassiveSlots,
    /// The messages the last run was streaming answers into, by envelope id, until the
    /// resumed envelope's job takes its own (see [`Hub::take_resumed_stream`]).
    pub resumed_streams: std::sync::Mutex<HashMap<String, LiveStream>>,
}

impl std::ops::Deref for Hub {
    type Target = HubInner;

    fn deref(&self) -> &HubInner {
        &self.0
    }
}

impl Hub {
    /// Wraps the wiring.
    pub fn new(inner: HubInner) -> Self {
        Self(Arc::new(inner))
    }

    /// The conversation an envelope belongs to, by its channel's `group_context`.
    pub fn session_key(&self, envelope: &Envelope) -> crate::routing::SessionKey {
        let per_user = self.channels.get(&envelope.channel).is_some_and(|entry| entry.group_per_user);
        crate::routing::SessionKey::for_envelope(envelope, per_user)
    }

    /// Finishes, unanswered, an envelope whose channel is no longer configured (which happens
    /// only after a restart with the channel gone from the config): nothing could deliver an
    /// answer, and an entry left open would keep its inbound log segment forever.
    pub async fn finish_without_channel(&self, envelope: &yizhan_channel_core::Envelope) {
        tracing::error!(
            channel = %envelope.channel,
            envelope = %envelope.id,
            "Message for a channel no longer configured; finished unanswered."
        );
        self.finish(&envelope.id).await;
    }

    /// Notes, at start, the message the last run was streaming `envelope_id`'s answer into, for
    /// the job that resumes it (see [`Hub::take_resumed_stream`]).
    pub fn resume_stream(&self, envelope_id: &str, stream: LiveStream) {
        self.resumed_streams_locked().insert(envelope_id.to_owned(), stream);
    }

    /// The message the last run was streaming `envelope_id`'s answer into (once: the job that
    /// takes it answers into it).
    pub fn take_resumed_stream(&self, envelope_id: &str) -> Option<LiveStream> {
        self.resumed_streams_locked().remove(envelope_id)
    }

    fn resumed_streams_locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, LiveStream>> {
        self.resumed_streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks an accepted envelope as finished: answered, failed for good, or needing no answer.
    pub async fn finish(&self, envelope_id: &str) {
        // Text of its answer parked for the user's next message is saved first: finished, the
        // message is not resumed after a crash, and unsaved parked text would be lost with it.
        self.passive.parked_saved(envelope_id).await;
        self.passive.forget_answer(envelope_id);
        // A resumed message finished without a job taking its stream (nothing to answer).
        self.take_resumed_stream(envelope_id);
        let finished = self.store.finish(envelope_id).await;
        // Counted as no longer open either way, but only once the store is done with it (a
        // shutdown that saw 0 earlier would stop before the finish is written): nothing in this
        // process will finish it now (if the store failed before recording the finish, the next
        // start resumes it), and the shutdown must not wait for it. The SQLite store can also
        // fail after its inbound log recorded the finish.
        self.metrics.journal_open.dec();
        if let Err(error) = finished {
            tracing::error!(envelope = %envelope_id, %error, "Failed to finish a journal entry; trying again later.");
            self.finish_later(envelope_id);
        }
    }

    /// Tries a failed finish again in the background (a full disk, say, whose room may come
    /// back) until it is written, the store breaks for good (the restart then resumes the
    /// message: its answer was recorded and sends nothing already sent), or the process ends;
    /// still failing after an hour, it says so once.
    /// Left open, the message would keep its log segment, and its parts held for the user's
    /// next message (parked) pending: the next start would park or send them again, after the
    /// user had them.
    fn finish_later(&self, envelope_id: &str) {
        let too_many = FINISH_RETRIES.fetch_add(1, Ordering::SeqCst) >= MOST_FINISH_RETRIES;
        // Counted off however this ends: here, or with the task, which the process ending may
        // drop before it ever ran.
        let counted = FinishRetry;
        if too_many {
            tracing::warn!(envelope = %envelope_id, "Too many finishes failing to try this one again; left for the next start.");
            return;
        }
        let (store, envelope_id) = (self.store.clone(), envelope_id.to_owned());
        actix::spawn(async move {
            let _counted = counted;
            let mut warn_at = Some(actix::clock::Instant::now() + FINISH_RETRY_WARN_AFTER);
            let mut delay = FINISH_RETRY_FIRST_DELAY;
            loop {
                actix::clock::sleep(delay).await;
                if warn_at.is_some_and(|at| actix::clock::Instant::now() >= at) {
                    warn_at = None;
                    tracing::warn!(envelope = %envelope_id, "Journal entry still not finished after an hour; trying on (check the disk).");
                }
                if store.health().is_err() {
                    return;
                }
                match store.finish(&envelope_id).await {
                    Ok(()) => {
                        tracing::info!(envelope = %envelope_id, "Journal entry finished on a later try.");
                        return;
                    }
                    Err(error) => tracing::debug!(envelope = %envelope_id, %error, "Finishing failed again."),
                }
                delay = (delay * 2).min(FINISH_RETRY_LONGEST_DELAY);
            }
        });
    }

    /// Leaves an answered message open, its parts pending, for the next start to deliver (at
    /// shutdown, when what would keep it here, a held passive reply or a retry, ends with the
    /// process); the shutdown then no longer waits for it.
    pub fn leave_for_next_start(&self, envelope: &Envelope) {
        tracing::info!(channel = %envelope.channel, envelope = %envelope.id, "Answer left for the next start.");
        // What of it is parked already (its rest beyond the send quota) is pending too: the
        // next start parks or sends it from there, and a parked copy would come twice.
        self.passive.forget_parked_of(&envelope.channel, &envelope.sender.id, &envelope.id);
        self.passive.forget_answer_but_what_it_took(&envelope.id);
        self.metrics.journal_open.dec();
    }
}

/// One of [`FINISH_RETRIES`], counted off when dropped.
struct FinishRetry;

impl Drop for FinishRetry {
    fn drop(&mut self) {
        FINISH_RETRIES.fetch_sub(1, Ordering::SeqCst);
    }
}
