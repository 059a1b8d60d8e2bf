//! `GET /healthz` and `GET /metrics`.

use super::AppState;
use actix_web::{web, HttpResponse};

/// Liveness: the process serves HTTP and its store accepts writes (503 with
/// `status: "store_failed"` and the reason otherwise: only a restart helps). While it stops
/// (SIGTERM), 503 with `status: "stopping"`, so that a load balancer sends no more.
pub async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    let (mut response, status, problem) = match state.hub.store.health() {
        Err(why) => (HttpResponse::ServiceUnavailable(), "store_failed", Some(why)),
        Ok(()) if state.hub.passive.is_closing() => (HttpResponse::ServiceUnavailable(), "stopping", None),
        Ok(()) => (HttpResponse::Ok(), "ok", None),
    };
    response.json(serde_json::json!({
        "status": status,
        "problem": problem,
        "channels": state.hub.channels.len(),
        "sessions": state.router.sessions().len(),
    }))
}

/// Prometheus text exposition.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(state.hub.metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Hub, HubInner};
    use crate::llm::client::{LlmClient, LlmClientSettings};
    use crate::llm::openai::{OpenAiBackend, OpenAiSettings};
    use crate::llm::LlmActor;
    use crate::metrics::Metrics;
    use crate::routing::Router;
    use crate::session::SessionRegistry;
    use crate::store::{SqliteStore, Store};
    use actix::Actor;
    use std::sync::Arc;
    use std::time::Duration;
    use yizhan_channel_core::Envelope;

    fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    #[actix_web::test]
    async fn a_store_that_refuses_writes_turns_healthz_to_503() {
        let dir = std::env::temp_dir().join(format!("yizhan-health-{}-{}", std::process::id(), Envelope::new_id()));
        let store = ok(SqliteStore::open_with_failing_disk(&dir.join("store.db")));
        let envelope = crate::store::test_envelope("m1");
        assert!(store.accept(&envelope, Duration::from_secs(60)).await.is_err());
        let (status, body) = healthz_of(state_on(Arc::new(store))).await;
        assert_eq!(status, 503);
        assert_eq!(body["status"], "store_failed");
        assert!(body["problem"].as_str().is_some_and(|problem| problem.contains("failed fsync")), "{body}");
        // Served on the public port: where the store lives is not told.
        assert!(!body.to_string().contains("store.db"), "{body}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[actix_web::test]
    async fn a_stopping_process_says_so_with_503() {
        let state = state_on(Arc::new(crate::store::MemoryStore::new(10)));
        let (status, body) = healthz_of(state.clone()).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
        state.hub.passive.close_for_shutdown();
        let (status, body) = healthz_of(state).await;
        assert_eq!((status, body["status"].as_str()), (503, Some("stopping")));
    }

    /// Stopping, webhook responses close their connection: a kept-alive one would otherwise go
    /// on carrying new messages after the server stopped accepting connections.
    #[actix_web::test]
    async fn while_stopping_webhook_responses_close_their_connection() {
        let state = state_on(Arc::new(crate::store::MemoryStore::new(10)));
        let app = actix_web::test::init_service(
            actix_web::App::new().app_data(state.clone()).route("/webhooks/{id}", web::post().to(crate::http::webhook)),
        )
        .await;
        let connection = |response: &actix_web::dev::ServiceResponse| response.response().head().connection_type();
        let request = || actix_web::test::TestRequest::post().uri("/webhooks/nobody").to_request();
        let running = actix_web::test::call_service(&app, request()).await;
        assert_ne!(connection(&running), actix_web::http::ConnectionType::Close);
        state.hub.passive.close_for_shutdown();
        let stopping = actix_web::test::call_service(&app, request()).await;
        assert_eq!(connection(&stopping), actix_web::http::ConnectionType::Close);
    }

    /// `GET /healthz` against `state`: the status and the JSON body.
    async fn healthz_of(state: web::Data<AppState>) -> (u16, serde_json::Value) {
        let app = actix_web::test::init_service(
            actix_web::App::new().app_data(state).route("/healthz", web::get().to(healthz)),
        )
        .await;
        let request = actix_web::test::TestRequest::get().uri("/healthz").to_request();
        let response = actix_web::test::call_service(&app, request).await;
        let status = response.status().as_u16();
        (status, actix_web::test::read_body_json(response).await)
    }

    /// The state of an app with no channels over `store`.
    fn state_on(store: Arc<dyn Store>) -> web::Data<AppState> {
        let metrics = Metrics::new();
        // Never called: nothing here asks the model.
        let backend = OpenAiBackend::new(OpenAiSettings::new("http://127.0.0.1:9/v1", "m"), reqwest::Client::new());
        let settings = LlmClientSettings {
            first_token_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(1),
            max_retries: 0,
            retry_base_delay: Duration::from_millis(1),
        };
        let llm = LlmActor::new(LlmClient::new(Arc::new(backend), settings), 1, 1, metrics.clone()).start();
        let hub = Hub::new(HubInner {
            store,
            llm,
            channels: Default::default(),
            messages: Default::default(),
            session: Default::default(),
            dedupe_ttl: Duration::from_secs(60),
            metrics,
            passive: Default::default(),
            resumed_streams: Default::default(),
        });
        let sessions = SessionRegistry::new(hub.clone(), Duration::from_secs(60), Vec::new());
        web::Data::new(AppState {
            router: Router::new(hub.clone(), sessions),
            hub,
            body: crate::http::BodyLimits { max_bytes: 1024, timeout: Duration::from_secs(1) },
            refusals: Default::default(),
        })
    }
}
