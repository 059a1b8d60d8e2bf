//! One actor per conversation: serialises that user's turns, keeps the history window, and
//! retires after a spell of silence.
//!
//! Invariants (see STYLE §3.3 for why each exists):
//! - one turn at a time per conversation, in arrival order; conversations run concurrently;
//! - a message that races a session's retirement is never lost, and never starts a second
//!   session beside it: the registry queues while holding the map entry's lock, a session
//!   deregisters only if its inbox is still empty under that same lock, and then lets a
//!   `Retire` travel through its mailbox behind everything already queued;
//! - a turn that panics (a bug) ends that turn only: the session goes on with the jobs queued
//!   behind it, in order;
//! - a session's idle check runs on a `run_interval`, which also keeps the actor alive until it
//!   stops itself (an actor with no external `Addr` and no items would otherwise stop with mail
//!   in its mailbox).

mod window;

pub use window::history_window;

use crate::config::ReplyMode;
use crate::delivery::{self, AnswerText, Typing};
use crate::hub::Hub;
use crate::llm::{ChatMessage, Complete, CompletionRequest, LlmError, Role};
use crate::routing::{SessionKey, Work};
use crate::store::Turn;
use actix::clock::Instant;
use actix::dev::SendError;
use actix::prelude::*;
use dashmap::DashMap;
use futures_util::FutureExt;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use yizhan_channel_core::Envelope;

/// One envelope and what it asks for.
#[derive(Debug)]
pub struct Job {
    /// The message.
    pub envelope: Envelope,
    /// What to do.
    pub work: Work,
}

/// Second phase of retirement: stop once everything queued before it is done.
#[derive(Message)]
#[rtype(result = "()")]
struct Retire;

/// Look at the inbox: jobs arrived while the session was idle.
#[derive(Message)]
#[rtype(result = "()")]
struct Wake;

/// Why a job could not be handed to its session.
#[derive(Debug)]
pub enum DispatchError {
    /// The conversation already has `max_pending` jobs waiting; the job comes back so the
    /// caller can answer busy.
    Overloaded(Box<Job>),
    /// A new conversation while `max_sessions` are kept already; the job comes back so the
    /// caller can answer busy.
    TooManySessions(Box<Job>),
}

/// A conversation's waiting jobs, shared by the registry (which appends) and the session
/// (which takes). Jobs that arrive while a turn is running are only appended: no mailbox
/// message and no wake-up of the session's thread. It also makes `max_pending` an exact bound
/// on waiting jobs, independent of the actor mailbox.
#[derive(Default)]
struct Inbox {
    jobs: VecDeque<Job>,
    /// The session will look at the inbox again (a `Wake` is queued or a turn is running).
    /// NOTE: read and written only under the inbox lock, which is what makes a wake-up never
    /// lost: the session clears it in the same critical section in which it finds no job.
    awake: bool,
}

type SharedInbox = Arc<std::sync::Mutex<Inbox>>;

fn lock(inbox: &SharedInbox) -> std::sync::MutexGuard<'_, Inbox> {
    inbox.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Entry {
    addr: Addr<Session>,
    generation: u64,
    inbox: SharedInbox,
}

/// Finds or starts the session for a key. Cheap to clone.
#[derive(Clone)]
pub struct SessionRegistry(Arc<RegistryInner>);

struct RegistryInner {
    sessions: DashMap<SessionKey, Entry, foldhash::fast::RandomState>,
    /// Entries in `sessions`, kept beside it: `DashMap::len` locks every shard.
    count: AtomicU64,
    generations: AtomicU64,
    hub: Hub,
    idle_timeout: Duration,
    /// Threads sessions run on, chosen by key hash. Empty: the caller's arbiter.
    arbiters: Vec<ArbiterHandle>,
}

impl SessionRegistry {
    /// An empty registry whose sessions retire after `idle_timeout` of silence and run on
    /// `arbiters` (spread by key), or on the dispatching arbiter when `arbiters` is empty.
    ///
    /// Dedicated arbiters keep session work (history, prompts, LLM streaming) off the HTTP
    /// workers, so acknowledgements stay fast, and let sessions finish their turn while the
    /// HTTP server shuts down.
    pub fn new(hub: Hub, idle_timeout: Duration, arbiters: Vec<ArbiterHandle>) -> Self {
        Self(Arc::new(RegistryInner {
            sessions: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            count: AtomicU64::new(0),
            generations: AtomicU64::new(0),
            hub,
            idle_timeout,
            arbiters,
        }))
    }

