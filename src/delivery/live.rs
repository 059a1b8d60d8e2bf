//! Answers shown while the model writes them, for channels with
//! [`Capabilities::streaming`](yizhan_channel_core::Capabilities::streaming).
//!
//! The LLM's delta callback only stores the text so far in a `watch` channel; a task on the
//! session's thread sends it to the platform at most once per `min_stream_interval`, with a
//! strictly increasing sequence. Updates are coalesced, never queued, so a slow platform API
//! sees fewer, larger updates instead of a backlog.

use crate::hub::Hub;
use crate::llm::DeltaSink;
use crate::store::LiveStream;
use std::sync::Arc;
use tokio::sync::watch;
use yizhan_channel_common::api::retry_transient;
use yizhan_channel_core::{Channel, ChannelError, Delivery, Envelope, Reply, StreamHandle};

/// How many sequence numbers one run may use for one streamed message: updates come a few a
/// second at most, and the finish takes a few more. A stream resumed after a restart starts one
/// stride past the run before it, which it cannot know the last number of.
const SEQUENCE_STRIDE: u64 = 1 << 22;

/// The largest sequence number sent: platforms read it as a signed 32-bit integer (Feishu's
/// CardKit). A message resumed so often that its numbers would pass this gets a new message.
const MAX_SEQUENCE: u64 = i32::MAX as u64;

/// A message being streamed.
pub struct LiveAnswer {
    channel: Arc<dyn Channel>,
    handle: StreamHandle,
    /// Every sequence number of this run is above this one.
    sequence_base: u64,
    updates: tokio::task::JoinHandle<u64>,
    /// Dropped by [`LiveAnswer::finish`]: the updates stop waiting between sends.
    stop: tokio::sync::oneshot::Sender<()>,
    /// The text streamed so far.
    so_far: watch::Receiver<String>,
}

/// Starts a streamed message for `envelope`, or takes up again the one the last run was
/// streaming its answer into; `None` when the channel cannot stream or starting failed (the
/// answer is then delivered the normal way). The message is recorded in the store before any
/// update (a failure to is logged), so that a run stopped before the answer is complete leaves
/// it to the next one; one taken up again is used only once its new numbering is recorded.
pub async fn start(hub: &Hub, channel: Arc<dyn Channel>, envelope: &Envelope) -> Option<(LiveAnswer, DeltaSink)> {
    let capabilities = channel.capabilities();
    let resumed = hub.take_resumed_stream(&envelope.id);
    if !capabilities.streaming {
        if let Some(stream) = resumed {
            // Not streaming now (turned off, or paused after a refusal): the answer goes as
            // messages, and the message the last run left cut off says so.
            let (hub, envelope) = (hub.clone(), envelope.clone());
            actix::spawn(async move {
                let note = hub.messages.answer_below.clone();
                if let Err(error) = finish_resumed(&hub, channel, &envelope, stream, &note).await {
                    tracing::debug!(envelope = %envelope.id, %error, "Could not leave a note in the streamed message left by the last run.");
                }
            });
        }
        return None;
    }
    let resumed = match resumed {
        Some(stream) => take_up(hub, envelope, stream).await,
        None => None,
    };
    let (handle, sequence_base) = match resumed {
        Some(LiveStream { handle, sequence_base }) => {
            tracing::info!(channel = %envelope.channel, envelope = %envelope.id, "Answering into the message the last run was streaming.");
            (StreamHandle(handle), sequence_base)
        }
        None => {
            let handle = begin(channel.as_ref(), envelope).await?;
            // Failing this, the stream goes on: only a stop before the answer is complete
            // would then leave the message cut off.
            record(hub, envelope, &LiveStream { handle: handle.0.clone(), sequence_base: 0 }).await;
            (handle, 0)
        }
    };
    let (sender, receiver) = watch::channel(String::new());
    // Appended in place: a copy of the text so far per delta would be quadratic in the answer's
    // length, on the LLM actor's thread that every user's stream shares.
    let sink: DeltaSink = Box::new(move |delta: &str| sender.send_modify(|so_far| so_far.push_str(delta)));
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let so_far = receiver.clone();
    let updates = actix::spawn(send_updates(
        channel.clone(),
        handle.clone(),
        receiver,
        stopped,
        capabilities.min_stream_interval,
        capabilities.max_part_bytes,
        sequence_base + 1,
    ));
    Some((LiveAnswer { channel, handle, sequence_base, updates, stop, so_far }, sink))
}

