//! WXBizMsgCrypt — the message encryption of WeChat Official Accounts (公众号 安全模式 / 兼容模式),
//! WeCom (企业微信) apps and WeCom AI bots — for Yizhan's channels.
//!
//! # Layout
//! - [`WxCrypto`]: one account's token, EncodingAESKey(s) and receive id; verifies, decrypts,
//!   encrypts and builds encrypted replies.
//! - [`signature`](mod@signature): the 3-field `signature` and 4-field `msg_signature`, with a constant-time
//!   comparison.
//! - [`EncryptedReply`]: an encrypted passive reply, as XML or (WeCom) JSON.
//! - [`CryptoError`]: failures, numbered like the official sample libraries (`-40001` …).
//! - `frame`: the byte level (key decoding, 32-byte PKCS#7, the plaintext frame, AES-CBC).
//!
//! # The algorithm (PROTOCOLS §1)
//! `AESKey = base64_decode(EncodingAESKey + "=")` (32 bytes), `IV = AESKey[0..16]`, AES-256-CBC.
//! Plaintext frame: `random(16) || u32 BE len(msg) || msg || receive_id`, padded with PKCS#7 over
//! a **32-byte** block; `Encrypt = base64(ciphertext)`;
//! `msg_signature = hex(sha1(concat(sort([token, timestamp, nonce, Encrypt]))))`.
//!
//! # Design decisions
//! - **Verify, then decrypt.** [`WxCrypto::verify_and_decrypt`] checks `msg_signature` (in
//!   constant time) before touching the ciphertext, so a forger never reaches the padding check
//!   and there is no padding oracle.
//! - **Strict where the official samples are lax.** Padding bytes must be 1..=32 and agree; the
//!   length field must fit the frame; the receive id must equal the configured one (a frame for
//!   another appid / corpid is refused, -40005); the message must be UTF-8. None of it is
//!   trimmed.
//! - **Key rotation.** WeChat lets an operator change the EncodingAESKey; messages already in
//!   flight still use the old one. [`WxCrypto`] holds a `current` and an optional `previous` key,
//!   [`decrypt`](WxCrypto::decrypt) tries them in that order and reports the [`KeySlot`] that
//!   worked, and the reply is encrypted with the same slot so the sender can read it.
//! - **Nothing secret leaves.** `Debug` shows neither token nor keys; errors never quote them.
//!
//! # Example
//! ```
//! use yizhan_channel_wechat_crypto::{KeySlot, WxCrypto};
//! let crypto = WxCrypto::new("token", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", None, "wx123")?;
//! let encrypt = crypto.encrypt("<xml/>", KeySlot::Current)?;
//! let signature = yizhan_channel_wechat_crypto::msg_signature("token", "1409735669", "42", &encrypt);
//! let opened = crypto.verify_and_decrypt(&signature, "1409735669", "42", &encrypt)?;
//! assert_eq!(opened.message, "<xml/>");
//! assert_eq!(opened.key, KeySlot::Current);
//! # Ok::<(), yizhan_channel_wechat_crypto::CryptoError>(())
//! ```
#![warn(missing_docs)]

mod error;
mod frame;
mod reply;
pub mod signature;

pub use error::CryptoError;
pub use frame::ENCODING_AES_KEY_LEN;
pub use reply::EncryptedReply;
pub use signature::{msg_signature, signature, signatures_match};

use frame::AesKey;
use std::fmt;
use std::str::FromStr;

/// Which configured EncodingAESKey opened a message, so that the reply uses the same one.
///
/// Serialised (in reply handles, logs) as `"current"` / `"previous"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeySlot {
    /// The EncodingAESKey currently configured on the platform.
    #[default]
    Current,
    /// The one before it, kept while messages encrypted with it may still arrive.
    Previous,
}

impl KeySlot {
    /// `"current"` or `"previous"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Previous => "previous",
        }
    }
}

impl fmt::Display for KeySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeySlot {
    type Err = String;

    /// Parses what [`as_str`](KeySlot::as_str) writes.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "current" => Ok(Self::Current),
            "previous" => Ok(Self::Previous),
            other => Err(format!("unknown key slot {other:?}; expected \"current\" or \"previous\"")),
        }
    }
}

