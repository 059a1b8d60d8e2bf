//! Sending answers: one [`ChannelActor`] per configured account renders an answer into the
//! platform's parts and sends them in order, retrying transient failures with backoff.
//!
//! Invariant: a part is retried only on [`ChannelError::is_retryable`] failures and at most
//! `max_attempts` times, or once on [`ChannelError::MaybeDelivered`] (then recorded failed, never
//! parked or resent); every part ends as delivered, as failed with a logged, counted reason,
//! or (where a webhook response can still carry it) parked for the user's next message.

pub mod live;
pub mod passive;

use crate::config::{DeliveryConfig, ReplyMode};
use crate::hub::Hub;
use crate::metrics::{GaugeHeld, Metrics};
use crate::store::{Store, Turn};
use actix::prelude::*;
use futures_util::FutureExt;
use rand::Rng;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use yizhan_channel_core::{Channel, ChannelError, Delivery, Envelope, Reply};

/// Send rendered parts, in order; resolves when every part is delivered or one failed for good
/// (the parts after it are then given up too, recorded as failed or parked by the sender, so the
/// user never gets a torn answer with a hole in it).
#[derive(Message)]
#[rtype(result = "Result<(), Undelivered>")]
pub struct Deliver {
    /// The parts, as recorded in the outbox. Those that could not be delivered come back in
    /// [`Undelivered`] still pending: the sender records them as failed, parks them, or leaves
    /// them for the next start.
    pub parts: Vec<Delivery>,
}

/// Parts that could not be delivered, and why.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({} part(s) undelivered)", parts.len())]
pub struct Undelivered {
    /// The failure that stopped delivery.
    pub error: ChannelError,
    /// The part that failed and every part after it, in order.
    pub parts: Vec<Delivery>,
}

/// An answer's text, as it reaches delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerText {
    /// The model's (or a configured) markdown: the channel renders it.
    Markdown(String),
    /// Text the channel rendered before (parked parts coming back): only split to size, since
    /// rendering plain text again mangles it (`**kwargs`, `__init__`, `# comment` in code).
    Rendered(String),
}

impl From<String> for AnswerText {
    fn from(text: String) -> Self {
        Self::Markdown(text)
    }
}

/// Renders `text` into the channel's parts for `envelope`'s conversation. Part ids derive from
/// the envelope id, so they are stable across restarts (platform idempotency keys).
pub fn parts_for(channel: &dyn Channel, envelope: &Envelope, text: AnswerText) -> Vec<Delivery> {
    let split_plainly = |text: &str| -> Vec<Reply> {
        yizhan_channel_common::split::split_text(text, channel.capabilities().max_part_bytes)
            .into_iter()
            .map(Reply::text)
            .collect()
    };
    let parts = match text {
        AnswerText::Markdown(text) => {
            // Blank parts would be refused by the platform (failing the answer) or skipped.
            let mut parts: Vec<Reply> = channel
                .render(&Reply::text(text.clone()))
                .into_iter()
                .filter(|part| !part.text.trim().is_empty())
                .collect();
            if parts.is_empty() && !text.trim().is_empty() {
                // A renderer that kept nothing of a real answer (a plugin's markdown
                // conversion, say): the user gets the text as it is rather than silence.
                tracing::warn!(channel = %channel.id(), envelope = %envelope.id, "The channel rendered an answer to no parts; sent unrendered.");
                parts = split_plainly(&text);
            }
            parts
        }
        AnswerText::Rendered(text) => split_plainly(&text),
    };
    parts
        .into_iter()
        .enumerate()
        .map(|(index, part)| Delivery {
            delivery_id: part_id(&envelope.id, index),
            channel: envelope.channel.clone(),
            conversation: envelope.conversation.clone(),
            recipient: envelope.sender.clone(),
            reply_handle: envelope.reply_handle.clone(),
            reply: part,
        })
        .collect()
}

/// The id of part `index` of the answer to `envelope_id`: its outbox key.
pub fn part_id(envelope_id: &str, index: usize) -> String {
    format!("{envelope_id}-{index}")
}

/// A part's place in its answer, read back from its id (see [`part_id`]).
pub fn part_index(delivery_id: &str) -> Option<usize> {
    delivery_id.rsplit_once('-')?.1.parse().ok()
}

/// What became of an answer, as far as its delivery can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// Sent, shown passively, parked for the user's next message, left for the next start, or
    /// possibly arrived: the user has it or will.
    User,
    /// Refused for good before any part of it was sent (or could have arrived).
    NoOne,
}

/// Answers an envelope: records the answer (turn and outbox parts) atomically, sends the parts,
/// and finishes the journal entry. Waits until delivery is over, so a session's answers leave in
/// order. An answer that reached no one takes its turn out of the stored history again (the
/// caller drops any copy it keeps): a later prompt must not show the model saying what the user
/// never read.
pub async fn answer(
    hub: &Hub,
    envelope: &Envelope,
    session_key: &str,
    turn: Option<Turn>,
    text: AnswerText,
) -> Reached {
    let with_turn = turn.is_some();
    let Some(parts) = record(hub, envelope, session_key, turn, text).await else { return Reached::User };
    let reached = deliver_recorded(hub, envelope, parts).await;
    if reached == Reached::NoOne && with_turn {
        forget_turn(hub, envelope).await;
    }
    reached
}

/// Takes the turn stored with `envelope`'s answer out of the history (see [`answer`]).
pub async fn forget_turn(hub: &Hub, envelope: &Envelope) {
    if let Err(error) = hub.store.forget_turn(&envelope.id).await {
        tracing::error!(envelope = %envelope.id, %error, "Failed to forget the turn of an undelivered answer.");
    }
}

/// Records an answer (turn and outbox parts) atomically, before any of it is sent, and returns
/// its parts; `None` when the envelope's channel is gone (the envelope is then finished).
pub async fn record(
    hub: &Hub,
    envelope: &Envelope,
    session_key: &str,
    turn: Option<Turn>,
    text: AnswerText,
) -> Option<Vec<Delivery>> {
    let Some(entry) = hub.channels.get(&envelope.channel) else {
        hub.finish_without_channel(envelope).await;
        return None;
    };
    let parts = parts_for(entry.channel.as_ref(), envelope, text);
    // Not sent before it is recorded: sent unrecorded, a crash before the finish would have
    // the next start ask the model again, and the user would get two answers. A store that
    // fails for a while (a full disk, a lock held by a backup tool) is tried again; the
    // user's later messages wait behind this one, and a stop in the meantime leaves the
    // message open for the next start.
    let mut delay = RECORD_RETRY_FIRST_DELAY;
    let mut failures = 0_u32;
    let mut warn_at = Some(actix::clock::Instant::now() + RECORD_RETRY_WARN_AFTER);
    loop {
        match hub.store.record_answer(&envelope.id, session_key, turn.clone(), &parts).await {
            Ok(()) if failures > 0 => {
                tracing::info!(envelope = %envelope.id, failures, "Answer recorded on a later try; sending it.");
                return Some(parts);
            }
            Ok(()) => return Some(parts),
            Err(error) => {
                if left_to_the_restart(hub, envelope) {
                    return None;
                }
                if failures == 0 {
                    tracing::error!(envelope = %envelope.id, %error, "Failed to record an answer; it is sent once recorded, trying again.");
                } else if warn_at.is_some_and(|at| actix::clock::Instant::now() >= at) {
                    warn_at = None;
                    tracing::warn!(envelope = %envelope.id, %error, failures, "An answer still cannot be recorded after ten minutes; its conversation waits for it (check the disk).");
                } else {
                    tracing::debug!(envelope = %envelope.id, %error, "Recording the answer failed again.");
                }
                failures = failures.saturating_add(1);
            }
        }
        actix::clock::sleep(delay).await;
        delay = (delay * 2).min(RECORD_RETRY_LONGEST_DELAY);
    }
}

