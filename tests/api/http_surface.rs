//! Health, metrics and the rules every webhook follows.

use crate::helpers::*;
use std::time::Duration;

#[actix_web::test]
async fn healthz_answers_ok() {
    let app = spawn_app(&[], Duration::ZERO).await;
    let response = app.http.get(format!("{}/healthz", app.address)).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    assert_eq!(body["status"], "ok");
}

#[actix_web::test]
async fn an_unknown_channel_is_404() {
    let app = spawn_app(&[], Duration::ZERO).await;
    let response = app.http.post(app.webhook_url("nope")).body("x").send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 404);
}

#[actix_web::test]
async fn a_body_over_the_limit_is_413() {
    let app = spawn_app(&[("YIZHAN__SERVER__BODY_LIMIT_BYTES", "1024")], Duration::ZERO).await;
    let url = format!("{}?{}", app.webhook_url(CHANNEL), signed_query(now()));
    let response = app.http.post(&url).body("x".repeat(4096)).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 413);
    // Without a Content-Length (chunked), the size is counted as the body arrives.
    let chunks = (0..8).map(|_| Ok::<_, std::io::Error>("x".repeat(512)));
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let response = app.http.post(&url).body(chunked).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 413);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("yizhan_webhook_requests_total{channel=\"mp\",outcome=\"body_too_large\"} 2"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn a_compressed_body_is_415_and_counted() {
    let app = spawn_app(&[], Duration::ZERO).await;
    let url = format!("{}?{}", app.webhook_url(CHANNEL), signed_query(now()));
    // A tiny gzip body could expand far past the limit before it is checked; none is unpacked.
    let gzip_of_zeros: &[u8] = &[0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0x03, 0x03, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
    let response = app
        .http
        .post(url)
        .header("content-encoding", "identity, GZIP")
        .body(gzip_of_zeros)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 415);
    let metrics = app.metrics().await;
    assert!(metrics.contains("yizhan_webhook_requests_total{channel=\"mp\",outcome=\"body_encoded\"} 1"), "{metrics}");
}

#[actix_web::test]
async fn a_body_that_stops_arriving_is_408_once_its_time_is_up() {
    let app = spawn_app(&[("YIZHAN__SERVER__BODY_TIMEOUT_MS", "200")], Duration::ZERO).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let target = format!("/webhooks/{CHANNEL}?{}", signed_query(now()));
    // Headers promise 100 bytes; 10 arrive, and the client keeps the connection open.
    let response = actix_web::rt::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&address).unwrap_or_else(|e| panic!("{e}"));
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap_or_else(|e| panic!("{e}"));
        let head = format!("POST {target} HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n<xml><To>");
        stream.write_all(head.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let mut response = Vec::new();
        let mut buffer = [0u8; 1024];
        while !String::from_utf8_lossy(&response).contains("\r\n\r\n") {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => response.extend_from_slice(&buffer[..read]),
            }
        }
        String::from_utf8_lossy(&response).into_owned()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    // Had it been accepted, its answer would be on its way: waited for, it would show.
    app.wait_until_idle().await;
    assert!(app.llm_requests().await.is_empty());
    assert!(!app.metrics().await.contains(r#"outcome="accepted""#));
}

/// Sends `head` (a request whose chunked body never comes, or a whole one) and reads until the
/// server closes the connection; with `then`, once the first response is in, sends `then` on
/// the same connection and goes on reading. Returns what was answered, and whether the server
/// closed the connection within `patience`.
fn answer_then_close(address: &str, head: &str, then: Option<&str>, patience: Duration) -> (String, bool) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap_or_else(|e| panic!("{e}"));
    stream.set_read_timeout(Some(patience)).unwrap_or_else(|e| panic!("{e}"));
    stream.write_all(head.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let mut response = Vec::new();
    let mut buffer = [0u8; 1024];
    let mut then = then;
    let closed = loop {
        if let Some(next) = then.filter(|_| whole_response(&response)) {
            stream.write_all(next.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            then = None;
        }
        match stream.read(&mut buffer) {
            Ok(0) => break true,
            Ok(read) => response.extend_from_slice(&buffer[..read]),
            // Reset (the server closed with bytes unread) counts as closed; a timeout does not.
            Err(error) => break !matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    };
    (String::from_utf8_lossy(&response).into_owned(), closed)
}

/// Whether `bytes` hold a response head and as much body as its `content-length` says.
fn whole_response(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok()).flatten()
    });
    body.len() >= length.unwrap_or(0)
}

/// A request answered without its chunked body read to the end (refused, or a route that
/// reads none) ends its connection: actix would otherwise wait, with no deadline, for the
/// rest of a body the client need never send, one connection held per such request.
#[actix_web::test]
async fn a_connection_whose_body_is_left_unread_is_closed() {
    let app = spawn_app(&[("YIZHAN__SERVER__BODY_TIMEOUT_MS", "200")], Duration::ZERO).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let chunked = "Host: test\r\nTransfer-Encoding: chunked\r\n\r\n";
    let patience = Duration::from_secs(10);
    let xml = text_xml("oKeepAlive", 1, "你好");
    let message = format!("{:x}\r\n{xml}\r\n0\r\n\r\n", xml.len());
    // A body read to its end keeps the connection: a second request on it is answered too.
    let then = "GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    let signed = |rest: &str| format!("POST /webhooks/{CHANNEL}?{} HTTP/1.1\r\n{chunked}{rest}", signed_query(now()));
    let requests = [
        ("404", format!("POST /webhooks/nope HTTP/1.1\r\n{chunked}"), None),
        ("200", format!("GET /healthz HTTP/1.1\r\n{chunked}"), None),
        ("404", format!("POST /elsewhere HTTP/1.1\r\n{chunked}"), None),
        // One chunk of the body arrives: too slow (408).
        ("408", signed("5\r\n<xml>\r\n"), None),
        ("200", signed(&message), Some(then)),
    ];
    let answers = actix_web::rt::task::spawn_blocking(move || {
        // At once, so that the waits for the close overlap (actix lingers a second).
        let asked: Vec<_> = requests
            .into_iter()
            .map(|(status, head, then)| {
                let address = address.clone();
                std::thread::spawn(move || (status, then, answer_then_close(&address, &head, then, patience)))
            })
            .collect();
        asked.into_iter().map(|thread| thread.join().unwrap_or_else(|_| panic!("client thread"))).collect::<Vec<_>>()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for (status, then, (response, closed)) in answers {
        assert!(response.starts_with(&format!("HTTP/1.1 {status}")), "{response}");
        assert!(closed, "left open after: {response}");
        if then.is_some() {
            assert_eq!(response.matches("HTTP/1.1 200").count(), 2, "no second request carried: {response}");
        } else {
            assert!(response.contains("connection: close"), "{response}");
        }
    }
}

/// A connection left holding a half-sent request head after a response (actix-web's keep-alive
/// timer stops at its first byte, and no head timer follows) is closed once it has carried no
/// request for `stalled_connection_secs`.
#[actix_web::test]
async fn a_connection_stalled_in_a_later_request_head_is_closed() {
    let app = spawn_app(&[("YIZHAN__SERVER__STALLED_CONNECTION_SECS", "1")], Duration::ZERO).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let (response, closed) = actix_web::rt::task::spawn_blocking(move || {
        let head = "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";
        answer_then_close(&address, head, Some("G"), Duration::from_secs(10))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(closed, "left open: {response}");
}

#[actix_web::test]
async fn malformed_xml_with_a_valid_signature_is_400() {
    let app = spawn_app(&[], Duration::ZERO).await;
    let (status, _) = app.post_signed("<xml><FromUserName>oops").await;
    assert_eq!(status, 400);
    let (status, _) = app.post_signed("not xml at all").await;
    assert_eq!(status, 400);
    app.wait_until_idle().await;
    assert!(app.llm_requests().await.is_empty());
    assert!(!app.metrics().await.contains(r#"outcome="accepted""#));
}

#[actix_web::test]
async fn metrics_expose_webhook_llm_and_session_figures() {
    let app = spawn_app(&[], Duration::ZERO).await;
    app.post_text("oUser1", 1, "你好").await;
    app.wait_until_idle().await;
    let metrics = app.metrics().await;
    for name in [
        "yizhan_webhook_requests_total{channel=\"mp\",outcome=\"accepted\"} 1",
        "yizhan_webhook_ack_seconds_bucket",
        "yizhan_llm_request_seconds_bucket",
        "yizhan_sessions_alive 1",
        "yizhan_llm_queue_depth 0",
        "yizhan_deliveries_total{channel=\"mp\",outcome=\"delivered\"} 1",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
}

/// At start-up the model's server is asked whether it is there (`GET /v1/models` with the
/// key), so that a wrong address or key shows in the log before any user meets the apology.
#[actix_web::test]
async fn the_llm_server_is_probed_at_start_with_the_key() {
    let app = spawn_app(&[("YIZHAN__LLM__API_KEY", "sk-probe")], Duration::ZERO).await;
    wait_for("the start-up probe", || async {
        let requests = app.llm.received_requests().await.unwrap_or_default();
        requests.iter().any(|request| request.url.path() == "/v1/models")
    })
    .await;
    let requests = app.llm.received_requests().await.unwrap_or_default();
    let probes: Vec<_> = requests.iter().filter(|request| request.url.path() == "/v1/models").collect();
    assert_eq!(probes.len(), 1);
    assert_eq!(probes[0].method, wiremock::http::Method::GET);
    let authorization = probes[0].headers.get("authorization").and_then(|value| value.to_str().ok());
    assert_eq!(authorization, Some("Bearer sk-probe"));
}
