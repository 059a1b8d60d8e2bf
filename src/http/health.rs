//! `GET /healthz` and `GET /metrics`.

use super::AppState;
use actix_web::{web, HttpResponse};

/// Liveness: the process serves HTTP and its actors run.
pub async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "status": "ok",
        "channels": state.hub.channels.len(),
        "sessions": state.router.sessions().len(),
    }))
}

/// Prometheus text exposition.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(state.hub.metrics.render())
}
