//! Stand-in servers for the benchmark (see `examples/bench/run.sh`), all on 127.0.0.1:
//! - an OpenAI-compatible LLM that streams a short answer after a configurable delay;
//! - a WeChat API that hands out tokens and accepts customer-service sends (counting them);
//! - a bare actix-web webhook that only answers `success`: the ceiling to compare against.
//!
//! Usage: `bench_standins LLM_PORT WECHAT_PORT BARE_PORT LLM_DELAY_MS`

use actix_web::{web, App, HttpResponse, HttpServer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const ANSWER_SSE: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"你好，\"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"这是压测回答。\"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";

fn arg(index: usize, default: u64) -> u64 {
    std::env::args().nth(index).and_then(|value| value.parse().ok()).unwrap_or(default)
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let (llm_port, wechat_port, bare_port, delay_ms) = (arg(1, 18081), arg(2, 18082), arg(3, 18083), arg(4, 0));
    let delay = Duration::from_millis(delay_ms);
    let llm = HttpServer::new(move || {
        App::new().route(
            "/v1/chat/completions",
            web::post().to(move || async move {
                if !delay.is_zero() {
                    actix_web::rt::time::sleep(delay).await;
                }
                HttpResponse::Ok().content_type("text/event-stream").body(ANSWER_SSE)
            }),
        )
    })
    .workers(1)
    .backlog(4096)
    .max_connections(100_000)
    .bind(("127.0.0.1", llm_port as u16))?
    .run();

    let sent = Arc::new(AtomicU64::new(0));
    let counter = web::Data::new(sent.clone());
    let wechat = HttpServer::new(move || {
        App::new()
            .app_data(counter.clone())
            .route(
                "/cgi-bin/stable_token",
                web::post().to(|| async {
                    HttpResponse::Ok().json(serde_json::json!({"access_token":"BENCH","expires_in":7200}))
                }),
            )
            .route(
                "/cgi-bin/message/custom/send",
                web::post().to(|count: web::Data<Arc<AtomicU64>>| async move {
                    count.fetch_add(1, Ordering::Relaxed);
                    HttpResponse::Ok().json(serde_json::json!({"errcode":0,"errmsg":"ok"}))
                }),
            )
            .route(
                "/cgi-bin/message/custom/typing",
                web::post().to(|| async { HttpResponse::Ok().json(serde_json::json!({"errcode":0,"errmsg":"ok"})) }),
            )
            .route(
                "/stats",
                web::get().to(|count: web::Data<Arc<AtomicU64>>| async move {
                    HttpResponse::Ok().body(count.load(Ordering::Relaxed).to_string())
                }),
            )
    })
    .workers(1)
    .bind(("127.0.0.1", wechat_port as u16))?
    .run();

    let bare = HttpServer::new(|| {
        App::new().route(
            "/webhooks/{channel_id}",
            web::route()
                .to(|_body: web::Bytes| async { HttpResponse::Ok().content_type("text/plain").body("success") }),
        )
    })
    .bind(("127.0.0.1", bare_port as u16))?
    .run();

    eprintln!("stand-ins: llm :{llm_port} (delay {delay_ms} ms), wechat :{wechat_port}, bare :{bare_port}");
    let (a, b, c) = futures_util::join!(llm, wechat, bare);
    a.and(b).and(c)
}
