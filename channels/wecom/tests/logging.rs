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
    Mock::given(method("GET"))
        .and(path("/cgi-bin/gettoken"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"errcode": 0, "access_token": "TOKEN1", "expires_in": 7200})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let answers = [
        (json!({"errcode": 60020, "errmsg": "not allow ip"}), Some(5)),
        (json!({"errcode": 0, "errmsg": "ok"}), Some(1)),
        (json!({"errcode": 60020, "errmsg": "not allow ip"}), None),
    ];
    for (answer, times) in answers {
        let mock = Mock::given(method("POST"))
            .and(path("/cgi-bin/message/send"))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer));
        let mock = match times {
            Some(times) => mock.up_to_n_times(times),
            None => mock,
        };
        mock.mount(&server).await;
    }
    let channel = &channel_with(json!({"api_base": server.uri()}));
    let send = |text| async move { channel.deliver(&delivery(text)).await.is_ok() };
    misconfiguration_is_logged_once_per_run(&captured, send, "60020", "wecom-main", &[SECRET, "TOKEN1"]).await;
}
