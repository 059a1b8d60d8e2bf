//! The signatures WeChat puts on every call's query string.
//!
//! `signature = hex_lower(sha1(concat(sorted([token, timestamp, nonce]))))` is on every call. It
//! covers the query only, never the body (plaintext mode signs no body at all), which is why the
//! caller also checks the timestamp against a replay window. Encrypted pushes (安全模式 /
//! 兼容模式, `encrypt_type=aes`) add `msg_signature`, which also covers the body's `<Encrypt>`;
//! for them only `msg_signature` is checked, as the docs demand (PROTOCOLS §0.4).

use std::time::Duration;
use yizhan_channel_core::{ChannelError, WebhookRequest};
use yizhan_channel_wechat_crypto::signatures_match;

/// Computes the signature WeChat sends for `token`, `timestamp` and `nonce`.
///
/// Public so that the hub's integration tests (and operators debugging a setup) can sign
/// requests the way WeChat does.
pub fn signature(token: &str, timestamp: &str, nonce: &str) -> String {
    yizhan_channel_wechat_crypto::signature(token, timestamp, nonce)
}

/// Computes the `msg_signature` WeChat sends with an encrypted push: `encrypt` is the body's
/// `<Encrypt>` value. Public for the same reason as [`signature`].
pub fn msg_signature(token: &str, timestamp: &str, nonce: &str, encrypt: &str) -> String {
    yizhan_channel_wechat_crypto::msg_signature(token, timestamp, nonce, encrypt)
}

fn param<'a>(request: &'a WebhookRequest, name: &str) -> Result<&'a str, ChannelError> {
    request.query_param(name).ok_or_else(|| ChannelError::BadSignature(format!("query parameter `{name}` is missing")))
}

/// Checks `signature`, `timestamp` and `nonce` of `request` against `token` and the replay
/// window. Every failure, including a missing parameter, is [`ChannelError::BadSignature`].
pub(crate) fn verify(request: &WebhookRequest, token: &str, window: Duration) -> Result<(), ChannelError> {
    let (given, timestamp, nonce) =
        (param(request, "signature")?, param(request, "timestamp")?, param(request, "nonce")?);
    let expected = signature(token, timestamp, nonce);
    if !signatures_match(&expected, given) {
        return Err(ChannelError::BadSignature("signature does not match the configured token".into()));
    }
    // NOTE: checked after the signature, so an unsigned caller learns nothing about our clock.
    request.check_timestamp(timestamp, window)
}

/// Checks `msg_signature` over `encrypt` (the body's `<Encrypt>`), `timestamp` and `nonce`
/// against `token` and the replay window. The 3-field `signature` is deliberately not
/// accepted in its place: it does not cover the body. Every failure is
/// [`ChannelError::BadSignature`].
pub(crate) fn verify_encrypted(
    request: &WebhookRequest,
    token: &str,
    encrypt: &str,
    window: Duration,
) -> Result<(), ChannelError> {
    let (given, timestamp, nonce) =
        (param(request, "msg_signature")?, param(request, "timestamp")?, param(request, "nonce")?);
    let expected = msg_signature(token, timestamp, nonce, encrypt);
    if !signatures_match(&expected, given) {
        return Err(ChannelError::BadSignature(
            "msg_signature does not match the configured token and the body's <Encrypt>".into(),
        ));
    }
    // NOTE: checked after the signature, so an unsigned caller learns nothing about our clock.
    request.check_timestamp(timestamp, window)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_signature_is_reproduced() {
        assert_eq!(signature("AAAAA", "1714036504", "1514711492"), "f464b24fc39322e44b38aa78f5edd27bd1441696");
    }
}
