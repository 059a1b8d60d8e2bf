//! Answers shown while the model writes them, for channels with
//! [`Capabilities::streaming`](yizhan_channel_core::Capabilities::streaming).
//!
//! The LLM's delta callback only stores the text so far in a `watch` channel; a task on the
//! session's thread sends it to the platform at most once per `min_stream_interval`, with a
//! strictly increasing sequence. Updates are coalesced, never queued, so a slow platform API
//! sees fewer, larger updates instead of a backlog.

use crate::llm::DeltaSink;
use std::sync::Arc;
use tokio::sync::watch;
use yizhan_channel_common::api::retry_transient;
use yizhan_channel_core::{Channel, ChannelError, Delivery, Envelope, Reply, StreamHandle};

/// A message being streamed.
pub struct LiveAnswer {
    channel: Arc<dyn Channel>,
    handle: StreamHandle,
    updates: tokio::task::JoinHandle<u64>,
}

/// Starts a streamed message for `envelope`; `None` when the channel cannot stream or starting
/// failed (the answer is then delivered the normal way).
pub async fn start(channel: Arc<dyn Channel>, envelope: &Envelope) -> Option<(LiveAnswer, DeltaSink)> {
    let capabilities = channel.capabilities();
    if !capabilities.streaming {
        return None;
    }
    let target = Delivery {
        delivery_id: format!("{}-live", envelope.id),
        channel: envelope.channel.clone(),
        conversation: envelope.conversation.clone(),
        recipient: envelope.sender.clone(),
        reply_handle: envelope.reply_handle.clone(),
        reply: Reply::text(""),
    };
    let handle = match channel.begin_stream(&target).await {
        Ok(handle) => handle,
        Err(error) => {
            tracing::warn!(channel = %envelope.channel, %error, "Could not start a streamed answer; sending it whole.");
            return None;
        }
    };
    let (sender, receiver) = watch::channel(String::new());
    // Appended in place: a copy of the text so far per delta would be quadratic in the answer's
    // length, on the LLM actor's thread that every user's stream shares.
    let sink: DeltaSink = Box::new(move |delta: &str| sender.send_modify(|so_far| so_far.push_str(delta)));
    let updates =
        actix::spawn(send_updates(channel.clone(), handle.clone(), receiver, capabilities.min_stream_interval));
    Some((LiveAnswer { channel, handle, updates }, sink))
}

async fn send_updates(
    channel: Arc<dyn Channel>,
    handle: StreamHandle,
    mut receiver: watch::Receiver<String>,
    interval: std::time::Duration,
) -> u64 {
    let mut sequence = 1;
    // Ends when the sink is dropped, i.e. when the LLM call is over.
    while receiver.changed().await.is_ok() {
        let text = receiver.borrow_and_update().clone();
        if text.trim().is_empty() {
            continue;
        }
        if let Err(error) = channel.update_stream(&handle, &text, sequence).await {
            tracing::debug!(channel = %channel.id(), %error, "Streaming update failed; the final text still follows.");
        }
        sequence += 1;
        actix::clock::sleep(interval).await;
    }
    sequence
}

/// Tries at writing the final text on a transient error before the caller sends the answer
/// whole instead, which shows it twice when the card already holds most of it.
const FINISH_ATTEMPTS: u32 = 3;

impl LiveAnswer {
    /// Waits for the last update, then writes `full_text` (the answer's first part, which is
    /// the whole answer when it fits one) and ends
    /// streaming, retrying transient failures. If that fails, the caller sends the answer as
    /// messages; the card is then given `note_if_failed` (one try: the text so far would
    /// otherwise stay there, cut off and still streaming, above the messages).
    pub async fn finish(self, full_text: &str, note_if_failed: &str) -> Result<(), ChannelError> {
        let sequence = self.updates.await.unwrap_or(1_000_000);
        let channel = &self.channel;
        let finished = retry_transient(channel.id(), "Finishing a streamed answer", FINISH_ATTEMPTS, |attempt| {
            // `finish_stream` uses `sequence` and the one after it; a retry moves past both, as
            // the platform may have applied either before the error.
            let sequence = sequence.saturating_add(2 * u64::from(attempt - 1));
            channel.finish_stream(&self.handle, full_text, sequence)
        })
        .await
        .map(drop);
        if finished.is_err() && !note_if_failed.trim().is_empty() {
            let sequence = sequence.saturating_add(2 * u64::from(FINISH_ATTEMPTS));
            if let Err(error) = channel.finish_stream(&self.handle, note_if_failed, sequence).await {
                tracing::debug!(channel = %channel.id(), %error, "Could not leave a note in the streamed card.");
            }
        }
        finished
    }
}
