//! [`CryptoError`]: why a WXBizMsgCrypt operation failed, numbered like the official sample
//! libraries so that logs can be matched against WeChat's documentation.
//!
//! Invariant: no variant carries a secret (token, EncodingAESKey, AES key) or decrypted content.

use yizhan_channel_core::ChannelError;

/// Why verifying, decrypting or encrypting a WeChat / WeCom message failed.
///
/// Codes that cannot happen here are absent: -40002 ParseXml (callers parse their own bodies),
/// -40003 ComputeSignature, -40009 EncodeBase64 and -40011 GenReturnXml (infallible in Rust).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The signature does not match the token, timestamp, nonce (and ciphertext). -40001.
    #[error("signature does not match the configured token (-40001 ValidateSignature)")]
    ValidateSignature,
    /// The EncodingAESKey is not 43 characters of `[A-Za-z0-9]`. -40004. The reason never
    /// contains the key itself.
    #[error("illegal EncodingAESKey: {0} (-40004 IllegalAesKey)")]
    IllegalAesKey(&'static str),
    /// The frame decrypted, but it is addressed to another appid / corpid / suiteid. -40005.
    #[error("message is addressed to receive id {found:?}, not the configured one (-40005 ValidateCorpid/Appid)")]
    ValidateReceiveId {
        /// The receive id found in the frame (lossy UTF-8, at most 64 characters). Not a
        /// secret, and what an operator needs to spot a wrong `app_id` / `corp_id`.
        found: String,
    },
    /// The message cannot be framed (it is longer than the 4 GiB a `u32` length can express).
    /// -40006.
    #[error("message cannot be encrypted: {0} (-40006 EncryptAES)")]
    EncryptAes(&'static str),
    /// AES-CBC decryption failed: a ciphertext of the wrong length, or invalid PKCS#7 padding
    /// (almost always: the wrong key). -40007.
    #[error("decryption failed: {0} (-40007 DecryptAES)")]
    DecryptAes(&'static str),
    /// The plaintext is not a valid frame: too short, a length field past its end, a message
    /// that is not UTF-8. -40008.
    #[error("decrypted frame is malformed: {0} (-40008 IllegalBuffer)")]
    IllegalBuffer(&'static str),
    /// The ciphertext is not standard, padded base64. -40010.
    #[error("ciphertext is not valid base64 (-40010 DecodeBase64)")]
    DecodeBase64,
}

impl CryptoError {
    /// The error code of the official WXBizMsgCrypt sample libraries (`-40001` …).
    pub fn code(&self) -> i32 {
        match self {
            Self::ValidateSignature => -40001,
            Self::IllegalAesKey(_) => -40004,
            Self::ValidateReceiveId { .. } => -40005,
            Self::EncryptAes(_) => -40006,
            Self::DecryptAes(_) => -40007,
            Self::IllegalBuffer(_) => -40008,
            Self::DecodeBase64 => -40010,
        }
    }
}

/// How a channel reports a crypto failure to the core: a bad key in config is for the operator
/// (500, logged loudly); a message we cannot encrypt is malformed; every other failure means
/// the request was not (intact and) from the platform, so it is refused with 401.
impl From<CryptoError> for ChannelError {
    fn from(error: CryptoError) -> Self {
        match error {
            CryptoError::IllegalAesKey(_) => ChannelError::Misconfigured(error.to_string()),
            CryptoError::EncryptAes(_) => ChannelError::Malformed(error.to_string()),
            _ => ChannelError::BadSignature(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_official_sample_libraries() {
        assert_eq!(CryptoError::ValidateSignature.code(), -40001);
        assert_eq!(CryptoError::IllegalAesKey("x").code(), -40004);
        assert_eq!(CryptoError::ValidateReceiveId { found: String::new() }.code(), -40005);
        assert_eq!(CryptoError::EncryptAes("x").code(), -40006);
        assert_eq!(CryptoError::DecryptAes("x").code(), -40007);
        assert_eq!(CryptoError::IllegalBuffer("x").code(), -40008);
        assert_eq!(CryptoError::DecodeBase64.code(), -40010);
    }

    #[test]
    fn channel_errors_send_key_problems_to_the_operator_and_the_rest_to_401() {
        assert!(matches!(ChannelError::from(CryptoError::IllegalAesKey("x")), ChannelError::Misconfigured(_)));
        for error in [
            CryptoError::ValidateSignature,
            CryptoError::ValidateReceiveId { found: "wx".into() },
            CryptoError::DecryptAes("x"),
            CryptoError::IllegalBuffer("x"),
            CryptoError::DecodeBase64,
        ] {
            assert_eq!(ChannelError::from(error).http_status(), 401);
        }
    }
}
