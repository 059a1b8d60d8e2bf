//! Helpers shared by the outbound-API tests: a channel pointed at a wiremock server, a part to
//! deliver, and the stand-in's token and send endpoints.
#![allow(dead_code)]

use serde_json::{json, Value};
use wiremock::matchers::{body_json, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};
use yizhan_channel_core::{
    ChannelError, ChannelId, Conversation, ConversationKind, Delivery, Envelope, Event, Reply, ReplyHandle, Segment,
    Sender,
};
use yizhan_channel_wechat_mp::{WechatMp, WechatMpSettings};

pub const SECRET: &str = "the-app-secret";
pub const OPENID: &str = "oUser123";

pub fn settings(api_base: String) -> WechatMpSettings {
    serde_json::from_value(json!({
        "app_id": "wx0123456789",
        "app_secret": SECRET,
        "token": "tok",
        "api_base": format!("{api_base}/"),
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

pub fn channel_for(server: &MockServer) -> WechatMp {
    channel_with_client(server, reqwest::Client::new())
}

pub fn channel_with_client(server: &MockServer, http: reqwest::Client) -> WechatMp {
    let id = ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}"));
    WechatMp::new(id, settings(server.uri()), http).unwrap_or_else(|e| panic!("{e}"))
}

pub fn delivery(text: &str) -> Delivery {
    Delivery {
        delivery_id: "d1".into(),
        channel: ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}")),
        conversation: Conversation { kind: ConversationKind::Direct, id: OPENID.into() },
        recipient: Sender { id: OPENID.into(), name: None },
        reply_handle: ReplyHandle(json!({"account": "gh_acct"})),
        reply: Reply::text(text),
    }
}

pub fn envelope() -> Envelope {
    Envelope {
        id: Envelope::new_id(),
        channel: ChannelId::parse("mp").unwrap_or_else(|e| panic!("{e}")),
        channel_kind: "wechat_mp".into(),
        platform_message_id: "1".into(),
        received_at_ms: 0,
        conversation: Conversation { kind: ConversationKind::Direct, id: OPENID.into() },
        sender: Sender { id: OPENID.into(), name: None },
        content: vec![Segment::Event(Event::Subscribe { scene: None })],
        mentions_self: true,
        reply_handle: ReplyHandle(json!({"account": "gh_acct"})),
    }
}

pub fn token_request() -> Value {
    json!({
        "grant_type": "client_credential",
        "appid": "wx0123456789",
        "secret": SECRET,
        "force_refresh": false,
    })
}

pub async fn mount_token(server: &MockServer, token: &str, times: u64) {
    token_mock(token).up_to_n_times(times).expect(times).mount(server).await;
}

/// The token endpoint, without a call-count expectation: for tests whose client may time out
/// before the token request even arrives.
pub async fn mount_token_unchecked(server: &MockServer, token: &str) {
    token_mock(token).mount(server).await;
}

fn token_mock(token: &str) -> Mock {
    Mock::given(method("POST"))
        .and(path("/cgi-bin/stable_token"))
        .and(body_json(token_request()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"access_token": token, "expires_in": 7200})))
}

pub async fn mount_send(server: &MockServer, token: &str, answer: Value, times: u64) {
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .and(query_param("access_token", token))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer))
        .expect(times)
        .mount(server)
        .await;
}

pub async fn requests_to(server: &MockServer, wanted: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|request| request.url.path() == wanted)
        .collect()
}

pub fn json_body(request: &Request) -> Value {
    serde_json::from_slice(&request.body).unwrap_or_else(|e| panic!("{e}"))
}

/// No error, whatever its kind, may carry the secret or the token.
pub fn assert_no_secrets(error: &ChannelError, token: &str) {
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(SECRET), "secret leaked: {shown}");
    assert!(!shown.contains(token), "token leaked: {shown}");
}
