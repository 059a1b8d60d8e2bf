//! 企业微信 self-built app, end to end: encrypted callback in, `message/send` out.

use crate::helpers::*;
use std::time::Duration;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan::channels::ChannelKinds;
use yizhan_channel_wechat_crypto::{msg_signature, KeySlot, WxCrypto};

const CORP: &str = "wx5823bf96d3bd56c7";
const TOKEN: &str = "QDG6eK";
const AES_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";

async fn spawn_wecom() -> TestApp {
    let (llm, wecom) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    Mock::given(method("GET"))
        .and(path("/cgi-bin/gettoken"))
        .and(query_param("corpid", CORP))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"errcode":0,"errmsg":"ok","access_token":"WT","expires_in":7200})),
        )
        .mount(&wecom)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/send"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"errcode":0,"errmsg":"ok","msgid":"m"})),
        )
        .mount(&wecom)
        .await;
    let config = format!(
        "{}\n[[channels]]\nid = \"wc\"\nkind = \"wecom\"\ncorp_id = \"{CORP}\"\ncorp_secret = \"s\"\nagent_id = 1000002\n\
         token = \"{TOKEN}\"\nencoding_aes_key = \"{AES_KEY}\"\napi_base = \"{}\"\n",
        base_config(&llm, &wecom),
        wecom.uri()
    );
    spawn_with(&config, &[], ChannelKinds::builtin(), wecom, llm).await
}

fn callback(corp: &str, user: &str, msg_id: u64, content: &str) -> (String, String) {
    let inner = format!(
        "<xml><ToUserName><![CDATA[{corp}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>\
         <CreateTime>{}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{content}]]></Content>\
         <MsgId>{msg_id}</MsgId><AgentID>1000002</AgentID></xml>",
        now()
    );
    encrypted(corp, &inner)
}

/// An event callback (`subscribe`, `enter_agent` …) from `user`.
fn event_callback(user: &str, event: &str) -> (String, String) {
    let inner = format!(
        "<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>\
         <CreateTime>{}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event>\
         <EventKey><![CDATA[]]></EventKey><AgentID>1000002</AgentID></xml>",
        now()
    );
    encrypted(CORP, &inner)
}

/// The query and body WeCom posts for the plaintext callback `inner`.
fn encrypted(corp: &str, inner: &str) -> (String, String) {
    let crypto = WxCrypto::new(TOKEN, AES_KEY, None, corp).unwrap_or_else(|e| panic!("{e}"));
    let encrypt = crypto.encrypt(inner, KeySlot::Current).unwrap_or_else(|e| panic!("{e}"));
    let (timestamp, nonce) = (now().to_string(), "1372623149");
    let query = format!(
        "msg_signature={}&timestamp={timestamp}&nonce={nonce}",
        msg_signature(TOKEN, &timestamp, nonce, &encrypt)
    );
    let body = format!(
        "<xml><ToUserName><![CDATA[{corp}]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt><AgentID><![CDATA[1000002]]></AgentID></xml>"
    );
    (query, body)
}

impl TestApp {
    async fn post_wecom(&self, query: &str, body: &str) -> (u16, String) {
        let response = self
            .http
            .post(format!("{}?{query}", self.webhook_url("wc")))
            .body(body.to_owned())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (response.status().as_u16(), response.text().await.unwrap_or_default())
    }

    async fn wecom_sends(&self) -> Vec<serde_json::Value> {
        self.wechat
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.url.path() == "/cgi-bin/message/send")
            .map(|r| serde_json::from_slice(&r.body).unwrap_or_default())
            .collect()
    }
}

#[actix_web::test]
async fn an_encrypted_callback_is_answered_through_message_send_once() {
    let app = spawn_wecom().await;
    let (query, body) = callback(CORP, "zhangsan", 9001, "你好");
    for _ in 0..3 {
        assert_eq!(app.post_wecom(&query, &body).await, (200, String::new()));
    }
    app.wait_until_idle().await;
    let sent = app.wecom_sends().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["touser"], "zhangsan");
    assert_eq!(sent[0]["agentid"], 1000002);
    assert_eq!(sent[0]["msgtype"], "markdown");
    assert_eq!(sent[0]["markdown"]["content"], "答：你好");
    assert_eq!(app.llm_requests().await.len(), 1);
}

/// (Within a window of the start, as here, a part of a new message goes without the check at
/// all: the last run may have sent its text. The rule for a different part with the same text
/// later on is covered by the channel's own tests, `repeats` and `tests/api.rs`.)
#[actix_web::test]
async fn an_answer_repeated_word_for_word_is_not_swallowed_by_the_duplicate_check() {
    let app = spawn_wecom().await;
    for msg_id in [9101, 9102] {
        let (query, body) = callback(CORP, "zhaoliu", msg_id, "在吗");
        assert_eq!(app.post_wecom(&query, &body).await, (200, String::new()));
        app.wait_until_idle().await;
    }
    let sent = app.wecom_sends().await;
    let checks: Vec<&serde_json::Value> = sent.iter().map(|send| &send["enable_duplicate_check"]).collect();
    assert_eq!(checks, [0, 0], "{sent:?}");
    assert!(sent.iter().all(|send| send["markdown"]["content"] == "答：在吗"), "{sent:?}");
}

