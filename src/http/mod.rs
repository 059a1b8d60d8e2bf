//! The HTTP surface: platform webhooks, health and metrics.

mod health;
mod webhook;

pub use health::{healthz, metrics};
pub use webhook::{webhook, AppState, BodyLimits};
