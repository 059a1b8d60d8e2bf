//! Feishu's callback encryption and request signature (PROTOCOLS §4.3, §4.4).
//!
//! Invariants: nothing here panics on any input; decryption either yields UTF-8 plaintext whose
//! PKCS#7 padding was valid, or an error; signatures are compared in constant time.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, KeyIvInit};
use base64::Engine;
use sha2::{Digest, Sha256};
use yizhan_channel_core::constant_time_eq;

type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// Why an `encrypt` field could not be decrypted. Deliberately vague towards the caller: the
/// distinction matters for logs, not for the sender.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecryptError {
    /// The field is not standard base64.
    #[error("the encrypted payload is not base64")]
    NotBase64,
    /// Shorter than one IV plus one block, or not a whole number of blocks.
    #[error("the encrypted payload has an invalid length")]
    BadLength,
    /// The padding did not check out: almost always a wrong Encrypt Key.
    #[error("the encrypted payload does not decrypt with the configured encrypt_key")]
    BadPadding,
    /// Decrypted, but not UTF-8 text.
    #[error("the decrypted payload is not UTF-8")]
    NotUtf8,
}

/// Decrypts a callback's `encrypt` field: `key = SHA-256(encrypt_key)`, `buf = base64(encrypt)`,
/// IV = `buf[..16]` (not derived from the key, unlike WeChat), AES-256-CBC over `buf[16..]`,
/// PKCS#7 with 16-byte blocks.
pub fn decrypt(encrypt_key: &str, encrypted: &str) -> Result<String, DecryptError> {
    let buf =
        base64::engine::general_purpose::STANDARD.decode(encrypted.trim()).map_err(|_| DecryptError::NotBase64)?;
    if buf.len() < 32 || buf.len() % 16 != 0 {
        return Err(DecryptError::BadLength);
    }
    let (iv, ciphertext) = buf.split_at(16);
    let key = Sha256::digest(encrypt_key.as_bytes());
    let decryptor = Aes256CbcDec::new_from_slices(&key, iv).map_err(|_| DecryptError::BadLength)?;
    let plain = decryptor.decrypt_padded_vec_mut::<Pkcs7>(ciphertext).map_err(|_| DecryptError::BadPadding)?;
    String::from_utf8(plain).map_err(|_| DecryptError::NotUtf8)
}

/// `hex(SHA-256(timestamp + nonce + encrypt_key + body))`, the value of `X-Lark-Signature`.
/// Plain SHA-256, not HMAC (PROTOCOLS §0.6).
pub fn signature(timestamp: &str, nonce: &str, encrypt_key: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(timestamp.as_bytes());
    hasher.update(nonce.as_bytes());
    hasher.update(encrypt_key.as_bytes());
    hasher.update(body);
    hex::encode(hasher.finalize())
}

/// Whether `given` (the header, any hex case) is the signature of this request, in constant time.
pub fn signature_matches(given: &str, timestamp: &str, nonce: &str, encrypt_key: &str, body: &[u8]) -> bool {
    let expected = signature(timestamp, nonce, encrypt_key, body);
    constant_time_eq(given.trim().to_ascii_lowercase().as_bytes(), expected.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The Feishu entries of the official vector file (the repository's copy, kept with the
    /// WeChat crypto's tests).
    fn shared_vectors() -> Vec<Value> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../wechat-crypto/tests/vectors/crypto.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let all: Vec<Value> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        all.into_iter().filter(|v| v["platform"] == "feishu").collect()
    }

    #[test]
    fn the_official_feishu_vector_decrypts_to_hello_world() {
        let plain = decrypt("test key", "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=");
        assert_eq!(plain.as_deref(), Ok("hello world"));
    }

    #[test]
    fn the_wrong_key_vector_is_rejected() {
        let plain = decrypt("test key2", "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=");
        assert!(plain.as_deref() != Ok("hello world"), "{plain:?}");
        assert!(plain.is_err(), "{plain:?}");
    }

    #[test]
    fn every_shared_feishu_vector_holds() {
        let vectors = shared_vectors();
        assert_eq!(vectors.len(), 2, "the file's Feishu vectors: one to decrypt, one to refuse");
        for vector in vectors {
            let name = vector["name"].as_str().unwrap_or_default();
            let key = vector["inputs"]["encrypt_key"].as_str().unwrap_or_default();
            let encrypted = vector["inputs"]["encrypt"].as_str().unwrap_or_default();
            let result = decrypt(key, encrypted);
            if vector["expected"]["reject"] == Value::Bool(true) {
                assert!(result.is_err(), "{name}: {result:?}");
            } else {
                assert_eq!(result.as_deref().ok(), vector["expected"]["plaintext"].as_str(), "{name}");
            }
        }
    }

    #[test]
    fn garbage_payloads_are_errors_not_panics() {
        assert_eq!(decrypt("k", "%%%"), Err(DecryptError::NotBase64));
        assert_eq!(decrypt("k", ""), Err(DecryptError::BadLength));
        assert_eq!(decrypt("k", "AAAAAAAAAAAAAAAAAAAAAA=="), Err(DecryptError::BadLength)); // 16 bytes: IV only
        let odd = base64::engine::general_purpose::STANDARD.encode([7u8; 40]);
        assert_eq!(decrypt("k", &odd), Err(DecryptError::BadLength));
    }

    #[test]
    fn signatures_are_sha256_of_the_concatenation_and_any_hex_case_matches() {
        let body = br#"{"encrypt":"abc"}"#;
        let expected = {
            let mut all = b"1700000000nonce-1key".to_vec();
            all.extend_from_slice(body);
            hex::encode(Sha256::digest(&all))
        };
        assert_eq!(signature("1700000000", "nonce-1", "key", body), expected);
        assert!(signature_matches(&expected.to_uppercase(), "1700000000", "nonce-1", "key", body));
        assert!(!signature_matches(&expected, "1700000001", "nonce-1", "key", body));
        assert!(!signature_matches("", "1700000000", "nonce-1", "key", body));
    }
}
