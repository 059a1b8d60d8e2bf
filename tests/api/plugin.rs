//! A plugin channel from `examples/plugin-channel`, registered through the public API.

use crate::helpers::*;
use std::sync::Arc;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan::channels::ChannelKinds;
use yizhan_channel_core::{
    BoxFuture, Channel, ChannelError, ChannelId, Delivery, DeliveryReceipt, WebhookOutcome, WebhookRequest,
};
use yizhan_plugin_example::HttpJson;

#[actix_web::test]
async fn a_plugin_channel_receives_and_answers_through_the_core() {
    let mut kinds = ChannelKinds::builtin();
    kinds.register(HttpJson::KIND, |settings, http| Ok(Arc::new(HttpJson::from_settings(settings, http.clone())?)));
    let app = spawn_intranet(kinds, Duration::ZERO).await;

    let unauthorized = app
        .http
        .post(app.webhook_url("intranet"))
        .json(&serde_json::json!({"message_id":"m0","user":"alice","text":"hi"}))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or_default();
    assert_eq!(unauthorized, 401);

    let accepted = app.post_intranet(serde_json::json!({"message_id":"m1","user":"alice","text":"插件你好"})).await;
    assert_eq!(accepted, 200);
    app.wait_until_idle().await;
    let answers = answers_received(&app).await;
    let bodies: Vec<&serde_json::Value> = answers.iter().map(|(body, _)| body).collect();
    assert_eq!(bodies, [&serde_json::json!({"user":"alice","text":"答：插件你好","in_reply_to":"m1"})]);
    assert!(!answers[0].1.is_empty(), "each part carries its delivery id as Idempotency-Key");

    // A plugin that hands over a blank id is refused, not deduplicated into silence.
    for blank in ["", "  "] {
        let refused =
            app.post_intranet(serde_json::json!({"message_id": blank, "user":"bob", "text":"没有编号"})).await;
        assert_eq!(refused, 400);
    }
    // Nor are a user id of a page's size or one with a line break (session keys, and logged).
    for user in ["u".repeat(600), "a\nb".to_owned()] {
        let refused = app.post_intranet(serde_json::json!({"message_id": "m9", "user": user, "text":"你好"})).await;
        assert_eq!(refused, 400, "{user:.10}");
    }
    assert!(app.metrics().await.contains(r#"yizhan_webhook_requests_total{channel="intranet",outcome="malformed"} 4"#));
}

/// The app with an `http_json` channel "intranet" built by `kinds`, its callback a stand-in at
/// `/answers` and an echoing LLM that answers after `llm_delay`.
async fn spawn_intranet(kinds: ChannelKinds, llm_delay: Duration) -> TestApp {
    spawn_intranet_answering(kinds, llm_delay, ResponseTemplate::new(200)).await
}

/// [`spawn_intranet`], its callback answering `answer`.
async fn spawn_intranet_answering(kinds: ChannelKinds, llm_delay: Duration, answer: ResponseTemplate) -> TestApp {
    let (llm, callback) = intranet_stand_ins(llm_delay, answer).await;
    spawn_with(&intranet_config(&llm, &callback), &[], kinds, callback, llm).await
}

/// An LLM echoing after `llm_delay`, and the "intranet" callback answering `answer`.
async fn intranet_stand_ins(llm_delay: Duration, answer: ResponseTemplate) -> (MockServer, MockServer) {
    let (llm, callback) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, llm_delay).await;
    Mock::given(method("POST")).and(path("/answers")).respond_with(answer).mount(&callback).await;
    (llm, callback)
}

/// The base config with the "intranet" plugin channel answering to `callback`.
fn intranet_config(llm: &MockServer, callback: &MockServer) -> String {
    format!(
        "{}\n[[channels]]\nid = \"intranet\"\nkind = \"http_json\"\ntoken = \"plugin-secret-token\"\ncallback_url = \"{}/answers\"\n",
        base_config(llm, callback),
        callback.uri()
    )
}

/// The answers the stand-in callback received: each body, with its Idempotency-Key header.
impl TestApp {
    /// Posts `message` to the "intranet" channel with its bearer token; the status (0 when the
    /// request failed).
    async fn post_intranet(&self, message: serde_json::Value) -> u16 {
        let request = self.http.post(self.webhook_url("intranet")).bearer_auth("plugin-secret-token").json(&message);
        request.send().await.map(|r| r.status().as_u16()).unwrap_or_default()
    }
}

async fn answers_received(app: &TestApp) -> Vec<(serde_json::Value, String)> {
    app.wechat
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path() == "/answers")
        .map(|r| {
            let key = r.headers.get("idempotency-key").and_then(|key| key.to_str().ok()).unwrap_or_default();
            (serde_json::from_slice(&r.body).unwrap_or_default(), key.to_owned())
        })
        .collect()
}

