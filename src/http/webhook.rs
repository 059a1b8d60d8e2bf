//! `GET|POST /webhooks/{channel_id}`: verify, parse, dedupe, journal, dispatch, acknowledge.
//!
//! Invariant: nothing here waits for the model. The only awaits are the store's journal write,
//! which must complete before the platform is told the message arrived.

use crate::hub::Hub;
use crate::routing::Router;
use crate::store::Acceptance;
use actix_web::http::Method as HttpMethod;
use actix_web::{web, HttpRequest, HttpResponse};
use std::time::{Instant, SystemTime};
use yizhan_channel_core::{ChannelId, Method, WebhookOutcome, WebhookRequest, WebhookResponse};

/// What the HTTP handlers share.
pub struct AppState {
    /// The core's wiring.
    pub hub: Hub,
    /// Where accepted envelopes go.
    pub router: Router,
}

fn respond(response: WebhookResponse) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(response.status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status).content_type(response.content_type).body(response.body)
}

fn plain(status: actix_web::http::StatusCode, text: &'static str) -> HttpResponse {
    HttpResponse::build(status).content_type("text/plain; charset=utf-8").body(text)
}

/// The webhook endpoint for every channel.
pub async fn webhook(
    request: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> HttpResponse {
    let started = Instant::now();
    let hub = &state.hub;
    let Some(entry) = ChannelId::parse(&path).ok().and_then(|id| hub.channels.get(&id)) else {
        hub.metrics.webhook_requests.with_label_values(&["_unknown", "unknown_channel"]).inc();
        tracing::info!(channel = %path.as_str(), "Webhook for an unknown channel.");
        return plain(actix_web::http::StatusCode::NOT_FOUND, "unknown channel");
    };
    let channel = &entry.channel;
    let label = channel.id().as_str();
    let method = match *request.method() {
        HttpMethod::GET => Method::Get,
        HttpMethod::POST => Method::Post,
        _ => {
            hub.metrics.webhook_requests.with_label_values(&[label, "method_not_allowed"]).inc();
            return plain(actix_web::http::StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
        }
    };
    let raw_query = request.query_string().to_owned();
    let query: Vec<(String, String)> = serde_urlencoded::from_str(&raw_query).unwrap_or_default();
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let webhook_request = WebhookRequest { method, query, raw_query, headers, body, received_at: SystemTime::now() };

    let (outcome, response) = match channel.handle_webhook(&webhook_request) {
        Err(error) => {
            tracing::warn!(channel = %label, reason = %error, "Webhook rejected.");
            let status = actix_web::http::StatusCode::from_u16(error.http_status())
                .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST);
            (error.label(), plain(status, error.label()))
        }
        Ok(WebhookOutcome::Respond(response)) => ("responded", respond(response)),
        Ok(WebhookOutcome::Accepted { envelopes, ack }) => {
            let mut outcome = "duplicate";
            let mut failed = false;
            for envelope in envelopes {
                match hub.store.accept(&envelope, hub.dedupe_ttl).await {
                    Ok(Acceptance::New) => {
                        outcome = "accepted";
                        hub.metrics.journal_open.inc();
                        tracing::debug!(channel = %label, message = %envelope.platform_message_id, "Message accepted.");
                        state.router.dispatch(envelope);
                    }
                    Ok(Acceptance::Duplicate) => {
                        tracing::debug!(channel = %label, message = %envelope.platform_message_id, "Platform retry ignored.");
                    }
                    Err(error) => {
                        // Not acknowledged, so the platform retries; what was journaled dedupes.
                        tracing::error!(channel = %label, %error, "Failed to journal a message.");
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                ("store_error", plain(actix_web::http::StatusCode::SERVICE_UNAVAILABLE, "try again"))
            } else {
                (outcome, respond(ack))
            }
        }
    };
    hub.metrics.webhook_requests.with_label_values(&[label, outcome]).inc();
    hub.metrics.webhook_ack_seconds.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
    response
}