/// A message that passed decryption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decrypted {
    /// The message exactly as framed (XML, JSON or a WeCom `echostr`), untrimmed.
    pub message: String,
    /// The key that opened it; encrypt the reply with the same one.
    pub key: KeySlot,
    /// The frame's 16 random bytes. Of no use to a channel; exposed so tests can re-encrypt a
    /// message byte-for-byte.
    pub random: [u8; 16],
}

/// One account's WXBizMsgCrypt state: the token that signs, the EncodingAESKey(s) that encrypt,
/// and the receive id frames must name (MP / mini-program appid, WeCom corpid or suiteid, `""`
/// for a WeCom AI bot).
#[derive(Clone)]
pub struct WxCrypto {
    /// Signs every call. Secret: anyone holding it can forge signatures.
    token: String,
    /// The key WeChat uses now.
    current: AesKey,
    /// The key before the last rotation, tried when `current` fails.
    previous: Option<AesKey>,
    /// What every frame must end with; a frame naming another account is refused.
    receive_id: String,
}

// NOTE: hand-written so that neither the token nor a key can reach a log line through `{:?}`.
impl fmt::Debug for WxCrypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WxCrypto")
            .field("token", &"<redacted>")
            .field("current", &"<redacted>")
            .field("previous", &self.previous.as_ref().map(|_| "<redacted>"))
            .field("receive_id", &self.receive_id)
            .finish()
    }
}

/// Checks an EncodingAESKey's shape (43 characters of `[A-Za-z0-9]` that decode to 32 bytes)
/// without keeping it, so settings can be validated with a precise message.
pub fn validate_encoding_aes_key(encoding_aes_key: &str) -> Result<(), CryptoError> {
    AesKey::parse(encoding_aes_key).map(|_| ())
}

impl WxCrypto {
    /// Builds the state for one account. `previous` is the EncodingAESKey before the last
    /// rotation, if messages encrypted with it may still arrive. Fails with
    /// [`CryptoError::IllegalAesKey`] when a key is malformed.
    pub fn new(
        token: &str,
        encoding_aes_key: &str,
        previous: Option<&str>,
        receive_id: &str,
    ) -> Result<Self, CryptoError> {
        Ok(Self {
            token: token.to_owned(),
            current: AesKey::parse(encoding_aes_key)?,
            previous: previous.map(AesKey::parse).transpose()?,
            receive_id: receive_id.to_owned(),
        })
    }

    /// The receive id frames must carry.
    pub fn receive_id(&self) -> &str {
        &self.receive_id
    }

    /// Whether a previous key is configured.
    pub fn has_previous(&self) -> bool {
        self.previous.is_some()
    }

    /// Checks the plain 3-field `signature` (MP GET URL verification, plaintext pushes).
    pub fn verify_signature(&self, signature: &str, timestamp: &str, nonce: &str) -> Result<(), CryptoError> {
        let expected = signature::signature(&self.token, timestamp, nonce);
        if signatures_match(&expected, signature) {
            Ok(())
        } else {
            Err(CryptoError::ValidateSignature)
        }
    }

    /// Checks the 4-field `msg_signature` over `encrypt` (the base64 ciphertext exactly as
    /// received), in constant time.
    pub fn verify_msg_signature(
        &self,
        msg_signature: &str,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
    ) -> Result<(), CryptoError> {
        let expected = signature::msg_signature(&self.token, timestamp, nonce, encrypt);
        if signatures_match(&expected, msg_signature) {
            Ok(())
        } else {
            Err(CryptoError::ValidateSignature)
        }
    }

    /// Verifies `msg_signature`, then decrypts: what every encrypted push (and WeCom's GET
    /// `echostr`) needs.
    pub fn verify_and_decrypt(
        &self,
        msg_signature: &str,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
    ) -> Result<Decrypted, CryptoError> {
        self.verify_msg_signature(msg_signature, timestamp, nonce, encrypt)?;
        self.decrypt(encrypt)
    }