/// Writes `text` (an answer's first part) into the message the last run was streaming that
/// answer into, and ends its streaming, as [`LiveAnswer::finish`] does.
pub async fn finish_resumed(
    hub: &Hub,
    channel: Arc<dyn Channel>,
    envelope: &Envelope,
    stream: LiveStream,
    text: &str,
) -> Result<(), ChannelError> {
    let Some(LiveStream { handle, sequence_base }) = take_up(hub, envelope, stream).await else {
        return Err(ChannelError::Unsupported(
            "the streamed message cannot be taken up again (its sequence numbers are used up, or it could not be recorded)"
                .into(),
        ));
    };
    // No updates: the finish starts right after the base.
    let (stop, _) = tokio::sync::oneshot::channel();
    let updates = actix::spawn(std::future::ready(sequence_base + 1));
    let so_far = watch::channel(String::new()).1;
    let answer = LiveAnswer { channel, handle: StreamHandle(handle), sequence_base, updates, stop, so_far };
    answer.finish(text, &hub.messages.answer_below).await
}

/// The stream as this run numbers it, once that numbering is recorded: a run that used the
/// numbers unrecorded and then stopped would have the next run use them again, and the
/// platform refuse them. `None` when its numbers ran out or the record failed.
async fn take_up(hub: &Hub, envelope: &Envelope, stream: LiveStream) -> Option<LiveStream> {
    let stream = next_run(stream)?;
    record(hub, envelope, &stream).await.then_some(stream)
}

/// The stream as the next run numbers it; `None` once its numbers would run out.
fn next_run(stream: LiveStream) -> Option<LiveStream> {
    let sequence_base = stream
        .sequence_base
        .checked_add(SEQUENCE_STRIDE)
        .filter(|base| base.saturating_add(SEQUENCE_STRIDE) <= MAX_SEQUENCE)?;
    Some(LiveStream { handle: stream.handle, sequence_base })
}

async fn begin(channel: &dyn Channel, envelope: &Envelope) -> Option<StreamHandle> {
    let target = Delivery {
        delivery_id: format!("{}-live", envelope.id),
        channel: envelope.channel.clone(),
        conversation: envelope.conversation.clone(),
        recipient: envelope.sender.clone(),
        reply_handle: envelope.reply_handle.clone(),
        reply: Reply::text(""),
    };
    match channel.begin_stream(&target).await {
        Ok(handle) => Some(handle),
        Err(error) => {
            // Not streaming now (turned off, a rate budget spent for now) is nothing to warn of.
            if matches!(error, ChannelError::Unsupported(_)) {
                tracing::debug!(channel = %envelope.channel, %error, "No streamed answer this time; sending it whole.");
            } else {
                tracing::warn!(channel = %envelope.channel, %error, "Could not start a streamed answer; sending it whole.");
            }
            None
        }
    }
}

/// Records the streamed message for the next run; `false` (logged) if that failed.
async fn record(hub: &Hub, envelope: &Envelope, stream: &LiveStream) -> bool {
    match hub.store.record_stream(&envelope.id, stream).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(envelope = %envelope.id, %error, "Failed to record a streamed message; a restart before the answer is complete would leave it cut off.");
            false
        }
    }
}

