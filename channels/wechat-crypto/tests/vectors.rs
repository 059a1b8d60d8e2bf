//! Every official and negative WXBizMsgCrypt vector for the `wechat_mp` and `wecom` platforms
//! from `crypto.json` (PROTOCOLS: "every crypto routine is tested against all of them").
//!
//! The vectors are read from this crate's copy (`tests/vectors/crypto.json`), so the tests run
//! wherever the crate goes; when the shared original is present too, the copy must match it.

use base64::Engine;
use serde_json::Value;
use yizhan_channel_wechat_crypto::{msg_signature, signature, CryptoError, KeySlot, WxCrypto};

/// A key for vectors that exercise only signatures (the constructor needs one).
const ANY_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

fn vectors() -> Vec<Value> {
    let path = format!("{}/tests/vectors/crypto.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let all: Vec<Value> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    all.into_iter().filter(|v| matches!(v["platform"].as_str(), Some("wechat_mp" | "wecom"))).collect()
}

fn vector(name: &str) -> Value {
    vectors()
        .into_iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("vector {name} is missing from crypto.json"))
}

fn s<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_else(|| panic!("field {key} missing in {value}"))
}

fn opt<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value[key].as_str()
}

fn crypto(inputs: &Value, receive_id: &str) -> WxCrypto {
    let key = opt(inputs, "encoding_aes_key").unwrap_or(ANY_KEY);
    WxCrypto::new(s(inputs, "token"), key, None, receive_id).unwrap_or_else(|e| panic!("{e}"))
}

fn receive_id(inputs: &Value) -> &str {
    opt(inputs, "configured_receiveid")
        .or_else(|| opt(inputs, "receiveid"))
        .or_else(|| opt(inputs, "appid"))
        .unwrap_or("")
}

#[test]
fn the_vector_copy_matches_the_shared_original_when_present() {
    let copy = format!("{}/tests/vectors/crypto.json", env!("CARGO_MANIFEST_DIR"));
    let shared = format!("{}/../../../shared/vectors/crypto.json", env!("CARGO_MANIFEST_DIR"));
    if let Ok(original) = std::fs::read_to_string(&shared) {
        let copy = std::fs::read_to_string(&copy).unwrap_or_else(|e| panic!("{copy}: {e}"));
        let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parse(&copy), parse(&original), "tests/vectors/crypto.json is stale; copy it again");
    }
}

/// Runs one vector by its shape; returns false for a shape this runner does not know, so a
/// new vector cannot be skipped silently.
fn run(v: &Value) -> bool {
    let name = s(v, "name");
    let (inputs, expected) = (&v["inputs"], &v["expected"]);
    let rejects = expected["reject"].as_bool() == Some(true);

    if rejects {
        let crypto = crypto(inputs, receive_id(inputs));
        let given = opt(inputs, "msg_signature").or_else(|| opt(inputs, "signature")).unwrap_or_default();
        let (ts, nonce, encrypt) = (s(inputs, "timestamp"), s(inputs, "nonce"), s(inputs, "encrypt"));
        let outcome = crypto.verify_and_decrypt(given, ts, nonce, encrypt);
        let error = match outcome {
            Err(error) => error,
            Ok(decrypted) => panic!("{name}: accepted, decrypted {:?}", decrypted.message),
        };
        if let Some(code) = opt(expected, "error").and_then(|e| e.rsplit('/').next()) {
            assert_eq!(error.code().to_string(), code, "{name}: {error}");
        }
        return true;
    }

    if let Some(random) = opt(inputs, "random16") {
        let crypto = crypto(inputs, s(inputs, "appid"));
        let random: [u8; 16] = random.as_bytes().try_into().unwrap_or_else(|_| panic!("{name}: random16"));
        let encrypt = crypto
            .encrypt_with_random(s(inputs, "msg"), &random, KeySlot::Current)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(encrypt, s(expected, "encrypt"), "{name}");
        let back = crypto.decrypt(&encrypt).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back.message, s(inputs, "msg"), "{name}");
        return true;
    }

    if opt(inputs, "encoding_aes_key").is_some() {
        let crypto = crypto(inputs, receive_id(inputs));
        let encrypt = opt(inputs, "encrypt").or_else(|| opt(inputs, "echostr")).unwrap_or_default();
        let (sig, ts, nonce) = (s(inputs, "msg_signature"), s(inputs, "timestamp"), s(inputs, "nonce"));
        assert_eq!(msg_signature(s(inputs, "token"), ts, nonce, encrypt), sig, "{name}");
        let decrypted = crypto.verify_and_decrypt(sig, ts, nonce, encrypt).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(decrypted.key, KeySlot::Current);
        let plaintext = opt(expected, "plaintext_xml").or_else(|| opt(expected, "response_body"));
        assert_eq!(Some(decrypted.message.as_str()), plaintext, "{name}");
        if let Some(random) = opt(expected, "random") {
            assert_eq!(&decrypted.random[..random.len()], random.as_bytes(), "{name}");
        }
        if let Some(len) = expected["msg_len"].as_u64() {
            assert_eq!(decrypted.message.len() as u64, len, "{name}");
        }
        // Re-encrypting with the frame's own random prefix must reproduce the ciphertext
        // byte for byte: the padding we write is the padding WeChat wrote.
        let again = crypto
            .encrypt_with_random(&decrypted.message, &decrypted.random, KeySlot::Current)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(again, encrypt, "{name}");
        return true;
    }

    if let Some(given) = opt(inputs, "signature") {
        let (token, ts, nonce) = (s(inputs, "token"), s(inputs, "timestamp"), s(inputs, "nonce"));
        assert_eq!(signature(token, ts, nonce), given, "{name}");
        assert!(crypto(inputs, "").verify_signature(given, ts, nonce).is_ok(), "{name}");
        if let Some(concat) = opt(expected, "concat") {
            let mut parts = [token, ts, nonce];
            parts.sort_unstable();
            assert_eq!(parts.concat(), concat, "{name}");
        }
        return true;
    }
    false
}

