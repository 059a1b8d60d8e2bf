//! The contract between Yizhan's routing core and every chat platform.
//!
//! A channel turns a platform's webhook into [`Envelope`]s and sends [`Reply`] parts back through
//! the platform's API. Everything here is plain Rust and async functions: no actix, so a plugin
//! author needs to learn nothing about Yizhan's actors.
//!
//! # Layout
//! - [`envelope`]: one inbound message, platform-neutral ([`Envelope`], [`Segment`], [`Event`]).
//! - [`channel`]: the [`Channel`] trait, the webhook request/response types and capabilities.
//! - [`reply`]: what goes back out ([`Reply`], [`Delivery`]).
//! - [`error`]: [`ChannelError`], which classifies what is the sender's fault, what is worth a
//!   retry and what an operator must fix.
//! - [`token`]: [`TokenCache`], the single-flight access-token cache every platform needs.
//! - [`settings`]: [`ChannelSettings`], a channel's own config table.
//!
//! # Design decisions
//! - `handle_webhook` is synchronous: verifying, decrypting and parsing are CPU work bounded by
//!   the body size, and the platforms' acknowledgement deadlines (1–5 s) leave no room for I/O.
//! - `deliver` sends exactly one part. Splitting happens first, in [`Channel::render`], so the
//!   core can journal every part and retry one without re-sending the others.
//! - The current time comes in with the request ([`WebhookRequest::received_at`]), so replay
//!   windows are testable without a clock.
#![warn(missing_docs)]

pub mod channel;
pub mod envelope;
pub mod error;
pub mod reply;
pub mod settings;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod token;

pub use channel::{
    BoxFuture, Capabilities, Channel, Method, StreamHandle, WebhookOutcome, WebhookRequest, WebhookResponse,
};
pub use envelope::{
    unix_millis, ChannelId, Conversation, ConversationKind, Envelope, Event, ReplyHandle, Segment, Sender, MAX_ID_BYTES,
};
pub use error::ChannelError;
pub use reply::{Delivery, DeliveryReceipt, Reply};
pub use settings::{missing_field, without_value, ChannelSettings};
pub use token::{AccessToken, TokenCache};

/// Compares two byte strings in constant time (for signatures), so that an attacker cannot learn
/// a correct prefix from response timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}
