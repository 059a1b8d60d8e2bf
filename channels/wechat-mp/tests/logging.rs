//! Logging of misconfigurations: once per code until a send succeeds, never with secrets.
//!
//! NOTE: a test binary of its own. `tracing::subscriber::set_default` is per thread, but
//! tracing caches per-callsite interest process-wide; a concurrent test hitting the same
//! callsites without a subscriber could make this one miss events.

mod common;

use common::*;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan_channel_core::testkit::{capture_logs, misconfiguration_is_logged_once_per_run};
use yizhan_channel_core::Channel;

#[tokio::test]
async fn a_misconfiguration_is_logged_once_per_code_until_a_send_succeeds_and_never_with_secrets() {
    // NOTE: a current-thread test runtime, so the thread-local default covers every await.
    let (captured, _guard) = capture_logs();

    let server = MockServer::start().await;
    mount_token(&server, "TOKEN1", 1).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": 40164, "errmsg": "invalid ip"})))
        .up_to_n_times(5)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": 0, "errmsg": "ok"})))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"errcode": 40164, "errmsg": "invalid ip"})))
        .mount(&server)
        .await;
    let channel = &channel_for(&server);
    let send = |text| async move { channel.deliver(&delivery(text)).await.is_ok() };
    misconfiguration_is_logged_once_per_run(&captured, send, "40164", "mp", &[SECRET, "TOKEN1"]).await;
}