    /// Decrypts a base64 `Encrypt` value with the current key, then the previous one, and
    /// checks padding, frame and receive id. Does **not** check a signature: call
    /// [`verify_msg_signature`](Self::verify_msg_signature) first (or use
    /// [`verify_and_decrypt`](Self::verify_and_decrypt)).
    ///
    /// When both keys fail, the error is the current key's, unless one key opened the frame and
    /// found another receive id: that [`CryptoError::ValidateReceiveId`] is what an operator
    /// needs to see.
    pub fn decrypt(&self, encrypt: &str) -> Result<Decrypted, CryptoError> {
        let ciphertext = frame::decode_base64(encrypt)?;
        let current = match self.open_with(&self.current, &ciphertext, KeySlot::Current) {
            Ok(decrypted) => return Ok(decrypted),
            Err(error) => error,
        };
        let Some(previous) = &self.previous else {
            return Err(current);
        };
        match self.open_with(previous, &ciphertext, KeySlot::Previous) {
            Ok(decrypted) => Ok(decrypted),
            Err(error @ CryptoError::ValidateReceiveId { .. })
                if !matches!(current, CryptoError::ValidateReceiveId { .. }) =>
            {
                Err(error)
            }
            Err(_) => Err(current),
        }
    }

    fn open_with(&self, key: &AesKey, ciphertext: &[u8], slot: KeySlot) -> Result<Decrypted, CryptoError> {
        let opened = key.open(ciphertext)?;
        if opened.receive_id != self.receive_id.as_bytes() {
            let found: String = String::from_utf8_lossy(&opened.receive_id).chars().take(64).collect();
            return Err(CryptoError::ValidateReceiveId { found });
        }
        let message =
            String::from_utf8(opened.message).map_err(|_| CryptoError::IllegalBuffer("the message is not UTF-8"))?;
        Ok(Decrypted { message, key: slot, random: opened.random })
    }

    /// The key for `slot`. [`KeySlot::Previous`] without a previous key (it was removed from
    /// config since the message arrived) falls back to the current key: by then it is the only
    /// one the platform can hold.
    fn key(&self, slot: KeySlot) -> &AesKey {
        match slot {
            KeySlot::Previous => self.previous.as_ref().unwrap_or(&self.current),
            KeySlot::Current => &self.current,
        }
    }

    /// Encrypts `message` for this account with a fresh random prefix; returns the base64
    /// `Encrypt` value. Fails only for a message over 4 GiB.
    pub fn encrypt(&self, message: &str, key: KeySlot) -> Result<String, CryptoError> {
        let random: [u8; 16] = rand::random();
        self.encrypt_with_random(message, &random, key)
    }

    /// [`encrypt`](Self::encrypt) with a chosen random prefix: deterministic, for test vectors.
    /// Never use a fixed prefix in production.
    pub fn encrypt_with_random(&self, message: &str, random: &[u8; 16], key: KeySlot) -> Result<String, CryptoError> {
        self.key(key).seal(message.as_bytes(), self.receive_id.as_bytes(), random)
    }

    /// Encrypts and signs `message` as a passive reply: `timestamp` is chosen by us (the hub's
    /// clock), `nonce` is usually the request's.
    pub fn seal_reply(
        &self,
        message: &str,
        timestamp: i64,
        nonce: &str,
        key: KeySlot,
    ) -> Result<EncryptedReply, CryptoError> {
        let encrypt = self.encrypt(message, key)?;
        let msg_signature = signature::msg_signature(&self.token, &timestamp.to_string(), nonce, &encrypt);
        Ok(EncryptedReply { encrypt, msg_signature, timestamp, nonce: nonce.to_owned() })
    }

    /// The encrypted passive reply as XML (PROTOCOLS §1): `<xml><Encrypt/><MsgSignature/>
    /// <TimeStamp/><Nonce/></xml>`. MP and WeCom XML callbacks.
    pub fn reply_xml(&self, message: &str, timestamp: i64, nonce: &str, key: KeySlot) -> Result<String, CryptoError> {
        Ok(self.seal_reply(message, timestamp, nonce, key)?.to_xml())
    }

    /// The encrypted passive reply as JSON with lower-case keys (`encrypt`, `msgsignature`,
    /// `timestamp`, `nonce`): WeCom JSON callbacks and the WeCom AI bot.
    pub fn reply_json(&self, message: &str, timestamp: i64, nonce: &str, key: KeySlot) -> Result<String, CryptoError> {
        Ok(self.seal_reply(message, timestamp, nonce, key)?.to_json())
    }
}