/// How long [`record`] waits before trying a failed record again, doubled each time up to
/// [`RECORD_RETRY_LONGEST_DELAY`].
const RECORD_RETRY_FIRST_DELAY: Duration = Duration::from_millis(200);
const RECORD_RETRY_LONGEST_DELAY: Duration = Duration::from_secs(30);
/// When [`record`], still failing, says so once more (as a warning).
const RECORD_RETRY_WARN_AFTER: Duration = Duration::from_secs(600);

/// Whether the store refuses writes for good (a failed fsync: see `Store::health`), in which
/// case the message is left open for the restart that needs (whatever of its answer is not yet
/// sent stays unsent). Sent now, its parts could be marked neither sent nor finished, and that
/// restart would send them, or ask the model, again: a second answer.
pub fn left_to_the_restart(hub: &Hub, envelope: &Envelope) -> bool {
    let Err(problem) = hub.store.health() else { return false };
    tracing::error!(envelope = %envelope.id, %problem, "The store refuses writes; the answer is left for the restart.");
    hub.leave_for_next_start(envelope);
    true
}

/// Sends the parts [`record`] returned (through a held passive attempt where there is one),
/// then finishes the envelope.
pub async fn deliver_recorded(hub: &Hub, envelope: &Envelope, parts: Vec<Delivery>) -> Reached {
    let Some(entry) = hub.channels.get(&envelope.channel) else {
        hub.finish_without_channel(envelope).await;
        return Reached::User;
    };
    if left_to_the_restart(hub, envelope) {
        return Reached::User;
    }
    if parts.is_empty() {
        if let Some(job) = hub.passive.get(&envelope.channel, &envelope.platform_message_id) {
            // Held attempts answer at once instead of waiting out their windows.
            hub.passive.close(&envelope.channel, &envelope.platform_message_id);
            job.offer(Vec::new());
        }
        hub.finish(&envelope.id).await;
        return Reached::User;
    }
    let Some(job) = hub.passive.get(&envelope.channel, &envelope.platform_message_id) else {
        // Parts after the first (a streamed card carried it) count the card as sent.
        let parts = within_send_quota_of_rest(hub, envelope, parts);
        return send_parts(hub, envelope, parts).await;
    };
    let offer = if hub.passive.is_closing() { job.offer_while_closing(parts) } else { job.offer(parts) };
    match offer {
        passive::Offer::Push(parts) => push_instead(hub, envelope, parts).await,
        passive::Offer::Held(gone) => {
            // An attempt takes it; if none comes within two windows (the platform stopped
            // retrying), or once no retry can come any more (a message resumed after a restart
            // may be that old already), it goes out the normal way. The platform's own windows:
            // its retries come at its pace, however short a window is configured here.
            let window = entry.platform_window();
            let retries_over_in = job.retries_over_in(window);
            let (timer_hub, envelope) = (hub.clone(), envelope.clone());
            actix::spawn(async move {
                actix::clock::sleep((window * 2 + Duration::from_millis(500)).min(retries_over_in)).await;
                if let Some(held) = job.give_up() {
                    tracing::info!(channel = %envelope.channel, "No platform retry took the passive answer; pushing it.");
                    timer_hub.metrics.passive_fallback_pushes.with_label_values(&[envelope.channel.as_str()]).inc();
                    push_instead(&timer_hub, &envelope, held.parts).await;
                }
            });
            // Like every other delivery, over only once the answer has left: the session's
            // next answer must not overtake it. (Held for a reply, or pushed by the timer in
            // `auto` mode, where what is refused is parked: it reaches the user either way.)
            gone.wait().await;
            Reached::User
        }
    }
}

