//! Logging of a `bot_open_id` that is not the bot's: once, not per message.
//!
//! NOTE: alone in its own test binary on purpose, as `logging.rs` is. `tracing` caches
//! per-callsite interest globally, so a test in the same process that hits the `warn!` callsite
//! first, on another thread without a subscriber, can make this test's thread-local subscriber
//! miss the line.

use serde_json::json;
use yizhan_channel_core::testkit::capture_logs;
use yizhan_channel_core::{Channel, ChannelId, Method, WebhookOutcome, WebhookRequest};
use yizhan_channel_feishu::{Feishu, FeishuSettings};

const SECRET: &str = "the-app-secret";

/// A wrong `bot_open_id` (open_ids differ per app) makes every group question unanswered; the
/// first group message mentioning people but not it says so, once.
#[test]
fn a_group_message_mentioning_others_but_not_bot_open_id_is_logged_once() {
    let (captured, _guard) = capture_logs();
    let settings: FeishuSettings = serde_json::from_value(json!({
        "app_id": "cli_9f5343c580712544",
        "app_secret": SECRET,
        "verification_token": "vt-0123456789abcdef",
        "bot_open_id": "ou_another_bot",
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let id = ChannelId::parse("fs").unwrap_or_else(|e| panic!("{e}"));
    let channel = Feishu::new(id, settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"));
    let path = format!("{}/tests/fixtures/text_group_mentions.json", env!("CARGO_MANIFEST_DIR"));
    let body = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let body = body.replace("VERIFICATION_TOKEN", "vt-0123456789abcdef");
    for _ in 0..3 {
        let request = WebhookRequest {
            method: Method::Post,
            query: vec![],
            raw_query: String::new(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.clone().into(),
            received_at: std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        };
        let outcome = channel.handle_webhook(&request);
        assert!(matches!(outcome, Ok(WebhookOutcome::Accepted { .. })), "{outcome:?}");
    }
    let lines = captured.lines();
    let warnings: Vec<&String> =
        lines.iter().filter(|line| line.contains("WARN") && line.contains("bot_open_id")).collect();
    assert_eq!(warnings.len(), 1, "{lines:#?}");
}
