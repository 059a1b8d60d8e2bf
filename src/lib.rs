//! Yizhan (驿站): a relay station between chat platforms and large language models.
//!
//! A platform's webhook becomes an [`Envelope`](yizhan_channel_core::Envelope); the envelope is
//! deduplicated and journaled before the platform is acknowledged; a per-conversation session
//! actor asks the LLM with the conversation's history; the answer goes back through the
//! channel's delivery actor.
//!
//! # Layout
//! - [`cli`]: the command line (`yizhan run|check --config PATH`), for plugin binaries too.
//! - [`config`]: typed configuration (TOML file + `YIZHAN__*` environment overrides).
//! - [`startup`]: builds actors, channel directory and HTTP server ([`startup::Application`]).
//! - [`http`]: webhook, health and metrics routes.
//! - [`routing`]: envelope → work and session key; dispatch to sessions.
//! - [`session`]: the per-conversation `Session` actor and its registry; history window.
//! - [`llm`]: `LlmActor` (bounded concurrency and queue), the retrying client, backends.
//! - [`delivery`]: `ChannelActor`, rendering and sending answers with retries and the outbox;
//!   `delivery::passive` (answers inside the platform's webhook response, parked answers) and
//!   `delivery::live` (answers streamed while the model writes them).
//! - [`store`]: the `Store` trait (dedupe, journal, history) and its engines.
//! - [`channels`]: channel kinds, built-in and plugin.
//! - [`hub`]: the shared wiring; [`metrics`]: Prometheus; [`telemetry`]: logging.
//!
//! # Design decisions
//! - Webhook handling is a plain function, not an actor: it is CPU work against a deadline.
//!   Actors are used where there is state with a lifecycle: sessions, the LLM gateway and the
//!   per-account delivery.
//! - Every bound is explicit (LLM concurrency and queue, per-conversation queue, history window,
//!   body size); reaching one yields a polite "busy" reply, never a hang.
//! - Durable before acknowledged: the store's `accept` journals an envelope (and claims its
//!   dedupe key) before the platform hears "received"; answers sit in an outbox until the
//!   platform confirms them; start-up resumes both.
//! - The one webhook that waits for the model is WeChat's passive reply, bounded by WeChat's own
//!   window and shared across its retries of the same message.

pub mod channels;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod http;
pub mod hub;
pub mod llm;
pub mod metrics;
pub mod routing;
pub mod session;
pub mod startup;
pub mod store;
pub mod telemetry;
