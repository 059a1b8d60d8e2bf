//! The byte level of WXBizMsgCrypt: the EncodingAESKey, the plaintext frame, PKCS#7 with a
//! 32-byte block, and AES-256-CBC with IV = key[0..16].
//!
//! Invariants: nothing here panics on any input (all slicing goes through checked splits), and
//! nothing here trims: the official plaintexts carry `\n` between elements that belong to the
//! message.

use crate::CryptoError;
use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::Engine;

type Encryptor = cbc::Encryptor<aes::Aes256>;
type Decryptor = cbc::Decryptor<aes::Aes256>;

/// Length of an EncodingAESKey.
pub const ENCODING_AES_KEY_LEN: usize = 43;

/// WeChat's PKCS#7 block: 32 bytes, so a pad byte is 1..=32 (not AES's 16; PROTOCOLS §0.2).
pub(crate) const PAD_BLOCK: usize = 32;

/// Length of the random prefix of every frame.
const RANDOM_LEN: usize = 16;

/// The decoder for EncodingAESKeys. 43 base64 characters carry 258 bits, and WeChat generates
/// all 43 at random, so the last character's two spare bits are usually non-zero; a strict
/// decoder would reject most real keys. The official samples ignore those bits, and so do we.
const KEY_ENGINE: GeneralPurpose =
    GeneralPurpose::new(&alphabet::STANDARD, GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true));

/// An AES-256 key decoded from an EncodingAESKey. The IV is its first 16 bytes.
#[derive(Clone)]
pub(crate) struct AesKey([u8; 32]);

impl AesKey {
    /// Decodes `Base64_Decode(encoding_aes_key + "=")` after checking the documented shape.
    /// Errors never quote the key.
    pub(crate) fn parse(encoding_aes_key: &str) -> Result<Self, CryptoError> {
        if encoding_aes_key.len() != ENCODING_AES_KEY_LEN {
            return Err(CryptoError::IllegalAesKey("it must be exactly 43 characters"));
        }
        if !encoding_aes_key.bytes().all(|byte| byte.is_ascii_alphanumeric()) {
            return Err(CryptoError::IllegalAesKey("it must contain only the characters A-Z, a-z and 0-9"));
        }
        let decoded = KEY_ENGINE
            .decode(format!("{encoding_aes_key}="))
            .map_err(|_| CryptoError::IllegalAesKey("it is not base64"))?;
        let key: [u8; 32] =
            decoded.try_into().map_err(|_| CryptoError::IllegalAesKey("it does not decode to 32 bytes"))?;
        Ok(Self(key))
    }

    fn iv(&self) -> &[u8] {
        &self.0[..16]
    }

    /// `Base64(AES-CBC(pad32(random || len_be32 || message || receive_id)))`.
    pub(crate) fn seal(&self, message: &[u8], receive_id: &[u8], random: &[u8; 16]) -> Result<String, CryptoError> {
        let len = u32::try_from(message.len())
            .map_err(|_| CryptoError::EncryptAes("the message is longer than a u32 length field allows"))?;
        let mut frame = Vec::with_capacity(RANDOM_LEN + 4 + message.len() + receive_id.len() + PAD_BLOCK);
        frame.extend_from_slice(random);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(message);
        frame.extend_from_slice(receive_id);
        pad(&mut frame);
        let encryptor = Encryptor::new_from_slices(&self.0, self.iv())
            .map_err(|_| CryptoError::IllegalAesKey("it does not decode to 32 bytes"))?;
        // NOTE: `frame` is a multiple of 32 bytes, so NoPadding encrypts it exactly.
        let ciphertext = encryptor.encrypt_padded_vec_mut::<NoPadding>(&frame);
        Ok(STANDARD.encode(ciphertext))
    }

    /// Decrypts raw ciphertext bytes and checks padding and frame; returns the random prefix,
    /// the message bytes and the receive id bytes.
    pub(crate) fn open(&self, ciphertext: &[u8]) -> Result<Opened, CryptoError> {
        if ciphertext.is_empty() || !ciphertext.chunks_exact(16).remainder().is_empty() {
            return Err(CryptoError::DecryptAes("the ciphertext is not a positive multiple of 16 bytes"));
        }
        let decryptor = Decryptor::new_from_slices(&self.0, self.iv())
            .map_err(|_| CryptoError::IllegalAesKey("it does not decode to 32 bytes"))?;
        let plain = decryptor
            .decrypt_padded_vec_mut::<NoPadding>(ciphertext)
            .map_err(|_| CryptoError::DecryptAes("the ciphertext is not a multiple of the AES block"))?;
        let content = unpad(&plain)?;
        parse_frame(content)
    }
}

/// What a frame holds.
pub(crate) struct Opened {
    pub(crate) random: [u8; 16],
    pub(crate) message: Vec<u8>,
    pub(crate) receive_id: Vec<u8>,
}

/// Decodes standard, padded base64 (what WeChat sends); anything else is -40010.
pub(crate) fn decode_base64(encrypt: &str) -> Result<Vec<u8>, CryptoError> {
    STANDARD.decode(encrypt).map_err(|_| CryptoError::DecodeBase64)
}