#[test]
fn every_wechat_and_wecom_vector_passes() {
    let all = vectors();
    assert!(all.len() >= 9, "only {} vectors found", all.len());
    for v in &all {
        assert!(run(v), "vector {} has a shape this test does not know", v["name"]);
    }
}

#[test]
fn mp_encrypt_fixed_random_1_is_reproduced_byte_for_byte() {
    let v = vector("mp_encrypt_fixed_random_1");
    let inputs = &v["inputs"];
    let crypto = crypto(inputs, s(inputs, "appid"));
    let encrypt = crypto
        .encrypt_with_random(s(inputs, "msg"), b"aaaabbbbccccdddd", KeySlot::Current)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(encrypt, "jn1L23DB+6ELqJ+6bruv21Y6MD7KeIfP82D6gU39rmkgczbWwt5+3bnyg5K55bgVtVzd832WzZGMhkP72vVOfg==");
}

#[test]
fn wecom_verify_url_qdg6ek_decrypts_the_echostr() {
    let v = vector("wecom_verify_url_QDG6eK");
    let inputs = &v["inputs"];
    let crypto = crypto(inputs, s(inputs, "receiveid"));
    let decrypted = crypto
        .verify_and_decrypt(
            s(inputs, "msg_signature"),
            s(inputs, "timestamp"),
            s(inputs, "nonce"),
            s(inputs, "echostr"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decrypted.message, "1616140317555161061");
    assert_eq!(&decrypted.random, b"c41b64491c2468d0");
}

#[test]
fn wecom_decrypt_msg_qdg6ek_has_a_pad_of_30_and_is_untrimmed() {
    let v = vector("wecom_decrypt_msg_QDG6eK");
    let inputs = &v["inputs"];
    let crypto = crypto(inputs, s(inputs, "receiveid"));
    let encrypt = s(inputs, "encrypt");
    let decrypted = crypto
        .verify_and_decrypt(s(inputs, "msg_signature"), s(inputs, "timestamp"), s(inputs, "nonce"), encrypt)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decrypted.message, s(&v["expected"], "plaintext_xml"));
    assert!(decrypted.message.contains("</ToUserName>\n<FromUserName>"));
    assert_eq!(decrypted.message.len(), 284);
    // random(16) + len(4) + msg(284) + receiveid(18) = 322 bytes; the ciphertext is 352.
    let raw = base64::engine::general_purpose::STANDARD.decode(encrypt).unwrap_or_default();
    let framed = 16 + 4 + 284 + s(inputs, "receiveid").len();
    assert_eq!(raw.len() - framed, 30);
}

#[test]
fn mp_decrypt_compat_mode_spamtest_opens_the_encrypted_part() {
    let v = vector("mp_decrypt_compat_mode_spamtest");
    let inputs = &v["inputs"];
    let crypto = crypto(inputs, s(inputs, "appid"));
    let body = s(inputs, "post_body_xml");
    let encrypt = s(inputs, "encrypt");
    assert!(body.contains(&format!("<Encrypt><![CDATA[{encrypt}]]></Encrypt>")));
    let decrypted = crypto
        .verify_and_decrypt(s(inputs, "msg_signature"), s(inputs, "timestamp"), s(inputs, "nonce"), encrypt)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decrypted.message, s(&v["expected"], "plaintext_xml"));
}

#[test]
fn neg_wecom_wrong_receiveid_is_refused_with_40005() {
    let v = vector("neg_wecom_wrong_receiveid");
    let inputs = &v["inputs"];
    let crypto = crypto(inputs, s(inputs, "configured_receiveid"));
    let outcome = crypto.verify_and_decrypt(
        s(inputs, "msg_signature"),
        s(inputs, "timestamp"),
        s(inputs, "nonce"),
        s(inputs, "encrypt"),
    );
    assert_eq!(outcome, Err(CryptoError::ValidateReceiveId { found: "wx5823bf96d3bd56c7".into() }));
}

#[test]
fn neg_wecom_tampered_signature_is_refused_with_40001() {
    let v = vector("neg_wecom_tampered_signature");
    let inputs = &v["inputs"];
    // The right key and receive id: only the signature is wrong.
    let crypto =
        WxCrypto::new(s(inputs, "token"), "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", None, "wx5823bf96d3bd56c7")
            .unwrap_or_else(|e| panic!("{e}"));
    let outcome = crypto.verify_and_decrypt(
        s(inputs, "msg_signature"),
        s(inputs, "timestamp"),
        s(inputs, "nonce"),
        s(inputs, "encrypt"),
    );
    assert_eq!(outcome.map(|d| d.message), Err(CryptoError::ValidateSignature));
}

#[test]
fn neg_mp_signature_is_3_param_not_4() {
    let v = vector("neg_mp_signature_is_3_param_not_4");
    let inputs = &v["inputs"];
    let (token, sig, ts, nonce, encrypt) =
        (s(inputs, "token"), s(inputs, "signature"), s(inputs, "timestamp"), s(inputs, "nonce"), s(inputs, "encrypt"));
    let crypto = crypto(inputs, "");
    // It is a valid 3-field signature …
    assert!(crypto.verify_signature(sig, ts, nonce).is_ok());
    // … and must not pass as the 4-field msg_signature that covers the body.
    assert_eq!(crypto.verify_msg_signature(sig, ts, nonce, encrypt), Err(CryptoError::ValidateSignature));
    assert_ne!(msg_signature(token, ts, nonce, encrypt), sig);
}
