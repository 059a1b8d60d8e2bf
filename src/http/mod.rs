//! The HTTP surface: platform webhooks, health and metrics.

mod health;
mod stalled_connections;
mod unread_body;
mod webhook;

pub use health::{healthz, metrics};
pub use stalled_connections::{raise_open_file_limit, watch as watch_for_stalls};
pub use unread_body::keep_body_until_sent;
pub use webhook::{webhook, AppState, BodyLimits};