async fn send_updates(
    channel: Arc<dyn Channel>,
    handle: StreamHandle,
    mut receiver: watch::Receiver<String>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
    interval: std::time::Duration,
    max_part_bytes: usize,
    first_sequence: u64,
) -> u64 {
    let mut sequence = first_sequence;
    // Once an update held a whole part, later ones would show the same start (the message ends
    // up holding the first part; the rest follows as messages): not sent, so that they do not
    // spend the platform's rate limit for nothing.
    let mut showing_a_whole_part = false;
    // After an error that no retry fixes, later updates would fail the same way.
    let mut refused = false;
    // Ends when the sink is dropped, i.e. when the LLM call is over.
    while receiver.changed().await.is_ok() {
        let text = {
            let so_far = receiver.borrow_and_update();
            // Nothing more to show: only wait for the end, without copying the answer so far
            // at each delta (quadratic in its length, under the lock the model's thread writes
            // through).
            if showing_a_whole_part || refused || so_far.trim().is_empty() {
                continue;
            }
            so_far.clone()
        };
        let mut pause = interval;
        match channel.update_stream(&handle, &text, sequence).await {
            Ok(()) => showing_a_whole_part = text.len() >= max_part_bytes,
            Err(error) => {
                tracing::debug!(channel = %channel.id(), %error, "Streaming update not taken (or no more wanted); the final text still follows.");
                match error {
                    // The platform said how long: later updates wait that long (a bound keeps a
                    // garbled advice from freezing the card; the finish does not wait for it).
                    ChannelError::Transient { retry_after: Some(wait), .. } => pause = wait.min(LONGEST_UPDATE_PAUSE),
                    ChannelError::Transient { .. } => {}
                    _ => refused = true,
                }
            }
        }
        sequence += 1;
        tokio::select! {
            () = actix::clock::sleep(pause.max(interval)) => {}
            // The answer is complete and its final text is being written: no more updates.
            _ = &mut stopped => break,
        }
    }
    sequence
}

/// The longest a platform's request to wait holds back a stream's next update.
const LONGEST_UPDATE_PAUSE: std::time::Duration = std::time::Duration::from_secs(10);

/// Tries at writing the final text on a transient error before the caller sends the answer
/// whole instead, which shows it twice when the card already holds most of it.
const FINISH_ATTEMPTS: u32 = 3;

impl LiveAnswer {
    /// The answer's text streamed so far (what the message may be showing).
    pub fn text_so_far(&self) -> String {
        self.so_far.borrow().clone()
    }

    /// Waits for the last update, then writes `full_text` (the answer's first part, which is
    /// the whole answer when it fits one) and ends
    /// streaming, retrying transient failures. If that fails, the caller sends the answer as
    /// messages; the card is then given `note_if_failed` (one try: the text so far would
    /// otherwise stay there, cut off and still streaming, above the messages).
    pub async fn finish(self, full_text: &str, note_if_failed: &str) -> Result<(), ChannelError> {
        drop(self.stop);
        // Past whatever the updates used, should their task have failed.
        let sequence = self.updates.await.unwrap_or(self.sequence_base + SEQUENCE_STRIDE / 2);
        let channel = &self.channel;
        let finished = retry_transient(channel.id(), "Finishing a streamed answer", FINISH_ATTEMPTS, |attempt| {
            // `finish_stream` uses `sequence` and the one after it; a retry moves past both, as
            // the platform may have applied either before the error.
            let sequence = sequence.saturating_add(2 * u64::from(attempt - 1));
            channel.finish_stream(&self.handle, full_text, sequence)
        })
        .await
        .map(drop);
        if let Some(error) = finished.as_ref().err().filter(|_| !note_if_failed.trim().is_empty()) {
            // The platform asked to wait (a rate limit, the likeliest reason the finish failed
            // under load): so does the note, or it would be refused the same way. In the
            // background: the answer, sent as messages once this returns, does not wait for it.
            let wait = match error {
                ChannelError::Transient { retry_after: Some(wait), .. } => LONGEST_UPDATE_PAUSE.min(*wait),
                _ => std::time::Duration::ZERO,
            };
            let sequence = sequence.saturating_add(2 * u64::from(FINISH_ATTEMPTS));
            let (channel, handle, note) = (self.channel.clone(), self.handle.clone(), note_if_failed.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if let Err(error) = channel.finish_stream(&handle, &note, sequence).await {
                    tracing::debug!(channel = %channel.id(), %error, "Could not leave a note in the streamed card.");
                }
            });
        }
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;
    use yizhan_channel_core::{BoxFuture, Capabilities, ChannelId, DeliveryReceipt, WebhookOutcome, WebhookRequest};

