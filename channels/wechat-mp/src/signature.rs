//! The 3-field webhook signature WeChat puts on every call's query string.
//!
//! `signature = hex_lower(sha1(concat(sorted([token, timestamp, nonce]))))`. It covers the query
//! only, never the body (plaintext mode signs no body at all), which is why the caller also checks
//! the timestamp against a replay window.

use sha1::{Digest, Sha1};
use std::time::Duration;
use yizhan_channel_core::{constant_time_eq, ChannelError, WebhookRequest};

/// Computes the signature WeChat sends for `token`, `timestamp` and `nonce`.
///
/// Public so that the hub's integration tests (and operators debugging a setup) can sign
/// requests the way WeChat does.
pub fn signature(token: &str, timestamp: &str, nonce: &str) -> String {
    let mut fields = [token, timestamp, nonce];
    fields.sort_unstable();
    let mut hasher = Sha1::new();
    for field in fields {
        hasher.update(field.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// Checks `signature`, `timestamp` and `nonce` of `request` against `token` and the replay
/// window. Every failure, including a missing parameter, is [`ChannelError::BadSignature`].
pub(crate) fn verify(request: &WebhookRequest, token: &str, window: Duration) -> Result<(), ChannelError> {
    let param = |name: &str| {
        request
            .query_param(name)
            .ok_or_else(|| ChannelError::BadSignature(format!("query parameter `{name}` is missing")))
    };
    let (given, timestamp, nonce) = (param("signature")?, param("timestamp")?, param("nonce")?);
    let expected = signature(token, timestamp, nonce);
    if !constant_time_eq(expected.as_bytes(), given.trim().to_ascii_lowercase().as_bytes()) {
        return Err(ChannelError::BadSignature("signature does not match the configured token".into()));
    }
    // NOTE: checked after the signature, so an unsigned caller learns nothing about our clock.
    request.check_timestamp(timestamp, window)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_signature_is_reproduced() {
        assert_eq!(
            signature("AAAAA", "1714036504", "1514711492"),
            "f464b24fc39322e44b38aa78f5edd27bd1441696"
        );
    }
}
