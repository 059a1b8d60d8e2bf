//! Errors a channel reports, classified by what the core should do about them.

use std::time::Duration;

/// Why a webhook call or a delivery failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelError {
    /// The request is not from the platform: bad signature, stale timestamp, wrong account.
    /// The core answers 401 and changes nothing.
    #[error("request rejected: {0}")]
    BadSignature(String),
    /// The body could not be parsed. The core answers 400.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The platform sent something this channel does not handle (a method, a mode).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Worth retrying later: network failure, platform busy, rate limit.
    #[error("transient failure: {reason}")]
    Transient {
        /// What happened.
        reason: String,
        /// How long the platform asked us to wait, when it said.
        retry_after: Option<Duration>,
    },
    /// The platform refused this delivery for a reason retrying won't fix soon (the user
    /// unfollowed, outside the reply window, out of quota, no permission). The core may park the
    /// answer and deliver it another way.
    #[error("platform refused delivery (code {code}): {reason}")]
    Refused {
        /// The platform's error code.
        code: i64,
        /// The platform's message and what it means.
        reason: String,
    },
    /// Only an operator can fix this: wrong app secret, IP not whitelisted, missing scope. Log it
    /// once, loudly, with what to do.
    #[error("channel misconfigured: {0}")]
    Misconfigured(String),
    /// A send went out and nothing said whether it arrived (a timeout, a gateway's 5xx, a
    /// connection that broke, an answer that cannot be read), on a platform that takes no
    /// idempotency key: sending it again may show it twice. The core sends such a part once
    /// more at most (a lost answer is worse than a second copy, a dozen copies worse than
    /// either), then records it failed: unlike other failures, it is never parked nor sent
    /// again at the next start. A channel whose platform drops
    /// repeated sends (Feishu's `uuid`; WeCom's duplicate check, on the sends that ask for it)
    /// reports these as
    /// [`Transient`](Self::Transient) instead.
    #[error("delivery may have arrived: {0}")]
    MaybeDelivered(String),
}

impl ChannelError {
    /// Whether sending again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// The HTTP status the core answers a webhook call with when handling it failed.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::BadSignature(_) => 401,
            Self::Malformed(_) => 400,
            Self::Unsupported(_) => 405,
            Self::Transient { .. } | Self::MaybeDelivered(_) => 503,
            Self::Refused { .. } | Self::Misconfigured(_) => 500,
        }
    }

    /// A short, stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadSignature(_) => "unauthorized",
            Self::Malformed(_) => "malformed",
            Self::Unsupported(_) => "unsupported",
            Self::Transient { .. } => "transient",
            Self::Refused { .. } => "refused",
            Self::Misconfigured(_) => "misconfigured",
            Self::MaybeDelivered(_) => "maybe_delivered",
        }
    }
}