    /// Records the texts of its streaming updates; answers every one with `.2` when set.
    struct Updates(ChannelId, Mutex<Vec<String>>, Option<ChannelError>);

    fn updates(answer: Option<ChannelError>) -> Arc<Updates> {
        Arc::new(Updates(ChannelId::parse("u").unwrap_or_else(|e| panic!("{e}")), Mutex::default(), answer))
    }

    impl Channel for Updates {
        fn id(&self) -> &ChannelId {
            &self.0
        }
        fn kind(&self) -> &str {
            "updates"
        }
        fn handle_webhook(&self, _: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
            Err(ChannelError::Unsupported("no webhooks".into()))
        }
        fn deliver<'a>(&'a self, _: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
            Box::pin(async { Ok(DeliveryReceipt::default()) })
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities { streaming: true, max_part_bytes: 10, ..Default::default() }
        }
        fn update_stream<'a>(
            &'a self,
            _: &'a StreamHandle,
            text_so_far: &'a str,
            _: u64,
        ) -> BoxFuture<'a, Result<(), ChannelError>> {
            self.1.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(text_so_far.to_owned());
            let answer = self.2.clone();
            Box::pin(async move { answer.map_or(Ok(()), Err) })
        }
    }

    #[actix::test]
    async fn updates_stop_once_one_held_a_whole_part() {
        let channel = updates(None);
        let (sender, receiver) = watch::channel(String::new());
        let handle = StreamHandle(serde_json::Value::Null);
        let (_stop, stopped) = tokio::sync::oneshot::channel();
        let updates = actix::spawn(send_updates(channel.clone(), handle, receiver, stopped, Duration::ZERO, 10, 1));
        let sent = || channel.1.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len();
        for (text, updates_by_now) in [("短", 1), ("短文本已经超过十个字节", 2), ("短文本已经超过十个字节，还在写", 2)]
        {
            sender.send_replace(text.to_owned());
            // Each one taken before the next (the updater coalesces what it has not taken yet).
            for _ in 0..1_000 {
                if sent() >= updates_by_now {
                    break;
                }
                actix::clock::sleep(Duration::from_millis(1)).await;
            }
        }
        drop(sender);
        let sequence = updates.await.unwrap_or_default();
        let sent = channel.1.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        assert_eq!(sent, ["短", "短文本已经超过十个字节"]);
        assert_eq!(sequence, 3);
    }

    /// An update refused for a reason no retry fixes: later ones would fail the same way.
    #[actix::test]
    async fn updates_stop_after_one_is_refused() {
        let channel = updates(Some(ChannelError::Refused { code: 1, reason: "no".into() }));
        let (sender, receiver) = watch::channel(String::new());
        let (_stop, stopped) = tokio::sync::oneshot::channel();
        let handle = StreamHandle(serde_json::Value::Null);
        let updates = actix::spawn(send_updates(channel.clone(), handle, receiver, stopped, Duration::ZERO, 1_000, 1));
        let sent = || channel.1.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len();
        sender.send_replace("一".to_owned());
        for _ in 0..1_000 {
            if sent() >= 1 {
                break;
            }
            actix::clock::sleep(Duration::from_millis(1)).await;
        }
        for text in ["一二", "一二三"] {
            sender.send_replace(text.to_owned());
            actix::clock::sleep(Duration::from_millis(5)).await;
        }
        drop(sender);
        let _ = updates.await;
        assert_eq!(sent(), 1);
    }

    /// Its finishes answer "wait five seconds" (a rate limit); the note goes through.
    struct RateLimitedFinish(ChannelId, Mutex<Vec<(String, tokio::time::Instant)>>);

    impl Channel for RateLimitedFinish {
        fn id(&self) -> &ChannelId {
            &self.0
        }
        fn kind(&self) -> &str {
            "rate_limited"
        }
        fn handle_webhook(&self, _: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
            Err(ChannelError::Unsupported("no webhooks".into()))
        }
        fn deliver<'a>(&'a self, _: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
            Box::pin(async { Ok(DeliveryReceipt::default()) })
        }
        fn finish_stream<'a>(
            &'a self,
            _: &'a StreamHandle,
            full_text: &'a str,
            _: u64,
        ) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
            let mut calls = self.1.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            calls.push((full_text.to_owned(), tokio::time::Instant::now()));
            let note = full_text == "见下方";
            Box::pin(async move {
                if note {
                    Ok(DeliveryReceipt::default())
                } else {
                    Err(ChannelError::Transient { reason: "rate".into(), retry_after: Some(Duration::from_secs(5)) })
                }
            })
        }
    }

    /// A finish that failed on a rate limit: the note waits as long as the platform asked
    /// before it is written (sent at once, it failed the same way).
    #[tokio::test(start_paused = true)]
    async fn the_note_after_a_rate_limited_finish_waits_as_asked() {
        let channel =
            Arc::new(RateLimitedFinish(ChannelId::parse("r").unwrap_or_else(|e| panic!("{e}")), Mutex::default()));
        let (stop, _stopped) = tokio::sync::oneshot::channel();
        let live = LiveAnswer {
            channel: channel.clone(),
            handle: StreamHandle(serde_json::Value::Null),
            sequence_base: 0,
            updates: tokio::spawn(async { 7 }),
            stop,
            so_far: watch::channel(String::new()).1,
        };
        assert!(live.finish("完整的回答", "见下方").await.is_err());
        // The answer does not wait for the note: it is written in the background, later.
        let finished_at = tokio::time::Instant::now();
        for _ in 0..100 {
            if channel
                .1
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .iter()
                .any(|(text, _)| text == "见下方")
            {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let calls = channel.1.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        assert!(
            calls.iter().all(|(text, at)| text != "见下方" || *at >= finished_at + Duration::from_secs(1)),
            "{calls:?}"
        );
        assert!(calls.len() >= 2, "{calls:?}");
        let (note, at) = calls[calls.len() - 1].clone();
        assert_eq!(note, "见下方");
        let last_finish = calls[calls.len() - 2].1;
        assert!(at - last_finish >= Duration::from_secs(5), "{:?}", at - last_finish);
    }

    /// A platform's request to wait holds back the next update, and finishing ends that wait at
    /// once (it must not hold back the final text).
    #[actix::test]
    async fn finishing_ends_the_wait_between_updates() {
        // The platform asks to wait an hour after the first update (ten seconds are waited).
        let wait = ChannelError::Transient { reason: "rate".into(), retry_after: Some(Duration::from_secs(3_600)) };
        let channel = updates(Some(wait));
        let (sender, receiver) = watch::channel(String::new());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = StreamHandle(serde_json::Value::Null);
        let updates = actix::spawn(send_updates(channel.clone(), handle, receiver, stopped, Duration::ZERO, 1_000, 1));
        sender.send_replace("一".to_owned());
        let sent = || channel.1.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len();
        for _ in 0..1_000 {
            if sent() >= 1 {
                break;
            }
            actix::clock::sleep(Duration::from_millis(1)).await;
        }
        // Later text is not sent during the pause the platform asked for.
        sender.send_replace("一二".to_owned());
        actix::clock::sleep(Duration::from_millis(50)).await;
        assert_eq!(sent(), 1, "an update sent during the platform's pause");
        drop(stop);
        let ended = tokio::time::timeout(Duration::from_secs(30), updates).await;
        assert!(ended.is_ok(), "the updater waited out its pause");
        drop(sender);
    }
}