#[actix_web::test]
async fn a_follow_gets_the_welcome_but_opening_the_app_gets_nothing() {
    let app = spawn_wecom().await;
    for (user, event) in [("lisi", "enter_agent"), ("wangwu", "subscribe")] {
        let (query, body) = event_callback(user, event);
        assert_eq!(app.post_wecom(&query, &body).await, (200, String::new()));
    }
    app.wait_until_idle().await;
    let sent = app.wecom_sends().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["touser"], "wangwu");
    assert!(sent[0]["markdown"]["content"].as_str().unwrap_or_default().contains("AI"), "{sent:?}");
    assert!(app.llm_requests().await.is_empty());
}

/// WeCom posts an event again when its answer is slow (same CreateTime, no MsgId): one welcome.
#[actix_web::test]
async fn a_follow_retried_by_wecom_gets_one_welcome() {
    let app = spawn_wecom().await;
    let (query, body) = event_callback("wangwu", "subscribe");
    for _ in 0..3 {
        assert_eq!(app.post_wecom(&query, &body).await, (200, String::new()));
    }
    app.wait_until_idle().await;
    let sent = app.wecom_sends().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["touser"], "wangwu");
}

#[actix_web::test]
async fn a_bad_signature_or_another_corp_is_rejected() {
    let app = spawn_wecom().await;
    let (query, body) = callback(CORP, "lisi", 9002, "你好");
    let forged = query.replacen("msg_signature=", "msg_signature=0", 1);
    assert_eq!(app.post_wecom(&forged, &body).await.0, 401);
    // Of the right length, one digit off.
    let (signature, rest) = query.split_once('&').unwrap_or_default();
    let flipped = if signature.ends_with('0') { '1' } else { '0' };
    let same_length = format!("{}{flipped}&{rest}", &signature[..signature.len() - 1]);
    assert_eq!(app.post_wecom(&same_length, &body).await.0, 401);
    let (query, body) = callback("wwOtherCorp", "lisi", 9003, "你好");
    assert_eq!(app.post_wecom(&query, &body).await.0, 401);
    app.wait_until_idle().await;
    assert!(app.llm_requests().await.is_empty());
}

#[actix_web::test]
async fn the_official_url_verification_vector_is_answered_with_the_plaintext() {
    // WeCom's vector is from 2014: the replay window must be off for it.
    let (llm, wecom) = (MockServer::start().await, MockServer::start().await);
    let config = format!(
        "{}\n[[channels]]\nid = \"wc\"\nkind = \"wecom\"\ncorp_id = \"{CORP}\"\ncorp_secret = \"s\"\nagent_id = 1\n\
         token = \"{TOKEN}\"\nencoding_aes_key = \"{AES_KEY}\"\napi_base = \"{}\"\nreplay_window_secs = 0\n",
        base_config(&llm, &wecom),
        wecom.uri()
    );
    let app = spawn_with(&config, &[], ChannelKinds::builtin(), wecom, llm).await;
    let query = "msg_signature=5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3&timestamp=1409659589&nonce=263014780&echostr=P9nAzCzyDtyTWESHep1vC5X9xho%2FqYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp%2B4RPcs8TgAE7OaBO%2BFZXvnaqQ%3D%3D";
    let response =
        app.http.get(format!("{}?{query}", app.webhook_url("wc"))).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await.unwrap_or_default(), "1616140317555161061");
}

/// WeCom's URL check as the console sends it today: a fresh timestamp inside the default
/// replay window is answered with the plaintext; one from an hour ago is refused.
#[actix_web::test]
async fn a_fresh_url_verification_is_answered_and_a_stale_one_refused() {
    let app = spawn_wecom().await;
    let crypto = WxCrypto::new(TOKEN, AES_KEY, None, CORP).unwrap_or_else(|e| panic!("{e}"));
    let echostr = crypto.encrypt("4411057398122566751", KeySlot::Current).unwrap_or_else(|e| panic!("{e}"));
    let url_encoded = echostr.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
    let verify = |timestamp: u64| {
        let (timestamp, nonce) = (timestamp.to_string(), "1372623149");
        let signature = msg_signature(TOKEN, &timestamp, nonce, &echostr);
        let url = format!(
            "{}?msg_signature={signature}&timestamp={timestamp}&nonce={nonce}&echostr={url_encoded}",
            app.webhook_url("wc")
        );
        let http = app.http.clone();
        async move {
            let response = http.get(url).send().await.unwrap_or_else(|e| panic!("{e}"));
            (response.status().as_u16(), response.text().await.unwrap_or_default())
        }
    };
    assert_eq!(verify(now()).await, (200, "4411057398122566751".to_owned()));
    assert_eq!(verify(now() - 3_600).await.0, 401);
}

/// A callback for another app of the corp (its AgentID; a console pointing two apps at one
/// URL) is acknowledged and not answered: this app would answer as itself.
#[actix_web::test]
async fn a_callback_for_another_app_is_acknowledged_and_not_answered() {
    let app = spawn_wecom().await;
    let inner = format!(
        "<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><FromUserName><![CDATA[sunqi]]></FromUserName>\
         <CreateTime>{}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[别的应用]]></Content>\
         <MsgId>9201</MsgId><AgentID>1000003</AgentID></xml>",
        now()
    );
    let (query, body) = encrypted(CORP, &inner);
    let body = body.replace("<AgentID><![CDATA[1000002]]></AgentID>", "<AgentID><![CDATA[1000003]]></AgentID>");
    assert_eq!(app.post_wecom(&query, &body).await, (200, String::new()));
    app.wait_until_idle().await;
    assert!(app.llm_requests().await.is_empty());
    assert!(app.wecom_sends().await.is_empty());
}