/// Sends the unsent parts of an answer the last run recorded (found pending at start).
pub async fn resend(hub: &Hub, envelope: &Envelope, mut parts: Vec<Delivery>) {
    let resumed_stream = hub.take_resumed_stream(&envelope.id);
    let streamed = resumed_stream.is_some();
    if let Some(stream) = resumed_stream {
        // The last run was streaming this answer into a message and stopped before writing its
        // first part there: it goes there now, as it would have, rather than as a second message
        // below the one left cut off.
        // Whether or not the channel streams new answers now (a pause after a refusal): this
        // message exists already; if it refuses the text, the answer goes as messages.
        let entry = hub.channels.get(&envelope.channel);
        let first = parts.first().filter(|part| part_index(&part.delivery_id) == Some(0));
        if let (Some(entry), Some(first)) = (entry, first) {
            let text = first.reply.text.clone();
            match live::finish_resumed(hub, entry.channel.clone(), envelope, stream, &text).await {
                Ok(()) => {
                    count_streamed(hub, envelope);
                    clear_delivered(hub.store.as_ref(), &parts.remove(0)).await;
                    if parts.is_empty() {
                        hub.finish(&envelope.id).await;
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(envelope = %envelope.id, %error, "Streamed message not finished; sending the answer whole.");
                }
            }
        }
    }
    // The platform's per-message quota holds for a resent answer too, counting the parts the
    // last run sent (those before the first one still pending).
    let parts = within_send_quota_of_rest(hub, envelope, parts);
    // As for a new answer (none of it shown: not even in a streamed message left cut off).
    if send_parts(hub, envelope, parts).await == Reached::NoOne && !streamed {
        forget_turn(hub, envelope).await;
    }
}

/// Sends an answer its passive job will not carry after all (no attempt will take it): the job
/// is closed, and the parts go within the send quota.
pub async fn push_instead(hub: &Hub, envelope: &Envelope, parts: Vec<Delivery>) -> Reached {
    hub.passive.close(&envelope.channel, &envelope.platform_message_id);
    let parts = within_send_quota(hub, envelope, parts);
    send_parts(hub, envelope, parts).await
}

/// Pushes, in the background, an answer taken back from its passive job because no attempt
/// will reply with it (the last one came too late, or the server is shutting down). The
/// session's next answer waits until it has left (`held.gone`).
pub fn spawn_push_held(hub: &Hub, job: Arc<passive::PassiveJob>, held: passive::HeldAnswer) {
    let hub = hub.clone();
    actix::spawn(async move {
        push_instead(&hub, job.envelope(), held.parts).await;
        drop(held.gone);
    });
}

/// Clears a part the platform took from the outbox (a failure only means it may be sent again
/// after a restart).
pub async fn clear_delivered(store: &dyn Store, part: &Delivery) {
    if let Err(error) = store.part_delivered(&part.delivery_id).await {
        tracing::error!(part = %part.delivery_id, %error, "Failed to clear a delivered part.");
    }
}

/// Keeps the parts the platform's send quota allows for one user message (公众号: 5 per message
/// in 48 h); the rest is parked behind the continue word, and the last part kept says so.
pub fn within_send_quota(hub: &Hub, envelope: &Envelope, parts: Vec<Delivery>) -> Vec<Delivery> {
    within_send_quota_after(hub, envelope, parts, 0)
}

/// [`within_send_quota`] for the rest of an answer whose earlier parts went out already (into a
/// streamed card, or before a restart): those before the first of `parts` count as sent.
pub fn within_send_quota_of_rest(hub: &Hub, envelope: &Envelope, parts: Vec<Delivery>) -> Vec<Delivery> {
    let already_sent = parts.first().and_then(|part| part_index(&part.delivery_id)).unwrap_or(0);
    within_send_quota_after(hub, envelope, parts, already_sent)
}

/// [`within_send_quota`] for the rest of an answer of which `already_sent` parts went out.
fn within_send_quota_after(
    hub: &Hub,
    envelope: &Envelope,
    mut parts: Vec<Delivery>,
    already_sent: usize,
) -> Vec<Delivery> {
    let Some(entry) = hub.channels.get(&envelope.channel) else {
        return parts;
    };
    // The quota is the send API's, which passive mode never calls: its answers are parked whole,
    // not with a hint inside them.
    if entry.reply_mode == ReplyMode::Passive {
        return parts;
    }
    let Some(quota) = entry
        .send_quota
        .filter(|quota| *quota > 0)
        .map(|quota| event_send_quota(envelope, quota).saturating_sub(already_sent))
    else {
        return parts;
    };
    if parts.len() <= quota {
        return parts;
    }
    let overflow: Vec<Delivery> = parts.drain(quota..).collect();
    // Parked before the start is sent: not to be shown ahead of it (see `reply_with_parked`).
    hub.passive.mark_leaving(&envelope.id);
    let limit = entry.channel.capabilities().max_part_bytes;
    park_behind_hint(hub, envelope, parts.last_mut().map(|last| &mut last.reply.text), limit, &overflow);
    parts
}

/// Parks `overflow` behind the continue word: `last`, the text shown last now, gets the hint
/// (cut to fit `limit` bytes with it; what the hint displaces is parked first).
pub fn park_behind_hint(
    hub: &Hub,
    envelope: &Envelope,
    last: Option<&mut String>,
    limit: usize,
    overflow: &[Delivery],
) {
    let rest = match last {
        Some(last) => cut_for_hint(hub, last, limit, overflow),
        None => joined(overflow),
    };
    park_text(hub, envelope, rest);
}

/// What [`park_behind_hint`] parks, without parking it: `last` gets the hint (cut to fit
/// `limit` bytes with it), and what it displaces goes before `overflow`.
pub fn cut_for_hint(hub: &Hub, last: &mut String, limit: usize, overflow: &[Delivery]) -> String {
    let (kept, spill) = fit_with_hint(last, &hub.messages.more_hint, limit);
    *last = kept;
    spill + &joined(overflow)
}

/// The texts of `parts`, as one text.
fn joined(parts: &[Delivery]) -> String {
    parts.iter().map(|part| part.reply.text.as_str()).collect::<Vec<_>>().join("\n\n")
}

/// Parks `text` of `envelope`'s answer for the user's next message, and counts it.
pub fn park_text(hub: &Hub, envelope: &Envelope, text: String) {
    hub.passive.park(&envelope.channel, &envelope.sender.id, &envelope.id, text);
    hub.metrics.answers.with_label_values(&[envelope.channel.as_str(), "parked"]).inc();
}

/// The send quota an envelope opens: a menu click, a follow or a QR scan opens only 3 messages
/// (公众号, within a minute), not the quota of a message the user typed.
fn event_send_quota(envelope: &Envelope, quota: usize) -> usize {
    use yizhan_channel_core::Event;
    match envelope.event() {
        Some(Event::MenuClick { .. } | Event::Subscribe { .. } | Event::Scan { .. }) => quota.min(EVENT_SEND_QUOTA),
        _ => quota,
    }
}

/// Messages the send API carries after a menu click, follow or scan (PROTOCOLS §2.5).
const EVENT_SEND_QUOTA: usize = 3;

/// `text` with `hint` on a new line, cut at a character boundary so the whole fits in `limit`
/// bytes; returns the text and what was cut off (to be shown later).
pub fn fit_with_hint(text: &str, hint: &str, limit: usize) -> (String, String) {
    let room = limit.saturating_sub(hint.len() + 1);
    let mut cut = text.len().min(room);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    (format!("{}\n{hint}", &text[..cut]), text[cut..].to_owned())
}

/// Sends recorded parts through the channel's actor, then finishes the envelope.
///
/// Where an answer can still leave in a webhook response, it is parked for the user's next
/// message instead of being lost: always in `passive` mode (the account has no send API: no
/// call is made), and in `auto` mode when the send failed for good (refused, misconfigured such
/// as a missing IP whitelist, or retries used up). In `push` mode no webhook response ever
/// carries an answer, so parked text would come out only on a continue word nobody asked for:
/// what the platform refuses there is recorded as failed, like what cannot be parked.
pub async fn send_parts(hub: &Hub, envelope: &Envelope, parts: Vec<Delivery>) -> Reached {
    let Some(entry) = hub.channels.get(&envelope.channel) else {
        hub.finish_without_channel(envelope).await;
        return Reached::User;
    };
    let channel = envelope.channel.as_str();
    if entry.passive_window.is_some() && entry.reply_mode == ReplyMode::Passive {
        if hub.passive.is_closing() {
            // Journaled with its parts pending, the answer is parked by the next start: no
            // parking is started that the exit could cut short, whatever the store keeps.
            hub.leave_for_next_start(envelope);
            return Reached::User;
        }
        park(hub, envelope, &parts, "passive mode has no send API");
        hub.finish(&envelope.id).await;
        return Reached::User;
    }
    let parkable = entry.passive_window.is_some() && entry.reply_mode == ReplyMode::Auto;
    let nothing_to_send = parts.is_empty();
    let mut reached = Reached::User;
    match entry.outbound.send(Deliver { parts }).await {
        // The store broke on the way (`deliver_all` stops there): the rest is the restart's.
        Ok(Err(_)) if left_to_the_restart(hub, envelope) => return Reached::User,
        Ok(Ok(())) if nothing_to_send => {}
        Ok(Ok(())) => hub.metrics.answers.with_label_values(&[channel, "push"]).inc(),
        Ok(Err(undelivered)) if parkable => {
            if hub.passive.is_closing() {
                // Left pending (not failed) rather than parked: the next start tries to send
                // it again, and parks it if the platform still refuses.
                tracing::info!(envelope = %envelope.id, error = %undelivered, "Answer not delivered while shutting down; left for the next start.");
                hub.leave_for_next_start(envelope);
                return Reached::User;
            }
            // Not recorded as failed: the parts stay pending until the finish, so that a crash
            // before it leaves them for the next start to park again (its parked copy is
            // forgotten then; recorded failed, the text would be gone with it). Parking logs why.
            park(hub, envelope, &undelivered.parts, &undelivered.error.to_string());
        }
        Ok(Err(undelivered)) => {
            record_failed(hub.store.as_ref(), &undelivered).await;
            tracing::warn!(envelope = %envelope.id, error = %undelivered, "Answer not delivered.");
            // Its first part refused: nothing of it was shown. Not after a transient failure:
            // a send that timed out or met a gateway's 5xx may have arrived (platforms with an
            // idempotency key report those as transient too).
            let first_failed = undelivered.parts.first().and_then(|part| part_index(&part.delivery_id)) == Some(0);
            let maybe_arrived =
                matches!(undelivered.error, ChannelError::Transient { .. } | ChannelError::MaybeDelivered(_));
            // What the send quota parked of it behind the continue word goes too, unless the
            // last part, the one that says so, may have arrived: the first failure stops the
            // rest, and the end of a torn or unseen answer would come out on the next 「继续」.
            // A part that may have arrived is already recorded and left out of the undelivered
            // ones; a transient failure leaves it first among them.
            let hint_may_have_arrived = match undelivered.error {
                ChannelError::MaybeDelivered(_) => undelivered.parts.is_empty(),
                ChannelError::Transient { .. } => undelivered.parts.len() == 1,
                _ => false,
            };
            if !hint_may_have_arrived {
                hub.passive.forget_parked_of(&envelope.channel, &envelope.sender.id, &envelope.id);
            }
            if first_failed && !maybe_arrived {
                reached = Reached::NoOne;
            }
        }
        Err(error) => {
            // Only when the delivery thread is gone (a stop): finishing would drop the parts,
            // which are still pending in the store for the next start to send.
            tracing::error!(envelope = %envelope.id, %error, "Delivery actor unavailable.");
            hub.leave_for_next_start(envelope);
            return Reached::User;
        }
    }
    hub.finish(&envelope.id).await;
    reached
}

/// Parks `parts` for the user's next message, whose passive reply (or the continue word) brings
/// them.
fn park(hub: &Hub, envelope: &Envelope, parts: &[Delivery], why: &str) {
    if parts.is_empty() {
        return;
    }
    tracing::warn!(channel = %envelope.channel, why, "Answer not sent; parked for the user's next message.");
    park_text(hub, envelope, joined(parts));
}

/// Show a typing indicator for the envelope's conversation (best effort).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Typing {
    /// The message being answered.
    pub envelope: Envelope,
}

