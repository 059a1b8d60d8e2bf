//! WeCom's per-member send limit through the real `deliver` path, in virtual time: the 31st
//! message to one member within a minute waits for the window (WeCom would silently drop it),
//! nothing is lost or reordered, and other members are not held up.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan_channel_core::Channel;

/// The members and contents of the sends WeCom received, in arrival order.
async fn sends(server: &MockServer) -> Vec<(String, String)> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|request| request.url.path() == "/cgi-bin/message/send")
        .map(|request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
            let field = |value: &Value| value.as_str().unwrap_or_default().to_owned();
            (field(&body["touser"]), field(&body["markdown"]["content"]))
        })
        .collect()
}

async fn sends_to(server: &MockServer, user: &str) -> usize {
    sends(server).await.iter().filter(|(to, _)| to == user).count()
}

/// Lets the other tasks (and the HTTP exchanges) run until `count` sends reached `user`. Real
/// time bounds it, because virtual time stands still here.
async fn settle(server: &MockServer, user: &str, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sends_to(server, user).await < count {
        assert!(std::time::Instant::now() < deadline, "only {} sends reached {user}", sends_to(server, user).await);
        tokio::task::yield_now().await;
    }
    // A few more turns, so a send that should be waiting had every chance to go out.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_thirty_first_send_in_a_minute_waits_for_the_window_while_others_go_through() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/cgi-bin/gettoken"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"errcode": 0, "access_token": "T", "expires_in": 7200})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": 0, "errmsg": "ok", "msgid": "m"})))
        .mount(&server)
        .await;
    let channel = Arc::new(channel_with(json!({"api_base": server.uri()})));

    // NOTE: while a blocking task runs, tokio does not auto-advance paused time (documented on
    // `tokio::time::pause`). Without this, waiting for wiremock's socket would jump the clock to
    // the next timer and fire the request timeout. Time now moves only through `advance`.
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let auto_advance_off = tokio::task::spawn_blocking(move || {
        let _ = hold.recv();
    });

    let start = Instant::now();
    let alice = tokio::spawn({
        let channel = channel.clone();
        async move {
            let mut finished_at = Vec::new();
            for n in 0..31 {
                let sent = channel.deliver(&delivery_to("alice", &format!("m{n}"))).await;
                assert!(sent.is_ok(), "m{n}: {sent:?}");
                finished_at.push(start.elapsed());
            }
            finished_at
        }
    });

    settle(&server, "alice", 30).await;
    assert_eq!(sends_to(&server, "alice").await, 30, "the 31st went out inside the minute");

    // Bob is not held up by Alice's full window.
    let bob = channel.deliver(&delivery_to("bob", "hi bob")).await;
    assert!(bob.is_ok(), "{bob:?}");
    assert_eq!(start.elapsed(), Duration::ZERO);

    // A minute is not enough: the slot frees one second of slack later.
    tokio::time::advance(Duration::from_secs(60)).await;
    settle(&server, "alice", 30).await;
    assert_eq!(sends_to(&server, "alice").await, 30);
    tokio::time::advance(Duration::from_secs(1)).await;

    let finished_at = alice.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(finished_at[..30].iter().all(Duration::is_zero), "{finished_at:?}");
    assert_eq!(finished_at[30], Duration::from_secs(61));

    let sends = sends(&server).await;
    let alice_sends: Vec<&str> = sends.iter().filter(|(to, _)| to == "alice").map(|(_, text)| text.as_str()).collect();
    let expected: Vec<String> = (0..31).map(|n| format!("m{n}")).collect();
    assert_eq!(alice_sends, expected.iter().map(String::as_str).collect::<Vec<_>>(), "lost or reordered");
    let bob_at = sends.iter().position(|(to, _)| to == "bob");
    let last_alice_at = sends.iter().position(|(_, text)| text == "m30");
    assert!(bob_at < last_alice_at, "bob waited behind alice: {sends:?}");

    drop(release);
    auto_advance_off.await.unwrap_or_else(|e| panic!("{e}"));
}
