//! Feishu's per-chat send limit (5 QPS per user / per group, PROTOCOLS §4.7) through the real
//! `deliver` path, in virtual time: the 6th reply to one chat within a second waits for the
//! window, nothing is lost or reordered, and another chat is not held up.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan_channel_core::{Channel, ChannelId, Conversation, ConversationKind, Delivery, Reply, ReplyHandle, Sender};
use yizhan_channel_feishu::{Feishu, FeishuSettings};

const BUSY_CHAT: &str = "oc_busy";
const OTHER_CHAT: &str = "oc_other";

fn channel_for(server: &MockServer, extra: Value) -> Feishu {
    let mut table = json!({
        "app_id": "cli_1", "app_secret": "the-app-secret", "verification_token": "vt", "api_base": server.uri(),
    });
    if let (Some(table), Some(extra)) = (table.as_object_mut(), extra.as_object()) {
        table.extend(extra.clone());
    }
    let settings: FeishuSettings = serde_json::from_value(table).unwrap_or_else(|e| panic!("{e}"));
    let id = ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}"));
    Feishu::new(id, settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"))
}

/// A reply to message `om_{chat}_{n}` in `chat`.
fn reply_in(chat: &str, n: usize) -> Delivery {
    Delivery {
        delivery_id: format!("d-{chat}-{n}"),
        channel: ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}")),
        conversation: Conversation { kind: ConversationKind::Group, id: chat.into() },
        recipient: Sender { id: "ou_user".into(), name: None },
        reply_handle: ReplyHandle(
            json!({"message_id": format!("om_{chat}_{n}"), "chat_id": chat, "chat_type": "group"}),
        ),
        reply: Reply::text(format!("part {n}")),
    }
}

/// The chats of the replies Feishu received, in arrival order, with their texts.
async fn replies(server: &MockServer) -> Vec<(String, String)> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|request| request.url.path().ends_with("/reply"))
        .map(|request| {
            // `/open-apis/im/v1/messages/om_{chat}_{n}/reply` → chat.
            let message_id = request.url.path().split('/').nth(5).unwrap_or_default();
            let chat = message_id.trim_start_matches("om_").rsplit_once('_').map_or("", |(chat, _)| chat).to_owned();
            let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
            let content: Value = serde_json::from_str(body["content"].as_str().unwrap_or_default()).unwrap_or_default();
            (chat, content["text"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

async fn replies_to(server: &MockServer, chat: &str) -> usize {
    replies(server).await.iter().filter(|(to, _)| to == chat).count()
}

/// Lets the other tasks (and the HTTP exchanges) run until `count` replies reached `chat`. Real
/// time bounds it, because virtual time stands still here.
async fn settle(server: &MockServer, chat: &str, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while replies_to(server, chat).await < count {
        assert!(std::time::Instant::now() < deadline, "only {} replies reached {chat}", replies_to(server, chat).await);
        tokio::task::yield_now().await;
    }
    // A few more turns, so a reply that should be waiting had every chance to go out.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

async fn mount_feishu(server: &MockServer) {
    Mock::given(method("POST"))
        .and(path("/open-apis/auth/v3/tenant_access_token/internal"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"code": 0, "msg": "ok", "tenant_access_token": "t-1", "expire": 7200})),
        )
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/open-apis/im/v1/messages/om_[a-z_0-9]+/reply$"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"code": 0, "msg": "success", "data": {"message_id": "om_new"}})),
        )
        .mount(server)
        .await;
}

/// Runs `test` with tokio's auto-advance of paused time held off.
///
/// NOTE: while a blocking task runs, tokio does not auto-advance paused time (documented on
/// `tokio::time::pause`). Without this, waiting for wiremock's socket would jump the clock to the
/// next timer (the limiter's, or the request timeout). Time then moves only through `advance`.
async fn without_auto_advance<F: std::future::Future<Output = ()>>(test: F) {
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let auto_advance_off = tokio::task::spawn_blocking(move || {
        let _ = hold.recv();
    });
    test.await;
    drop(release);
    auto_advance_off.await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(start_paused = true)]
async fn the_sixth_reply_to_a_chat_within_a_second_waits_for_the_window_while_another_chat_goes_through() {
    let server = MockServer::start().await;
    mount_feishu(&server).await;
    let channel = Arc::new(channel_for(&server, json!({})));

    without_auto_advance(async {
        let start = Instant::now();
        let busy = tokio::spawn({
            let channel = channel.clone();
            async move {
                let mut finished_at = Vec::new();
                for n in 0..6 {
                    let sent = channel.deliver(&reply_in(BUSY_CHAT, n)).await;
                    assert!(sent.is_ok(), "part {n}: {sent:?}");
                    finished_at.push(start.elapsed());
                }
                finished_at
            }
        });

        settle(&server, BUSY_CHAT, 5).await;
        assert_eq!(replies_to(&server, BUSY_CHAT).await, 5, "the 6th went out inside the second");

        // Another chat is not held up by the busy chat's full window.
        let other = channel.deliver(&reply_in(OTHER_CHAT, 0)).await;
        assert!(other.is_ok(), "{other:?}");
        assert_eq!(start.elapsed(), Duration::ZERO);

        // Not before the second is over.
        tokio::time::advance(Duration::from_millis(999)).await;
        settle(&server, BUSY_CHAT, 5).await;
        assert_eq!(replies_to(&server, BUSY_CHAT).await, 5);
        tokio::time::advance(Duration::from_millis(1)).await;

        let finished_at = busy.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(finished_at[..5].iter().all(Duration::is_zero), "{finished_at:?}");
        assert_eq!(finished_at[5], Duration::from_secs(1));

        let replies = replies(&server).await;
        let busy_texts: Vec<&str> =
            replies.iter().filter(|(chat, _)| chat == BUSY_CHAT).map(|(_, text)| text.as_str()).collect();
        assert_eq!(busy_texts, ["part 0", "part 1", "part 2", "part 3", "part 4", "part 5"], "lost or reordered");
        let other_at = replies.iter().position(|(chat, _)| chat == OTHER_CHAT);
        let last_busy_at = replies.iter().position(|(_, text)| text == "part 5");
        assert!(other_at < last_busy_at, "the other chat waited behind the busy one: {replies:?}");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn chat_qps_lowers_the_per_chat_rate() {
    let server = MockServer::start().await;
    mount_feishu(&server).await;
    let channel = Arc::new(channel_for(&server, json!({"chat_qps": 2})));

    without_auto_advance(async {
        let start = Instant::now();
        let busy = tokio::spawn({
            let channel = channel.clone();
            async move {
                for n in 0..3 {
                    let sent = channel.deliver(&reply_in(BUSY_CHAT, n)).await;
                    assert!(sent.is_ok(), "part {n}: {sent:?}");
                }
                start.elapsed()
            }
        });
        settle(&server, BUSY_CHAT, 2).await;
        assert_eq!(replies_to(&server, BUSY_CHAT).await, 2, "the 3rd went out inside the second");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(busy.await.unwrap_or_else(|e| panic!("{e}")), Duration::from_secs(1));
        assert_eq!(replies_to(&server, BUSY_CHAT).await, 3);
    })
    .await;
}