/// How retries back off.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Sends of one part before giving up.
    pub max_attempts: u32,
    /// First delay; doubled each attempt.
    pub base_delay: Duration,
    /// Largest delay.
    pub max_delay: Duration,
}

impl From<&DeliveryConfig> for RetryPolicy {
    fn from(config: &DeliveryConfig) -> Self {
        Self {
            max_attempts: config.max_attempts.max(1),
            base_delay: Duration::from_millis(config.retry_base_delay_ms),
            max_delay: Duration::from_millis(config.retry_max_delay_ms.max(config.retry_base_delay_ms)),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`: exponential with jitter (between half the
    /// ceiling and all of it).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.base_delay.saturating_mul(1u32 << attempt.min(16)).min(self.max_delay);
        let millis = ceiling.as_millis() as u64;
        Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis.max(1)))
    }
}

/// The longest an account's sends wait for a platform that asked to wait (`retry_after`).
const LONGEST_ACCOUNT_PAUSE: Duration = Duration::from_secs(600);

/// Until when a channel's account must not be called: a platform's quota or rate limit
/// (公众号 45011, WeCom 45009, Feishu's 429) holds for the whole account, so when one send is
/// told to wait, every conversation's parts wait it out, without spending their attempts on
/// calls that would be refused the same way.
#[derive(Debug, Clone, Default)]
struct AccountPause(Arc<std::sync::Mutex<Option<actix::clock::Instant>>>);

impl AccountPause {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<actix::clock::Instant>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pauses the account for `wait` from now (at most [`LONGEST_ACCOUNT_PAUSE`]), unless it is
    /// paused for longer already.
    fn extend(&self, wait: Duration) {
        let until = actix::clock::Instant::now() + wait.min(LONGEST_ACCOUNT_PAUSE);
        let mut paused = self.lock();
        *paused = Some(paused.map_or(until, |earlier| earlier.max(until)));
    }

    /// Waits until the account is no longer paused. Each waiter adds its own share of up to a
    /// tenth of the pause, so that the parts held back do not all call at the same moment.
    async fn wait_out(&self) {
        loop {
            let now = actix::clock::Instant::now();
            let Some(until) = self.lock().filter(|until| *until > now) else { return };
            let tenth = (until - now).as_millis() as u64 / 10;
            let spread = Duration::from_millis(rand::thread_rng().gen_range(0..=tenth));
            actix::clock::sleep_until(until + spread).await;
        }
    }
}

/// Whether sends may start, and how many are on the wire: at a stop, the sends the platform is
/// already answering are waited for (a bounded time) and no new one starts, so that a part the
/// platform took is recorded sent rather than left pending for the next start to send again.
#[derive(Debug, Clone, Default)]
pub struct SendGate(Arc<SendGateState>);

#[derive(Debug, Default)]
struct SendGateState {
    closed: std::sync::atomic::AtomicBool,
    on_the_wire: std::sync::atomic::AtomicUsize,
}

/// One send on the wire, for as long as it lives.
struct OnTheWire<'a>(&'a SendGateState);

impl Drop for OnTheWire<'_> {
    fn drop(&mut self) {
        self.0.on_the_wire.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl SendGate {
    /// A send about to start, or `None` once the gate is closed. Counted before the check, so
    /// that a send [`close`](Self::close) did not see is one it stopped.
    fn enter(&self) -> Option<OnTheWire<'_>> {
        use std::sync::atomic::Ordering::SeqCst;
        self.0.on_the_wire.fetch_add(1, SeqCst);
        let sending = OnTheWire(&self.0);
        (!self.0.closed.load(SeqCst)).then_some(sending)
    }

    /// No send starts from now on (those on the wire go on).
    pub fn close(&self) {
        self.0.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits, at most `bound`, until no send is on the wire; whether none is.
    pub async fn wire_cleared(&self, bound: Duration) -> bool {
        let deadline = actix::clock::Instant::now() + bound;
        loop {
            if self.0.on_the_wire.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return true;
            }
            if actix::clock::Instant::now() >= deadline {
                return false;
            }
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// See the module docs.
pub struct ChannelActor {
    channel: Arc<dyn Channel>,
    store: Arc<dyn Store>,
    policy: RetryPolicy,
    metrics: Metrics,
    pause: AccountPause,
    gate: SendGate,
}

impl ChannelActor {
    /// The delivery actor for one channel account; its sends pass `gate`.
    pub fn new(
        channel: Arc<dyn Channel>,
        store: Arc<dyn Store>,
        policy: RetryPolicy,
        metrics: Metrics,
        gate: SendGate,
    ) -> Self {
        Self { channel, store, policy, metrics, pause: AccountPause::default(), gate }
    }
}

impl Actor for ChannelActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<Deliver> for ChannelActor {
    // Detached: delivery of one conversation must not wait for another's retries. Order within
    // one conversation is kept by its session, which awaits each delivery.
    type Result = ResponseFuture<Result<(), Undelivered>>;

    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) -> Self::Result {
        let channel = self.channel.clone();
        let store = self.store.clone();
        let policy = self.policy.clone();
        let metrics = self.metrics.clone();
        let (pause, gate) = (self.pause.clone(), self.gate.clone());
        Box::pin(async move {
            let sending = Sending { policy: &policy, pause: &pause, gate: &gate };
            deliver_all(channel.as_ref(), store.as_ref(), sending, &metrics, msg.parts).await
        })
    }
}

/// How long a typing indicator may take: one is sent per question, without the mailbox's
/// bound, so a (plugin) channel whose call never returns would otherwise pile them up.
const TYPING_TIMEOUT: Duration = Duration::from_secs(10);

impl Handler<Typing> for ChannelActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Typing, _: &mut Self::Context) -> Self::Result {
        let channel = self.channel.clone();
        Box::pin(async move { show_typing(channel.as_ref(), &msg.envelope).await })
    }
}

/// The channel's typing indicator, within [`TYPING_TIMEOUT`]; failures and panics are logged.
async fn show_typing(channel: &dyn Channel, envelope: &Envelope) {
    let typed = AssertUnwindSafe(async { channel.typing(envelope).await }).catch_unwind();
    match actix::clock::timeout(TYPING_TIMEOUT, typed).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => {
            let error = shortened(error);
            tracing::debug!(channel = %channel.id(), %error, "Typing indicator failed.");
        }
        Ok(Err(_panic)) => tracing::error!(channel = %channel.id(), "Typing indicator panicked (a bug)."),
        Err(_elapsed) => tracing::debug!(channel = %channel.id(), "Typing indicator timed out."),
    }
}

/// How many characters of a channel's reason are kept.
const MAX_REASON_CHARS: usize = 300;

/// `error` with its reason cut to [`MAX_REASON_CHARS`].
fn shortened(error: ChannelError) -> ChannelError {
    let cut = |reason: String| crate::llm::sse::truncate_chars(&reason, MAX_REASON_CHARS);
    match error {
        ChannelError::BadSignature(reason) => ChannelError::BadSignature(cut(reason)),
        ChannelError::Malformed(reason) => ChannelError::Malformed(cut(reason)),
        ChannelError::Unsupported(reason) => ChannelError::Unsupported(cut(reason)),
        ChannelError::Transient { reason, retry_after } => ChannelError::Transient { reason: cut(reason), retry_after },
        ChannelError::Refused { code, reason } => ChannelError::Refused { code, reason: cut(reason) },
        ChannelError::Misconfigured(reason) => ChannelError::Misconfigured(cut(reason)),
        ChannelError::MaybeDelivered(reason) => ChannelError::MaybeDelivered(cut(reason)),
    }
}

/// Records every undelivered part as failed, with the reason.
async fn record_failed(store: &dyn Store, undelivered: &Undelivered) {
    let reason = undelivered.error.to_string();
    for failed in &undelivered.parts {
        if let Err(store_error) = store.part_failed(&failed.delivery_id, &reason).await {
            tracing::error!(part = %failed.delivery_id, error = %store_error, "Failed to record a failed part.");
        }
    }
}

/// An answer (its first part) has left in the message it streamed into.
pub fn count_streamed(hub: &Hub, envelope: &Envelope) {
    hub.metrics.answers.with_label_values(&[envelope.channel.as_str(), "streamed"]).inc();
}

/// When a channel's sends may go: the retry policy, the account's pause, the stop's gate.
#[derive(Clone, Copy)]
struct Sending<'a> {
    policy: &'a RetryPolicy,
    pause: &'a AccountPause,
    gate: &'a SendGate,
}

async fn deliver_all(
    channel: &dyn Channel,
    store: &dyn Store,
    sending: Sending<'_>,
    metrics: &Metrics,
    parts: Vec<Delivery>,
) -> Result<(), Undelivered> {
    let channel_label = channel.id().to_string();
    let mut parts = parts.into_iter();
    while let Some(delivery) = parts.next() {
        if let Err(problem) = store.health() {
            // Sent now, the part could not be marked sent: the restart the store needs would
            // send it again (see `left_to_the_restart`).
            let error = ChannelError::Transient { reason: format!("not sent: {problem}"), retry_after: None };
            return Err(Undelivered { error, parts: std::iter::once(delivery).chain(parts).collect() });
        }
        let in_flight = GaugeHeld::new(metrics.delivery_in_flight.with_label_values(&[&channel_label]));
        let result = deliver_one(channel, store, sending, metrics, &channel_label, &delivery).await;
        drop(in_flight);
        match result {
            // Cleared from the outbox by `deliver_one`.
            Ok(()) => {}
            // Recorded failed by `deliver_one`; the rest goes as after any failure.
            Err(error @ ChannelError::MaybeDelivered(_)) => {
                return Err(Undelivered { error, parts: parts.collect() });
            }
            Err(error) => {
                let undelivered: Vec<Delivery> = std::iter::once(delivery).chain(parts).collect();
                return Err(Undelivered { error, parts: undelivered });
            }
        }
    }
    Ok(())
}

/// A part whose send failed for good with `error` after it may have arrived: recorded failed
/// at once (while its send still counts as on the wire), so that neither a park nor the next
/// start sends it again. Other errors are left to the caller.
async fn record_maybe_delivered(store: &dyn Store, delivery: &Delivery, error: &ChannelError) {
    if let ChannelError::MaybeDelivered(reason) = error {
        let why = format!("may have arrived: {reason}");
        if let Err(store_error) = store.part_failed(&delivery.delivery_id, &why).await {
            tracing::error!(part = %delivery.delivery_id, error = %store_error, "Failed to record a failed part.");
        }
    }
}

async fn deliver_one(
    channel: &dyn Channel,
    store: &dyn Store,
    sending: Sending<'_>,
    metrics: &Metrics,
    channel_label: &str,
    delivery: &Delivery,
) -> Result<(), ChannelError> {
    let Sending { policy, pause, gate } = sending;
    let mut attempt = 0;
    // A part that may have arrived is sent once more at most (see `MaybeDelivered`); why.
    let mut maybe_arrived: Option<String> = None;
    loop {
        pause.wait_out().await;
        // The process is stopping: the part stays pending for the next start (a send begun now
        // could be cut off after the platform took it, and be sent again then).
        // Held until the outcome is recorded: cut off before that, a delivered part would be
        // left pending.
        let Some(on_the_wire) = gate.enter() else { return std::future::pending().await };
        if let Some(reason) = &maybe_arrived {
            // Recorded failed before the one more send: should the process stop before that
            // send is answered, the next start must not send the part again. Its answer
            // replaces this record (delivered: gone; failed: its reason). Not sent if the store
            // cannot record it: the restart the store then needs would send it a third time.
            let why = format!("sent, and may have arrived: {reason}; one more send was under way");
            if let Err(store_error) = store.part_failed(&delivery.delivery_id, &why).await {
                tracing::error!(part = %delivery.delivery_id, error = %store_error, "Failed to record a part that may have arrived; not sent again.");
                metrics.deliveries.with_label_values(&[channel_label, "maybe_delivered"]).inc();
                return Err(ChannelError::MaybeDelivered(format!("{reason} (not sent again: {store_error})")));
            }
        }
        attempt += 1;
        // A panic in a channel's send (a plugin's bug) fails this part for good, recorded and
        // counted like any other failure, instead of ending the detached task unrecorded. Called
        // inside the guarded future: a `deliver` may panic before it returns its future.
        let sent =
            AssertUnwindSafe(async { channel.deliver(delivery).await }).catch_unwind().await.unwrap_or_else(|_panic| {
                Err(ChannelError::Unsupported(format!(
                    "channel {channel_label} panicked while sending this part (a bug)"
                )))
            });
        // A (plugin) channel's reason may quote a whole response body: it is logged at each try
        // and stored with a failed part.
        let sent = sent.map_err(shortened);
        // The platform said how long: the whole account waits (see `AccountPause`), whether or
        // not this part tries again.
        let asked_to_wait = match &sent {
            // A zero wait is no advice (`Retry-After: 0`): the backoff applies, or every retry
            // would go at once.
            Err(ChannelError::Transient { retry_after: Some(wait), .. }) if !wait.is_zero() => {
                pause.extend(*wait);
                Some(*wait)
            }
            _ => None,
        };
        match sent {
            Ok(_) => {
                metrics.deliveries.with_label_values(&[channel_label, "delivered"]).inc();
                clear_delivered(store, delivery).await;
                return Ok(());
            }
            // After a send that may have arrived, the one more send was this one: whatever
            // failed now, the part may be showing, and is not to be sent a third time.
            Err(error) if maybe_arrived.is_some() => {
                metrics.deliveries.with_label_values(&[channel_label, "maybe_delivered"]).inc();
                tracing::error!(channel = %channel_label, part = %delivery.delivery_id, attempt, %error, "Delivery failed for good after a send that may have arrived.");
                let error = ChannelError::MaybeDelivered(format!("{error} (after a send that may have arrived)"));
                record_maybe_delivered(store, delivery, &error).await;
                return Err(error);
            }
            Err(ChannelError::MaybeDelivered(reason)) if attempt < policy.max_attempts => {
                drop(on_the_wire);
                metrics.deliveries.with_label_values(&[channel_label, "retried"]).inc();
                let delay = policy.delay(attempt - 1);
                tracing::warn!(
                    channel = %channel_label,
                    part = %delivery.delivery_id,
                    attempt,
                    ?delay,
                    %reason,
                    "Delivery outcome unknown; sending once more, which may show the part twice."
                );
                maybe_arrived = Some(reason);
                actix::clock::sleep(delay).await;
            }
            Err(error) if error.is_retryable() && attempt < policy.max_attempts => {
                drop(on_the_wire);
                metrics.deliveries.with_label_values(&[channel_label, "retried"]).inc();
                match asked_to_wait {
                    Some(wait) => {
                        tracing::warn!(channel = %channel_label, attempt, ?wait, %error, "Delivery failed; the channel's sends wait as the platform asked.");
                    }
                    None => {
                        let delay = policy.delay(attempt - 1);
                        tracing::warn!(channel = %channel_label, attempt, ?delay, %error, "Delivery failed; retrying.");
                        actix::clock::sleep(delay).await;
                    }
                }
            }
            Err(error) => {
                metrics.deliveries.with_label_values(&[channel_label, error.label()]).inc();
                tracing::error!(
                    channel = %channel_label,
                    part = %delivery.delivery_id,
                    attempt,
                    %error,
                    "Delivery failed for good."
                );
                record_maybe_delivered(store, delivery, &error).await;
                return Err(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate of a process that is not stopping.
    static OPEN_GATE: std::sync::LazyLock<SendGate> = std::sync::LazyLock::new(SendGate::default);
    use yizhan_channel_core::{
        BoxFuture, ChannelId, Conversation, ConversationKind, DeliveryReceipt, ReplyHandle, Sender, WebhookOutcome,
        WebhookRequest,
    };

    /// How a [`Misbehaves`] channel's calls go wrong: stand-ins for a plugin's bugs.
    #[derive(Clone, Copy, PartialEq)]
    enum Misbehaviour {
        /// Its send's future panics when polled.
        PanicsWhileSending,
        /// Its `deliver` panics before it returns a future.
        PanicsBeforeSending,
        /// Its send is refused with the platform's whole (long) response as the reason.
        QuotesAWholeBody,
    }

    struct Misbehaves(ChannelId, Misbehaviour, Arc<std::sync::atomic::AtomicBool>);

    /// Sets its flag when dropped.
    struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Channel for Misbehaves {
        fn id(&self) -> &ChannelId {
            &self.0
        }
        fn kind(&self) -> &str {
            "misbehaves"
        }
        fn handle_webhook(&self, _: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
            Err(ChannelError::Unsupported("no webhooks".into()))
        }
        fn deliver<'a>(&'a self, _: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
            match self.1 {
                Misbehaviour::PanicsWhileSending => Box::pin(async { panic!("a bug in a channel's send") }),
                Misbehaviour::PanicsBeforeSending => panic!("a bug before a channel's send"),
                Misbehaviour::QuotesAWholeBody => {
                    Box::pin(async { Err(ChannelError::Refused { code: 400, reason: "长".repeat(100_000) }) })
                }
            }
        }
        /// Never returns; notes when it is given up on.
        fn typing<'a>(&'a self, _: &'a Envelope) -> BoxFuture<'a, Result<(), ChannelError>> {
            let dropped = SetOnDrop(self.2.clone());
            Box::pin(async move {
                let _dropped = dropped;
                std::future::pending().await
            })
        }
    }

    fn misbehaving(how: Misbehaviour) -> Misbehaves {
        Misbehaves(ChannelId::parse("p").unwrap_or_else(|e| panic!("{e}")), how, Default::default())
    }

    fn a_part() -> Delivery {
        Delivery {
            delivery_id: "e-0".into(),
            channel: ChannelId::parse("p").unwrap_or_else(|e| panic!("{e}")),
            conversation: Conversation { kind: ConversationKind::Direct, id: "u".into() },
            recipient: Sender { id: "u".into(), name: None },
            reply_handle: ReplyHandle::default(),
            reply: Reply::text("答"),
        }
    }

    #[tokio::test]
    async fn a_channel_that_panics_while_sending_fails_the_part_recorded_and_counted() {
        for how in [Misbehaviour::PanicsWhileSending, Misbehaviour::PanicsBeforeSending] {
            let (metrics, store) = (Metrics::new(), crate::store::MemoryStore::new(10));
            let policy = RetryPolicy { max_attempts: 3, base_delay: Duration::ZERO, max_delay: Duration::ZERO };
            let pause = AccountPause::default();
            let result = deliver_all(
                &misbehaving(how),
                &store,
                Sending { policy: &policy, pause: &pause, gate: &OPEN_GATE },
                &metrics,
                vec![a_part()],
            )
            .await;
            assert!(
                matches!(&result, Err(Undelivered { error: ChannelError::Unsupported(_), parts }) if parts.len() == 1)
            );
            assert_eq!(metrics.deliveries.with_label_values(&["p", "unsupported"]).get(), 1);
            assert_eq!(metrics.delivery_in_flight.with_label_values(&["p"]).get(), 0);
        }
    }

    #[tokio::test]
    async fn a_channels_reason_is_cut_before_it_is_logged_or_stored() {
        let (metrics, store) = (Metrics::new(), crate::store::MemoryStore::new(10));
        let policy = RetryPolicy { max_attempts: 1, base_delay: Duration::ZERO, max_delay: Duration::ZERO };
        let channel = misbehaving(Misbehaviour::QuotesAWholeBody);
        let result = deliver_all(
            &channel,
            &store,
            Sending { policy: &policy, pause: &AccountPause::default(), gate: &OPEN_GATE },
            &metrics,
            vec![a_part()],
        )
        .await;
        let Err(Undelivered { error: ChannelError::Refused { reason, .. }, .. }) = result else {
            panic!("not refused: {result:?}")
        };
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS + 1, "cut, with an ellipsis");
    }

    #[tokio::test(start_paused = true)]
    async fn a_typing_indicator_that_never_returns_is_given_up_on() {
        let channel = misbehaving(Misbehaviour::QuotesAWholeBody);
        let envelope = crate::store::test_envelope("m");
        let shown = tokio::time::timeout(TYPING_TIMEOUT * 2, show_typing(&channel, &envelope)).await;
        assert!(shown.is_ok(), "still waiting after twice the timeout");
        assert!(channel.2.load(std::sync::atomic::Ordering::SeqCst), "its future was not dropped");
    }

    #[test]
    fn a_hint_always_fits_and_nothing_is_lost() {
        let (kept, spill) = fit_with_hint("你好世界", "（继续）", 14);
        assert!(kept.len() <= 14, "{kept}");
        assert!(kept.ends_with("\n（继续）"));
        assert_eq!(format!("{}{spill}", kept.trim_end_matches("\n（继续）")), "你好世界");
        let (kept, spill) = fit_with_hint("短", "（继续）", 100);
        assert_eq!((kept.as_str(), spill.as_str()), ("短\n（继续）", ""));
    }

    #[test]
    fn retry_delays_grow_and_stay_within_bounds() {
        let policy = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1_000),
        };
        for attempt in 0..20 {
            let delay = policy.delay(attempt);
            assert!(delay <= Duration::from_millis(1_000), "{delay:?}");
        }
        assert!(policy.delay(0) <= Duration::from_millis(100));
        assert!(policy.delay(3) >= Duration::from_millis(400));
    }

    /// A send whose outcome is not known (a 公众号 send timing out, say), then `.2` for every
    /// later one; with `.2` `None`, later sends never return (each tells `.3` it began).
    struct NeverKnown(ChannelId, std::sync::atomic::AtomicUsize, Option<ChannelError>, tokio::sync::Notify);

    fn never_known(id: &ChannelId, later: Option<ChannelError>) -> NeverKnown {
        NeverKnown(id.clone(), Default::default(), later, Default::default())
    }

    impl Channel for NeverKnown {
        fn id(&self) -> &ChannelId {
            &self.0
        }
        fn kind(&self) -> &str {
            "never_known"
        }
        fn handle_webhook(&self, _: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
            Err(ChannelError::Unsupported("no webhooks".into()))
        }
        fn deliver<'a>(&'a self, _: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
            if self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                return Box::pin(async { Err(ChannelError::MaybeDelivered("timed out".into())) });
            }
            let Some(error) = self.2.clone() else {
                self.3.notify_one();
                return Box::pin(std::future::pending());
            };
            Box::pin(async move { Err(error) })
        }
    }

    /// A SQLite store (in its own directory) holding a message answered in two parts on
    /// `channel`, and a way to make part `index` of that answer.
    async fn answered_in_two_parts(
        channel: &ChannelId,
    ) -> (crate::store::SqliteStore, std::path::PathBuf, impl Fn(usize) -> Delivery) {
        let envelope = crate::store::test_envelope("m1");
        let (channel, envelope_id) = (channel.clone(), envelope.id.clone());
        let part = move |index: usize| Delivery {
            delivery_id: part_id(&envelope_id, index),
            channel: channel.clone(),
            conversation: Conversation { kind: ConversationKind::Direct, id: "u".into() },
            recipient: Sender { id: "u".into(), name: None },
            reply_handle: ReplyHandle::default(),
            reply: Reply::text(format!("答{index}")),
        };
        let dir = std::env::temp_dir().join(format!("yizhan-maybe-{}-{}", std::process::id(), envelope.id));
        let store = crate::store::SqliteStore::open(&dir.join("y.db"), crate::store::SqliteOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(store.accept(&envelope, Duration::from_secs(60)).await.is_ok());
        assert!(store.record_answer(&envelope.id, "k", None, &[part(0), part(1)]).await.is_ok());
        (store, dir, part)
    }

    /// Sent twice at most, then recorded failed, and not among the parts handed back to be
    /// parked or left for the next start; the parts behind it are.
    #[tokio::test(start_paused = true)]
    async fn a_part_that_may_have_arrived_is_sent_twice_then_failed_and_the_rest_handed_back() {
        let id = ChannelId::parse("n").unwrap_or_else(|e| panic!("{e}"));
        let (store, dir, part) = answered_in_two_parts(&id).await;
        let metrics = Metrics::new();
        let policy = RetryPolicy { max_attempts: 12, base_delay: Duration::ZERO, max_delay: Duration::ZERO };
        // Whatever the second send meets (a proxy's outage, a quota WeChat counted the first
        // against), the part is not sent a third time.
        for then in [
            ChannelError::MaybeDelivered("timed out again".into()),
            ChannelError::Transient { reason: "503".into(), retry_after: None },
        ] {
            let channel = never_known(&id, Some(then));
            let other = crate::store::MemoryStore::new(10);
            let result = deliver_all(
                &channel,
                &other,
                Sending { policy: &policy, pause: &AccountPause::default(), gate: &OPEN_GATE },
                &Metrics::new(),
                vec![part(0)],
            )
            .await;
            assert_eq!(channel.1.load(std::sync::atomic::Ordering::SeqCst), 2);
            assert!(
                matches!(result, Err(Undelivered { error: ChannelError::MaybeDelivered(_), ref parts }) if parts.is_empty()),
                "{result:?}"
            );
        }
        // Not sent again when the store cannot record that it may have arrived: the restart the
        // store then needs would send it once more.
        let refusing = crate::store::MemoryStore::new(10);
        refusing.refuse_writes.store(true, std::sync::atomic::Ordering::SeqCst);
        let then = ChannelError::Transient { reason: "503".into(), retry_after: None };
        let channel = never_known(&id, Some(then));
        let pause = AccountPause::default();
        let sending = Sending { policy: &policy, pause: &pause, gate: &OPEN_GATE };
        let result = deliver_all(&channel, &refusing, sending, &Metrics::new(), vec![part(0)]).await;
        assert_eq!(channel.1.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(matches!(result, Err(Undelivered { error: ChannelError::MaybeDelivered(_), .. })), "{result:?}");
        let channel = never_known(&id, Some(ChannelError::MaybeDelivered("again".into())));
        let result = deliver_all(
            &channel,
            &store,
            Sending { policy: &policy, pause: &AccountPause::default(), gate: &OPEN_GATE },
            &metrics,
            vec![part(0), part(1)],
        )
        .await;
        assert_eq!(channel.1.load(std::sync::atomic::Ordering::SeqCst), 2);
        match result {
            Err(Undelivered { error: ChannelError::MaybeDelivered(_), parts }) => assert_eq!(parts, [part(1)]),
            other => panic!("{other:?}"),
        }
        let unfinished = store.unfinished().await.unwrap_or_default();
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].pending_parts.as_deref(), Some(&[part(1)][..]));
        assert_eq!(metrics.deliveries.with_label_values(&["n", "maybe_delivered"]).get(), 1);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The stop (or a crash) comes while the one more send of a part that may have arrived is
    /// under way: the next start does not send that part again, only the parts behind it.
    #[tokio::test]
    async fn a_part_that_may_have_arrived_is_not_sent_again_by_the_next_start() {
        let id = ChannelId::parse("h").unwrap_or_else(|e| panic!("{e}"));
        let (store, dir, part) = answered_in_two_parts(&id).await;
        let policy = RetryPolicy { max_attempts: 12, base_delay: Duration::ZERO, max_delay: Duration::ZERO };
        let channel = never_known(&id, None);
        let (pause, metrics) = (AccountPause::default(), Metrics::new());
        tokio::select! {
            result = deliver_all(&channel, &store, Sending { policy: &policy, pause: &pause, gate: &OPEN_GATE }, &metrics, vec![part(0), part(1)]) => {
                panic!("the second send never returns, yet: {result:?}")
            }
            // Dropping the delivery here is the stop cutting it off.
            () = channel.3.notified() => {}
        }
        let unfinished = store.unfinished().await.unwrap_or_default();
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].pending_parts.as_deref(), Some(&[part(1)][..]));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Takes every send, each once it is let go; counts them and says when each began.
    struct HeldSends(ChannelId, std::sync::atomic::AtomicUsize, tokio::sync::Notify, tokio::sync::Notify);

    impl Channel for HeldSends {
        fn id(&self) -> &ChannelId {
            &self.0
        }
        fn kind(&self) -> &str {
            "held_sends"
        }
        fn handle_webhook(&self, _: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
            Err(ChannelError::Unsupported("no webhooks".into()))
        }
        fn deliver<'a>(&'a self, _: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.2.notify_one();
            Box::pin(async {
                self.3.notified().await;
                Ok(DeliveryReceipt::default())
            })
        }
    }

    /// At a stop, the send the platform is answering is waited for and recorded, and the parts
    /// behind it are not begun: they are left pending for the next start, which sends each
    /// once.
    #[tokio::test]
    async fn a_stop_waits_for_the_send_on_the_wire_and_begins_no_other() {
        let id = ChannelId::parse("w").unwrap_or_else(|e| panic!("{e}"));
        let (store, dir, part) = answered_in_two_parts(&id).await;
        let policy = RetryPolicy { max_attempts: 3, base_delay: Duration::ZERO, max_delay: Duration::ZERO };
        let channel = HeldSends(id.clone(), Default::default(), Default::default(), Default::default());
        let (pause, gate, metrics) = (AccountPause::default(), SendGate::default(), Metrics::new());
        let sending = Sending { policy: &policy, pause: &pause, gate: &gate };
        let stop = async {
            channel.2.notified().await;
            gate.close();
            assert!(!gate.wire_cleared(Duration::ZERO).await, "the first part's send is on the wire");
            channel.3.notify_one();
            assert!(gate.wire_cleared(Duration::from_secs(30)).await);
        };
        tokio::select! {
            result = deliver_all(&channel, &store, sending, &metrics, vec![part(0), part(1)]) => {
                panic!("the second part was sent after the stop: {result:?}")
            }
            () = stop => {}
        }
        assert_eq!(channel.1.load(std::sync::atomic::Ordering::SeqCst), 1);
        let unfinished = store.unfinished().await.unwrap_or_default();
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].pending_parts.as_deref(), Some(&[part(1)][..]), "the first part is recorded sent");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Answers its first send with `Retry-After: 0`, then takes everything; records when.
    struct ZeroWaitOnce(ChannelId, std::sync::Mutex<Vec<actix::clock::Instant>>);

    impl Channel for ZeroWaitOnce {
        fn id(&self) -> &ChannelId {
            &self.0
        }
        fn kind(&self) -> &str {
            "zero_wait"
        }
        fn handle_webhook(&self, _: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
            Err(ChannelError::Unsupported("no webhooks".into()))
        }
        fn deliver<'a>(&'a self, _: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
            let mut calls = self.1.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            calls.push(actix::clock::Instant::now());
            let first = calls.len() == 1;
            Box::pin(async move {
                if first {
                    Err(ChannelError::Transient { reason: "503".into(), retry_after: Some(Duration::ZERO) })
                } else {
                    Ok(DeliveryReceipt::default())
                }
            })
        }
    }

    /// `Retry-After: 0` is no advice: the backoff still spaces the retries.
    #[tokio::test(start_paused = true)]
    async fn a_zero_retry_after_leaves_the_backoff_in_place() {
        let id = ChannelId::parse("z").unwrap_or_else(|e| panic!("{e}"));
        let channel = ZeroWaitOnce(id.clone(), std::sync::Mutex::default());
        let part = Delivery {
            delivery_id: "e-0".into(),
            channel: id,
            conversation: Conversation { kind: ConversationKind::Direct, id: "u".into() },
            recipient: Sender { id: "u".into(), name: None },
            reply_handle: ReplyHandle::default(),
            reply: Reply::text("答"),
        };
        let policy =
            RetryPolicy { max_attempts: 3, base_delay: Duration::from_secs(2), max_delay: Duration::from_secs(2) };
        let (metrics, store) = (Metrics::new(), crate::store::MemoryStore::new(10));
        let sent = deliver_all(
            &channel,
            &store,
            Sending { policy: &policy, pause: &AccountPause::default(), gate: &OPEN_GATE },
            &metrics,
            vec![part],
        )
        .await;
        assert!(sent.is_ok());
        let calls = channel.1.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        assert_eq!(calls.len(), 2);
        assert!(calls[1] - calls[0] >= Duration::from_secs(1), "{:?}", calls[1] - calls[0]);
    }

    /// Sends `Transient { retry_after: 60 s }` to its first call, then takes everything.
    struct QuotaOnce {
        id: ChannelId,
        calls: std::sync::Mutex<Vec<(String, actix::clock::Instant)>>,
    }

    impl Channel for QuotaOnce {
        fn id(&self) -> &ChannelId {
            &self.id
        }
        fn kind(&self) -> &str {
            "quota"
        }
        fn handle_webhook(&self, _: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
            Err(ChannelError::Unsupported("no webhooks".into()))
        }
        fn deliver<'a>(&'a self, part: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
            let mut calls = self.calls.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            calls.push((part.delivery_id.clone(), actix::clock::Instant::now()));
            let first = calls.len() == 1;
            Box::pin(async move {
                if first {
                    Err(ChannelError::Transient {
                        reason: "per-minute quota".into(),
                        retry_after: Some(Duration::from_secs(60)),
                    })
                } else {
                    Ok(DeliveryReceipt::default())
                }
            })
        }
    }

    /// A quota pause holds for the account: a second conversation's part, sent while the first
    /// waits it out, waits too instead of spending an attempt; both go once the minute is over,
    /// whatever `retry_max_delay_ms` says. Also when the refused send was its part's last try.
    #[tokio::test(start_paused = true)]
    async fn a_platform_pause_holds_every_conversation_of_the_account_for_as_long_as_asked() {
        for max_attempts in [2, 1] {
            let id = ChannelId::parse("q").unwrap_or_else(|e| panic!("{e}"));
            let channel = QuotaOnce { id: id.clone(), calls: std::sync::Mutex::default() };
            let part = |delivery_id: &str, user: &str| Delivery {
                delivery_id: delivery_id.into(),
                channel: id.clone(),
                conversation: Conversation { kind: ConversationKind::Direct, id: user.into() },
                recipient: Sender { id: user.into(), name: None },
                reply_handle: ReplyHandle::default(),
                reply: Reply::text("答"),
            };
            let (metrics, store) = (Metrics::new(), crate::store::MemoryStore::new(10));
            let policy = RetryPolicy { max_attempts, base_delay: Duration::ZERO, max_delay: Duration::from_secs(1) };
            let pause = AccountPause::default();
            let started = actix::clock::Instant::now();
            let first = deliver_all(
                &channel,
                &store,
                Sending { policy: &policy, pause: &pause, gate: &OPEN_GATE },
                &metrics,
                vec![part("a-0", "u1")],
            );
            let second = async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                deliver_all(
                    &channel,
                    &store,
                    Sending { policy: &policy, pause: &pause, gate: &OPEN_GATE },
                    &metrics,
                    vec![part("b-0", "u2")],
                )
                .await
            };
            let (first, second) = tokio::join!(first, second);
            assert_eq!(first.is_ok(), max_attempts > 1);
            assert!(second.is_ok());
            let calls = channel.calls.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
            let ids: Vec<&str> = calls.iter().map(|(id, _)| id.as_str()).collect();
            assert_eq!(ids.len(), max_attempts as usize + 1, "{ids:?}");
            assert_eq!(ids[0], "a-0");
            for (id, at) in &calls[1..] {
                assert!(*at - started >= Duration::from_secs(60), "{id} sent {:?} after the start", *at - started);
            }
        }
    }
}