/// Appends `32 - len % 32` bytes of that value (a whole block when already aligned).
pub(crate) fn pad(buffer: &mut Vec<u8>) {
    let amount = PAD_BLOCK - buffer.len() % PAD_BLOCK;
    // NOTE: `amount` is 1..=32, so the cast cannot truncate.
    buffer.resize(buffer.len() + amount, amount as u8);
}

/// Strips PKCS#7 padding with a 32-byte block, refusing a pad byte of 0 or above 32, longer
/// than the data, or padding bytes that disagree.
///
/// NOTE: not constant-time. Callers verify the signature over the ciphertext first, so a
/// forger never reaches this and there is no padding oracle to time.
pub(crate) fn unpad(plain: &[u8]) -> Result<&[u8], CryptoError> {
    let Some(&last) = plain.last() else {
        return Err(CryptoError::DecryptAes("the plaintext is empty"));
    };
    let amount = usize::from(last);
    if amount == 0 || amount > PAD_BLOCK || amount > plain.len() {
        return Err(CryptoError::DecryptAes("invalid PKCS#7 padding (wrong key?)"));
    }
    let (content, padding) = plain.split_at(plain.len() - amount);
    if padding.iter().any(|&byte| byte != last) {
        return Err(CryptoError::DecryptAes("inconsistent PKCS#7 padding bytes (wrong key?)"));
    }
    Ok(content)
}

/// Splits `random(16) || u32 BE length || message || receive_id`.
pub(crate) fn parse_frame(content: &[u8]) -> Result<Opened, CryptoError> {
    let Some((random, rest)) = content.split_first_chunk::<RANDOM_LEN>() else {
        return Err(CryptoError::IllegalBuffer("the frame is shorter than its 20-byte header"));
    };
    let Some((len, rest)) = rest.split_first_chunk::<4>() else {
        return Err(CryptoError::IllegalBuffer("the frame is shorter than its 20-byte header"));
    };
    let len = usize::try_from(u32::from_be_bytes(*len))
        .map_err(|_| CryptoError::IllegalBuffer("the length field does not fit in memory"))?;
    if len > rest.len() {
        return Err(CryptoError::IllegalBuffer("the length field is larger than the frame"));
    }
    let (message, receive_id) = rest.split_at(len);
    Ok(Opened { random: *random, message: message.to_vec(), receive_id: receive_id.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_fills_up_to_the_next_32_byte_boundary() {
        for len in 0..100 {
            let mut buffer = vec![7u8; len];
            pad(&mut buffer);
            assert_eq!(buffer.len() % 32, 0);
            let amount = buffer.len() - len;
            assert!((1..=32).contains(&amount), "{len}: {amount}");
            assert_eq!(unpad(&buffer).ok(), Some(&vec![7u8; len][..]));
        }
    }

    #[test]
    fn invalid_padding_is_refused() {
        let mut zero = vec![1u8; 32];
        zero[31] = 0;
        assert!(matches!(unpad(&zero), Err(CryptoError::DecryptAes(_))));
        let mut too_big = vec![33u8; 64];
        too_big[63] = 33;
        assert!(matches!(unpad(&too_big), Err(CryptoError::DecryptAes(_))));
        let mut inconsistent = vec![4u8; 32];
        inconsistent[29] = 5;
        assert!(matches!(unpad(&inconsistent), Err(CryptoError::DecryptAes(_))));
        assert!(matches!(unpad(&[5u8; 4]), Err(CryptoError::DecryptAes(_))));
        assert!(matches!(unpad(&[]), Err(CryptoError::DecryptAes(_))));
        // 1..=32 with consistent bytes is fine, including a full block of 32.
        assert_eq!(unpad(&[32u8; 32]).ok(), Some(&[][..]));
    }

    #[test]
    fn frames_are_split_and_bad_lengths_refused() {
        let mut frame = b"0123456789abcdef".to_vec();
        frame.extend_from_slice(&3u32.to_be_bytes());
        frame.extend_from_slice(b"msgwx1");
        let opened = parse_frame(&frame).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&opened.random, b"0123456789abcdef");
        assert_eq!(opened.message, b"msg");
        assert_eq!(opened.receive_id, b"wx1");

        assert!(matches!(parse_frame(&frame[..19]), Err(CryptoError::IllegalBuffer(_))));
        let mut long = frame.clone();
        long[16..20].copy_from_slice(&7u32.to_be_bytes());
        assert!(matches!(parse_frame(&long), Err(CryptoError::IllegalBuffer(_))));
        long[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse_frame(&long), Err(CryptoError::IllegalBuffer(_))));
    }

    #[test]
    fn keys_of_the_wrong_shape_are_refused_without_quoting_them() {
        let good = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
        assert!(AesKey::parse(good).is_ok());
        for bad in [
            "",
            &good[..42],
            &format!("{good}H"),
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDEF+",
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDEF/",
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDEF=",
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDEF ",
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDE好",
        ] {
            match AesKey::parse(bad) {
                Err(error @ CryptoError::IllegalAesKey(_)) => {
                    assert!(bad.is_empty() || !error.to_string().contains(bad), "{error}")
                }
                Err(other) => panic!("{bad:?}: {other:?}"),
                Ok(_) => panic!("accepted {bad:?}"),
            }
        }
    }
}