    /// Sessions alive right now.
    pub fn len(&self) -> usize {
        self.0.sessions.len()
    }

    /// Whether no session is alive.
    pub fn is_empty(&self) -> bool {
        self.0.sessions.is_empty()
    }

    /// Starts a session on `inbox` (a fresh one, or a dead session's, whose jobs it inherits).
    fn start_session(&self, key: &SessionKey, inbox: SharedInbox) -> Entry {
        let generation = self.0.generations.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            key: key.clone(),
            generation,
            registry: self.clone(),
            inbox: inbox.clone(),
            busy: false,
            retiring: false,
            last_activity: Instant::now(),
            history: None,
        };
        let addr = if self.0.arbiters.is_empty() {
            session.start()
        } else {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut hasher);
            let arbiter = &self.0.arbiters[(hasher.finish() % self.0.arbiters.len() as u64) as usize];
            Session::start_in_arbiter(arbiter, move |_| session)
        };
        Entry { addr, generation, inbox }
    }

    /// Routes a job to its session, starting one if needed. Never blocks. Without dedicated
    /// arbiters it must run inside an actix system.
    pub fn dispatch(&self, key: SessionKey, job: Job) -> Result<(), DispatchError> {
        self.enqueue(key, job, self.0.hub.session.max_pending, self.0.hub.session.max_sessions)
    }

    /// [`dispatch`](Self::dispatch) for a message the last run accepted and did not answer:
    /// not held to `max_pending`, which it was accepted within (a conversation may come back
    /// with one more open message than that: the one that was being answered).
    pub fn dispatch_resumed(&self, key: SessionKey, job: Job) -> Result<(), DispatchError> {
        self.enqueue(key, job, usize::MAX, usize::MAX)
    }

    fn enqueue(&self, key: SessionKey, job: Job, max_pending: usize, max_sessions: usize) -> Result<(), DispatchError> {
        // NOTE: everything below runs while holding the entry (shard) lock. `deregister` takes
        // the same lock, so no job can be appended to a session that already deregistered, and
        // a `Wake` can never be queued behind a session's `Retire`.
        let mut entry = match self.0.sessions.entry(key.clone()) {
            dashmap::mapref::entry::Entry::Occupied(occupied) => occupied.into_ref(),
            dashmap::mapref::entry::Entry::Vacant(vacant) => {
                // Every session holds an actor and its history window until it retires: a
                // flood of new users must not hold unbounded memory. (A bound checked outside
                // the other shards' locks: a burst may pass it by a few.)
                if self.0.count.load(Ordering::Relaxed) >= u64::try_from(max_sessions).unwrap_or(u64::MAX) {
                    return Err(DispatchError::TooManySessions(Box::new(job)));
                }
                let inserted = vacant.insert(self.start_session(&key, SharedInbox::default()));
                self.0.count.fetch_add(1, Ordering::Relaxed);
                inserted
            }
        };
        let wake = {
            let mut inbox = lock(&entry.inbox);
            if inbox.jobs.len() >= max_pending {
                return Err(DispatchError::Overloaded(Box::new(job)));
            }
            inbox.jobs.push_back(job);
            !std::mem::replace(&mut inbox.awake, true)
        };
        if wake {
            if let Err(SendError::Closed(_)) = entry.addr.try_send(Wake) {
                // The actor died without deregistering (a bug; even a panic runs `stopped`): a
                // successor takes over its inbox, jobs included.
                tracing::error!(session = %key, "A session stopped without retiring (a bug); a new one takes over its queue.");
                let inbox = entry.inbox.clone();
                *entry = self.start_session(&key, inbox);
                let _ = entry.addr.try_send(Wake);
            }
            // `Full` cannot happen: a session has at most one `Wake` and one `Retire` queued.
        }
        Ok(())
    }

    /// Forgets `key` only if it still points at `generation`.
    fn deregister(&self, key: &SessionKey, generation: u64) {
        if self.0.sessions.remove_if(key, |_, entry| entry.generation == generation).is_some() {
            self.0.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Forgets `key` if it still points at `generation` and nothing waits in its inbox, checked
    /// under the map entry's lock that `dispatch` holds while it queues a job. Returns false if
    /// a job got in first (the session must then stay); true if it was forgotten or was
    /// already replaced.
    fn deregister_if_idle(&self, key: &SessionKey, generation: u64) -> bool {
        let mut still_needed = false;
        let removed = self.0.sessions.remove_if(key, |_, entry| {
            if entry.generation != generation {
                return false;
            }
            let inbox = lock(&entry.inbox);
            still_needed = inbox.awake || !inbox.jobs.is_empty();
            !still_needed
        });
        if removed.is_some() {
            self.0.count.fetch_sub(1, Ordering::Relaxed);
        }
        !still_needed
    }
}

/// See the module docs.
pub struct Session {
    key: SessionKey,
    /// Which registry entry this actor is; a successor has another.
    generation: u64,
    registry: SessionRegistry,
    /// Jobs waiting behind the one being worked on, shared with the registry.
    inbox: SharedInbox,
    busy: bool,
    retiring: bool,
    /// tokio's clock, so paused-time tests can move it.
    last_activity: Instant,
    /// The conversation so far, loaded from the store on the first question.
    history: Option<window::Cached>,
}

impl Session {
    fn hub(&self) -> &Hub {
        &self.registry.0.hub
    }

    /// Runs every `idle_timeout / 4`; reads a timestamp instead of cancelling timers.
    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        let idle = self.last_activity.elapsed() >= self.registry.0.idle_timeout;
        if self.retiring || self.busy || !idle {
            return;
        }
        // Phase 1: stop new traffic from finding us, unless a job slipped in since the turn
        // ended (checked under the map lock, or a second session could start beside us).
        // Phase 2 (`Retire`) runs after every message that was already in the mailbox.
        if !self.registry.deregister_if_idle(&self.key, self.generation) {
            return;
        }
        self.retiring = true;
        ctx.address().do_send(Retire);
    }

    /// Starts the next job if none is running.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let next = {
            let mut inbox = lock(&self.inbox);
            let next = inbox.jobs.pop_front();
            inbox.awake = next.is_some();
            next
        };
        let Some(job) = next else {
            if self.retiring {
                ctx.stop();
            }
            return;
        };
        self.busy = true;
        let (hub, key, history) = (self.hub().clone(), self.key.clone(), self.history.take());
        // Kept to answer the message if its turn panics.
        let envelope = job.envelope.clone();
        // A panic in a turn (a bug) would otherwise stop the actor and drop the jobs queued
        // behind it; caught here, the conversation goes on in order with the next job.
        let turn = async move {
            match AssertUnwindSafe(run_job(hub.clone(), key.clone(), job, history)).catch_unwind().await {
                Ok(history) => history,
                Err(_panic) => {
                    tracing::error!(
                        session = %key,
                        envelope = %envelope.id,
                        "A turn panicked (a bug); its message is answered with the apology."
                    );
                    // Answered and finished, not left open: a restart would run the same turn
                    // into the same panic. Awaited here, so it goes out before the next answer.
                    let apology =
                        delivery::answer(&hub, &envelope, key.as_str(), None, hub.messages.apology.clone().into());
                    if AssertUnwindSafe(apology).catch_unwind().await.is_err() {
                        tracing::error!(
                            session = %key,
                            envelope = %envelope.id,
                            "The apology panicked too; the message is finished unanswered."
                        );
                        // Nothing will be offered to a 公众号 attempt waiting for it.
                        hub.passive.close(&envelope.channel, &envelope.platform_message_id);
                        hub.finish(&envelope.id).await;
                    }
                    // Reloaded from the store by the next turn.
                    None
                }
            }
        };
        turn.into_actor(self)
            .map(move |history, act, ctx| {
                act.history = history;
                act.busy = false;
                act.last_activity = Instant::now();
                act.pump(ctx);
            })
            .spawn(ctx);
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Only `Wake` and `Retire` travel through the mailbox; jobs wait in the inbox.
        ctx.set_mailbox_capacity(4);
        let period = (self.registry.0.idle_timeout / 4).max(Duration::from_millis(1));
        ctx.run_interval(period, Self::check_idle);
        self.hub().metrics.sessions_alive.inc();
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.hub().metrics.sessions_alive.dec();
        // Normally already done by `check_idle`; this covers a stop for any other reason.
        self.registry.deregister(&self.key, self.generation);
    }
}

