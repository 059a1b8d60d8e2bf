//! The SHA-1 signatures WeChat and WeCom put on webhook calls.
//!
//! Both are `hex_lower(sha1(concat(sort(fields))))`: three fields (token, timestamp, nonce) for
//! the plain signature, four (plus the ciphertext) for `msg_signature`. Only the four-field one
//! covers the body, which is why encrypted pushes must be checked with it (PROTOCOLS §0.4).

use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

/// `hex_lower(sha1(concat(sorted(fields))))`. Sorting is bytewise, which for UTF-8 equals the
/// code-point order the official samples use.
fn sorted_sha1(fields: &mut [&str]) -> String {
    fields.sort_unstable();
    let mut hasher = Sha1::new();
    for field in fields.iter() {
        hasher.update(field.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// The plain 3-field signature: `sha1(sort(token, timestamp, nonce))`. WeChat MP signs every
/// call with it (and the GET URL verification only with it, even in safe mode).
pub fn signature(token: &str, timestamp: &str, nonce: &str) -> String {
    sorted_sha1(&mut [token, timestamp, nonce])
}

/// The 4-field `msg_signature`: `sha1(sort(token, timestamp, nonce, encrypt))`, where `encrypt`
/// is the base64 ciphertext exactly as sent.
pub fn msg_signature(token: &str, timestamp: &str, nonce: &str, encrypt: &str) -> String {
    sorted_sha1(&mut [token, timestamp, nonce, encrypt])
}

/// Whether `given` (as received: surrounding whitespace and upper-case hex tolerated) equals
/// `expected` (lower-case hex). Constant-time in the content, so response timing reveals no
/// correct prefix.
pub fn signatures_match(expected: &str, given: &str) -> bool {
    let given = given.trim().to_ascii_lowercase();
    expected.len() == given.len() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_plain_signature_is_reproduced() {
        assert_eq!(signature("AAAAA", "1714036504", "1514711492"), "f464b24fc39322e44b38aa78f5edd27bd1441696");
    }

    #[test]
    fn matching_tolerates_case_and_whitespace_but_not_other_differences() {
        let expected = signature("AAAAA", "1714036504", "1514711492");
        assert!(signatures_match(&expected, " F464B24FC39322E44B38AA78F5EDD27BD1441696\n"));
        assert!(!signatures_match(&expected, "f464b24fc39322e44b38aa78f5edd27bd1441697"));
        assert!(!signatures_match(&expected, "f464b24fc39322e44b38aa78f5edd27bd144169"));
        assert!(!signatures_match(&expected, ""));
    }
}