/// The example plugin with an author's mistake: another `id()`, or its webhooks handled by
/// `webhook` in its place.
struct Altered {
    plugin: HttpJson,
    /// Answered by `id()` instead of the configured id.
    id: Option<ChannelId>,
    webhook: fn(&HttpJson, &WebhookRequest) -> Result<WebhookOutcome, ChannelError>,
}

impl Altered {
    fn webhooks(
        plugin: HttpJson,
        webhook: fn(&HttpJson, &WebhookRequest) -> Result<WebhookOutcome, ChannelError>,
    ) -> Self {
        Self { plugin, id: None, webhook }
    }
}

impl Channel for Altered {
    fn id(&self) -> &ChannelId {
        self.id.as_ref().unwrap_or_else(|| self.plugin.id())
    }

    fn kind(&self) -> &str {
        self.plugin.kind()
    }

    fn handle_webhook(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
        (self.webhook)(&self.plugin, request)
    }

    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        self.plugin.deliver(delivery)
    }
}

/// A careless author's envelopes: the same `id` for every message, and another channel's id and
/// kind.
fn careless_webhook(plugin: &HttpJson, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
    let mut outcome = plugin.handle_webhook(request)?;
    if let WebhookOutcome::Accepted { envelopes, .. } = &mut outcome {
        for envelope in envelopes {
            envelope.id = "same-for-all".into();
            envelope.channel = ChannelId::parse("elsewhere").unwrap_or_else(|e| panic!("{e}"));
            envelope.channel_kind = "other".into();
        }
    }
    Ok(outcome)
}

/// A careless author's ids: the sender's as the caller gave it with a line break added (not
/// checked against the core's rule).
fn webhook_with_unusable_ids(plugin: &HttpJson, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
    let mut outcome = plugin.handle_webhook(request)?;
    if let WebhookOutcome::Accepted { envelopes, .. } = &mut outcome {
        for envelope in envelopes {
            envelope.sender.id.push('\n');
        }
    }
    Ok(outcome)
}

/// A bug: the parser panics on one message.
fn webhook_panicking_on_boom(plugin: &HttpJson, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
    if request.body.windows(4).any(|window| window == b"boom") {
        panic!("a bug in a plugin's parser");
    }
    plugin.handle_webhook(request)
}