impl Handler<Wake> for Session {
    type Result = ();

    fn handle(&mut self, _: Wake, ctx: &mut Self::Context) {
        self.last_activity = Instant::now();
        self.pump(ctx);
    }
}

impl Handler<Retire> for Session {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Self::Context) {
        if !self.busy && lock(&self.inbox).jobs.is_empty() {
            ctx.stop();
        }
        // Otherwise `pump` stops the actor once the queue drains.
    }
}

/// How many of its latest turns a session loads: the prompt's `history_max_turns`, but at least
/// one, which tells a first contact (for the AI label) from a returning user even when no
/// history goes into the prompt (see `window::Cached`).
fn turns_cached(history_max_turns: usize) -> usize {
    history_max_turns.max(1)
}

/// Does one job to the end: asks the model if needed, delivers the answer, finishes the
/// journal entry. Returns the conversation history as it stands afterwards (`None` when it
/// could not be loaded, or when the answer reached no one and its turn was taken out of the
/// store: the next turn reads it again).
async fn run_job(hub: Hub, key: SessionKey, job: Job, history: Option<window::Cached>) -> Option<window::Cached> {
    let Job { envelope, work } = job;
    let Some(entry) = hub.channels.get(&envelope.channel) else {
        hub.finish_without_channel(&envelope).await;
        return history;
    };
    let mut history = history;
    let mut new_turn = None;
    let mut live = None;
    let reply = match work {
        Work::Say(text) => text,
        Work::Continue => match hub.passive.unpark_for(&envelope.channel, &envelope.sender.id, &envelope.id) {
            Some(parked) => {
                // Saved as taken by this message before it is recorded as its answer: a crash
                // in between then neither loses the text nor shows it twice.
                hub.passive.parked_saved(&envelope.id).await;
                hub.metrics.answers.with_label_values(&[envelope.channel.as_str(), "unparked"]).inc();
                delivery::answer(&hub, &envelope, key.as_str(), None, AnswerText::Rendered(parked)).await;
                return history;
            }
            None => hub.messages.nothing_parked.clone(),
        },
        Work::Resend(parts) => {
            delivery::resend(&hub, &envelope, parts).await;
            return history;
        }
        Work::Reset => match hub.store.clear_history(key.as_str()).await {
            Ok(()) => {
                history = Some(window::Cached::default());
                hub.messages.reset_done.clone()
            }
            Err(error) => {
                // Saying "reset" would be false: the stored history comes back with the next
                // load (after a restart, or once this session retires).
                tracing::error!(session = %key, %error, "Failed to clear history; sending the apology.");
                hub.messages.apology.clone()
            }
        },
        Work::Ask(question) => {
            // A store that refuses writes could record neither the answer nor its sending, and
            // a streamed card would show it before either: the restart it needs asks again.
            if delivery::left_to_the_restart(&hub, &envelope) {
                return history;
            }
            if entry.reply_mode != ReplyMode::Passive {
                // Passive mode is for accounts without the send APIs, typing included.
                entry.outbound.do_send(Typing { envelope: envelope.clone() });
            }
            if history.is_none() {
                history = match hub.store.history(key.as_str(), turns_cached(hub.session.history_max_turns)).await {
                    Ok(turns) => {
                        Some(window::Cached::new(turns, hub.session.history_max_turns, hub.session.history_max_chars))
                    }
                    Err(error) => {
                        tracing::error!(session = %key, %error, "Failed to load history; answering without it.");
                        None
                    }
                };
            }
            let earlier = history.as_ref().map_or(&[][..], |cached| cached.turns.as_slice());
            let first_contact = !history.as_ref().is_some_and(|cached| cached.answered_before);
            let window = history_window(earlier, hub.session.history_max_turns, hub.session.history_max_chars);
            let mut messages = Vec::with_capacity(window.len() * 2 + 2);
            if !entry.system_prompt.trim().is_empty() {
                messages.push(ChatMessage::new(Role::System, entry.system_prompt.clone()));
            }
            messages.extend(window.iter().flat_map(Turn::to_messages));
            messages.push(ChatMessage::new(Role::User, question.clone()));
            let request = CompletionRequest {
                messages,
                user: format!("{}:{}", envelope.channel, envelope.sender.id),
                channel_kind: envelope.channel_kind.clone(),
            };
            let on_delta = match delivery::live::start(&hub, entry.channel.clone(), &envelope).await {
                Some((answer, sink)) => {
                    live = Some(answer);
                    Some(sink)
                }
                None => None,
            };
            // The model's words go out with the AI label on first contact (or always, if so
            // configured).
            let labelled = |text: String| {
                let label = &hub.messages.ai_label;
                if !label.is_empty() && (first_contact || hub.messages.ai_label_every_reply) {
                    format!("{label}\n{text}")
                } else {
                    text
                }
            };
            match hub.llm.send(Complete { request, on_delta }).await {
                Ok(Ok(answer)) => {
                    let turn = Turn { question, answer: answer.clone() };
                    if let Some(cached) = history.as_mut() {
                        cached.push(turn.clone(), hub.session.history_max_turns, hub.session.history_max_chars);
                    }
                    new_turn = Some(turn);
                    labelled(answer)
                }
                Ok(Err(LlmError::Overloaded(waiting))) => {
                    hub.metrics.shed.with_label_values(&["llm_queue"]).inc();
                    tracing::warn!(session = %key, waiting, "LLM queue full; answered busy.");
                    hub.messages.busy.clone()
                }
                Ok(Err(error)) => {
                    tracing::warn!(session = %key, %error, "LLM failed; sending the apology.");
                    // Text already streamed into the message stays, the apology below it:
                    // replaced, what the user was reading would vanish.
                    let shown = live.as_ref().map(delivery::live::LiveAnswer::text_so_far);
                    match shown.filter(|shown| !shown.trim().is_empty()) {
                        Some(shown) => labelled(format!("{}\n\n{}", shown.trim_end(), hub.messages.apology)),
                        None => hub.messages.apology.clone(),
                    }
                }
                Err(error) if hub.passive.is_closing() => {
                    // The stop closed the LLM actor (its thread is stopped at exit, an answer
                    // being written with it): the question stays journaled for the next start
                    // to ask. Answered with the apology instead, that would be recorded as its
                    // answer and sent then, the model never asked again.
                    tracing::info!(session = %key, %error, "LLM actor gone (stopping); question left for the next start.");
                    hub.leave_for_next_start(&envelope);
                    return history;
                }
                Err(error) => {
                    // Not stopping: the call itself failed (a panic in it drops its reply).
                    tracing::error!(session = %key, %error, "LLM actor unavailable; sending the apology.");
                    hub.messages.apology.clone()
                }
            }
        }
    };
    if let Some(live) = live {
        let with_turn = new_turn.is_some();
        // Whether the card may be showing some of the answer, should its finish fail.
        let shown = !live.text_so_far().trim().is_empty();
        // Recorded, whole, before the card is finished: a crash in between then sends the saved
        // text at the next start instead of asking the model again (a second, different answer),
        // into this card (recorded by `live::start`) until its first part is cleared below.
        let Some(parts) = delivery::record(&hub, &envelope, key.as_str(), new_turn, reply.clone().into()).await else {
            return history;
        };
        // The card holds the first part, as a message would: the platform's size limit and the
        // operator's `max_part_bytes` apply to it too. Any further parts follow as messages.
        let card_text = match parts.as_slice() {
            [first, _, ..] => first.reply.text.clone(),
            _ => reply.clone(),
        };
        let finished = live.finish(&card_text, &hub.messages.answer_below).await;
        if finished.is_ok() {
            delivery::count_streamed(&hub, &envelope);
        }
        match finished {
            Ok(()) if parts.len() > 1 => {
                delivery::clear_delivered(hub.store.as_ref(), &parts[0]).await;
                delivery::deliver_recorded(&hub, &envelope, parts.into_iter().skip(1).collect()).await;
            }
            Ok(()) => {
                // Finishing clears the parts too, in one step (the log's finish first, so that
                // recovery stops at once); clearing them one by one only widened the window.
                hub.finish(&envelope.id).await;
            }
            Err(error) => {
                tracing::warn!(session = %key, %error, "Streamed answer not finished; sending it whole.");
                let reached = delivery::deliver_recorded(&hub, &envelope, parts).await;
                if reached == delivery::Reached::NoOne && !shown && with_turn {
                    // Neither in the card nor below it: as for an answer sent as messages, a
                    // later prompt must not show the model saying what the user never read.
                    delivery::forget_turn(&hub, &envelope).await;
                    return None;
                }
            }
        }
        return history;
    }
    match delivery::answer(&hub, &envelope, key.as_str(), new_turn, reply.into()).await {
        // Its turn is out of the store again: the cache, which has it, is read afresh next time.
        delivery::Reached::NoOne => None,
        delivery::Reached::User => history,
    }
}

#[cfg(test)]
mod tests;
