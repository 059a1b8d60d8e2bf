//! Writes pre-encrypted 公众号 safe-mode (安全模式) requests for the benchmark, one per line:
//! `<query>\t<body>`. Each has its own MsgId, so none is a duplicate. `examples/bench/safe.lua`
//! replays them with wrk.
//!
//! Usage: `bench_safe_bodies COUNT OUT_FILE` (token `benchtoken`, appid `wxbench`, and the
//! EncodingAESKey below must match the bench config).

use std::io::Write;
use yizhan_channel_wechat_crypto::{msg_signature, signature, KeySlot, WxCrypto};

/// The benchmark's EncodingAESKey (43 characters).
const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().and_then(|value| value.parse().ok()).unwrap_or(100_000);
    let path = args.next().unwrap_or_else(|| "safe-bodies.txt".into());
    let crypto = WxCrypto::new("benchtoken", AES_KEY, None, "wxbench")?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let (timestamp, nonce) = ("1700000000", "1");
    let plain_signature = signature("benchtoken", timestamp, nonce);
    for msg_id in 1..=count {
        let xml = format!(
            "<xml><ToUserName><![CDATA[gh_bench]]></ToUserName><FromUserName><![CDATA[oBench{}]]></FromUserName>\
             <CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType>\
             <Content><![CDATA[你好，请介绍一下你自己]]></Content><MsgId>{msg_id}</MsgId></xml>",
            msg_id % 1000
        );
        let encrypt = crypto.encrypt(&xml, KeySlot::Current)?;
        let query = format!(
            "signature={plain_signature}&timestamp={timestamp}&nonce={nonce}&encrypt_type=aes&msg_signature={}",
            msg_signature("benchtoken", timestamp, nonce, &encrypt)
        );
        writeln!(
            out,
            "{query}\t<xml><ToUserName><![CDATA[gh_bench]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
        )?;
    }
    out.flush()?;
    Ok(())
}