/// The hub holds a plugin to its rule for ids whatever the plugin checked: a message with a
/// line break in its sender's id is refused with 400 (the platform hears of it), not journaled.
#[actix_web::test]
async fn a_message_a_plugin_hands_over_with_unusable_ids_is_refused_by_the_hub() {
    let mut kinds = ChannelKinds::builtin();
    kinds.register(HttpJson::KIND, |settings, http| {
        Ok(Arc::new(Altered::webhooks(HttpJson::from_settings(settings, http.clone())?, webhook_with_unusable_ids)))
    });
    let app = spawn_intranet(kinds, Duration::ZERO).await;
    let status = app.post_intranet(serde_json::json!({"message_id": "m1", "user": "erin", "text": "你好"})).await;
    assert_eq!(status, 400);
    app.wait_until_idle().await;
    assert!(app.llm_requests().await.is_empty());
    assert!(app.metrics().await.contains(r#"yizhan_webhook_requests_total{channel="intranet",outcome="malformed"} 1"#));
}

#[actix_web::test]
async fn the_hub_sets_the_envelope_id_and_channel_whatever_a_plugin_put_there() {
    let mut kinds = ChannelKinds::builtin();
    kinds.register(HttpJson::KIND, |settings, http| {
        Ok(Arc::new(Altered::webhooks(HttpJson::from_settings(settings, http.clone())?, careless_webhook)))
    });
    let (llm, callback) = intranet_stand_ins(Duration::ZERO, ResponseTemplate::new(200)).await;
    // Both answers held until both messages are open together.
    let held = HeldAnswers::start(&llm, 2);
    let env = [held.env_override()];
    let app = spawn_with(&intranet_config(&llm, &callback), &env, kinds, callback, llm).await;
    let post =
        |id: &str, user: &str| app.post_intranet(serde_json::json!({"message_id": id, "user": user, "text": id}));
    let statuses = tokio::join!(post("c1", "carol"), post("c2", "dave"));
    assert_eq!(statuses, (200, 200));
    app.wait_for_metric("yizhan_journal_open 2").await;
    held.release(2);
    app.wait_until_idle().await;
    let mut answered: Vec<String> = answers_received(&app)
        .await
        .iter()
        .filter_map(|(answer, _)| answer["in_reply_to"].as_str().map(str::to_owned))
        .collect();
    answered.sort();
    assert_eq!(answered, ["c1", "c2"]);
}

/// Envelopes carry the channel's `id()`: one that is not the configured id would have their
/// answers, dedupe and settings looked up under the wrong channel, so start-up refuses it.
#[actix_web::test]
async fn a_plugin_whose_id_is_not_the_configured_one_is_refused_at_start() {
    let mut kinds = ChannelKinds::builtin();
    kinds.register(HttpJson::KIND, |settings, http| {
        let own = ChannelId::parse("mine").unwrap_or_else(|e| panic!("{e}"));
        let plugin = HttpJson::from_settings(settings, http.clone())?;
        Ok(Arc::new(Altered { plugin, id: Some(own), webhook: <HttpJson as Channel>::handle_webhook }))
    });
    let error = start_error(kinds).await;
    assert!(error.contains("\"intranet\"") && error.contains("\"mine\""), "{error}");
}

/// A channel that panics on a request answers that request 500 and nothing else is disturbed:
/// the next message on the channel is accepted and answered.
#[actix_web::test]
async fn a_channel_that_panics_on_a_webhook_answers_500_and_keeps_serving() {
    let mut kinds = ChannelKinds::builtin();
    kinds.register(HttpJson::KIND, |settings, http| {
        Ok(Arc::new(Altered::webhooks(HttpJson::from_settings(settings, http.clone())?, webhook_panicking_on_boom)))
    });
    let app = spawn_intranet(kinds, Duration::ZERO).await;
    let status = app.post_intranet(serde_json::json!({"message_id":"p1","user":"erin","text":"boom"})).await;
    assert_eq!(status, 500);
    let status = app.post_intranet(serde_json::json!({"message_id":"p2","user":"erin","text":"还在吗"})).await;
    assert_eq!(status, 200);
    app.wait_until_idle().await;
    let answers = answers_received(&app).await;
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].0["text"], "答：还在吗");
    assert!(app.metrics().await.contains(r#"outcome="channel_panicked"} 1"#));
}

/// A callback behind a redirect (http → https, an SSO login page) must not count as delivered:
/// followed, the POST would become a bodiless GET. The part fails as misconfigured instead.
#[actix_web::test]
async fn a_callback_that_redirects_is_a_misconfiguration_not_a_delivery() {
    let mut kinds = ChannelKinds::builtin();
    kinds.register(HttpJson::KIND, |settings, http| Ok(Arc::new(HttpJson::from_settings(settings, http.clone())?)));
    let moved = ResponseTemplate::new(301).insert_header("location", "/elsewhere");
    let app = spawn_intranet_answering(kinds, Duration::ZERO, moved).await;
    let accepted = app.post_intranet(serde_json::json!({"message_id":"m1","user":"alice","text":"你好"})).await;
    assert_eq!(accepted, 200);
    app.wait_until_idle().await;
    let requests = app.wechat.received_requests().await.unwrap_or_default();
    assert!(requests.iter().all(|request| request.url.path() == "/answers"), "the redirect was followed");
    let metrics = app.metrics().await;
    assert!(metrics.contains(r#"yizhan_deliveries_total{channel="intranet",outcome="misconfigured"} 1"#), "{metrics}");
    assert!(!metrics.contains(r#"outcome="delivered""#), "{metrics}");
}

/// The callback's `Retry-After` on a 429 or 503 is the pause the core keeps for the account.
#[actix_web::test]
async fn the_callbacks_retry_after_is_passed_on() {
    let callback = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/answers"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "7"))
        .mount(&callback)
        .await;
    let settings = yizhan_channel_core::ChannelSettings {
        id: ChannelId::parse("intranet").unwrap_or_else(|e| panic!("{e}")),
        kind: HttpJson::KIND.into(),
        table: serde_json::json!({"token": "a-long-token", "callback_url": format!("{}/answers", callback.uri())}),
    };
    let channel = HttpJson::from_settings(&settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"));
    let part = Delivery {
        delivery_id: "e-0".into(),
        channel: settings.id.clone(),
        conversation: yizhan_channel_core::Conversation {
            kind: yizhan_channel_core::ConversationKind::Direct,
            id: "u".into(),
        },
        recipient: yizhan_channel_core::Sender { id: "u".into(), name: None },
        reply_handle: yizhan_channel_core::ReplyHandle::default(),
        reply: yizhan_channel_core::Reply::text("答"),
    };
    let sent = channel.deliver(&part).await;
    assert!(
        matches!(sent, Err(ChannelError::Transient { retry_after: Some(wait), .. }) if wait == Duration::from_secs(7)),
        "{sent:?}"
    );
}

/// A channel whose parts would hold nothing (`max_part_bytes` 0) is refused at start, naming it,
/// instead of cutting every answer into empty parts.
#[actix_web::test]
async fn a_plugin_whose_parts_hold_nothing_is_refused_at_start() {
    struct NoRoom(HttpJson);
    impl Channel for NoRoom {
        fn id(&self) -> &ChannelId {
            self.0.id()
        }
        fn kind(&self) -> &str {
            self.0.kind()
        }
        fn capabilities(&self) -> yizhan_channel_core::Capabilities {
            yizhan_channel_core::Capabilities { max_part_bytes: 0, ..self.0.capabilities() }
        }
        fn handle_webhook(&self, request: &WebhookRequest) -> Result<WebhookOutcome, ChannelError> {
            self.0.handle_webhook(request)
        }
        fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
            self.0.deliver(delivery)
        }
    }
    let mut kinds = ChannelKinds::builtin();
    kinds.register(HttpJson::KIND, |settings, http| {
        Ok(Arc::new(NoRoom(HttpJson::from_settings(settings, http.clone())?)))
    });
    let error = start_error(kinds).await;
    assert!(error.contains("\"intranet\"") && error.contains("max_part_bytes"), "{error}");
}

/// Why the app with an `http_json` channel "intranet" built by `kinds` refuses to start.
async fn start_error(kinds: ChannelKinds) -> String {
    let (llm, callback) = (MockServer::start().await, MockServer::start().await);
    let config = format!(
        "{}\n[[channels]]\nid = \"intranet\"\nkind = \"http_json\"\ntoken = \"plugin-secret-token\"\ncallback_url = \"{}/answers\"\n",
        base_config(&llm, &callback),
        callback.uri()
    );
    let config = yizhan::config::Config::from_toml(&config, std::iter::empty()).unwrap_or_else(|e| panic!("{e:#}"));
    match yizhan::startup::Application::build_with(config, kinds).await {
        Ok(_) => panic!("started"),
        Err(error) => format!("{error:#}"),
    }
}

/// A callback nobody listens on: the failure says why (the connection was refused), not only
/// that sending failed, and is worth another try.
#[actix_web::test]
async fn an_unreachable_callback_fails_transiently_with_its_cause() {
    use yizhan_channel_core::{ChannelSettings, Conversation, ConversationKind, Reply, ReplyHandle, Sender};
    let settings = ChannelSettings {
        id: ChannelId::parse("intranet").unwrap_or_else(|e| panic!("{e}")),
        kind: HttpJson::KIND.into(),
        // A privileged port nothing listens on here.
        table: serde_json::json!({"token": "plugin-secret-token", "callback_url": "http://127.0.0.1:9/answers"}),
    };
    let channel = HttpJson::from_settings(&settings, reqwest::Client::new()).unwrap_or_else(|e| panic!("{e}"));
    let delivery = Delivery {
        delivery_id: "d1".into(),
        channel: settings.id.clone(),
        conversation: Conversation { kind: ConversationKind::Direct, id: "alice".into() },
        recipient: Sender { id: "alice".into(), name: None },
        reply_handle: ReplyHandle(serde_json::json!({"in_reply_to": "m1"})),
        reply: Reply::text("答"),
    };
    match channel.deliver(&delivery).await {
        Err(ChannelError::Transient { reason, .. }) => {
            assert!(reason.to_lowercase().contains("connect"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}
