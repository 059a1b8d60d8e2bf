//! `spawn_app` and the stand-in servers.

use sha1::{Digest, Sha1};
use std::time::{Duration, Instant, SystemTime};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};
use yizhan::channels::ChannelKinds;
use yizhan::config::Config;
use yizhan::startup::Application;

pub const WECHAT_TOKEN: &str = "test-token";
pub const CHANNEL: &str = "mp";

/// A running application and its stand-ins.
pub struct TestApp {
    pub address: String,
    pub wechat: MockServer,
    pub llm: MockServer,
    pub http: reqwest::Client,
    /// Stops the app's actor threads when the test ends (`None`: the app is a process).
    pub _actor_threads: Option<yizhan::startup::ActorThreads>,
}

/// The last user message of an OpenAI chat request.
pub fn last_user_message(request: &Request) -> String {
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
    body["messages"]
        .as_array()
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// An OpenAI streaming body that answers `answer` in a few chunks.
pub fn sse_answer(answer: &str) -> String {
    let mut body = String::new();
    body.push_str(": keep-alive\n\n");
    let chars: Vec<char> = answer.chars().collect();
    for piece in chars.chunks(3) {
        let text: String = piece.iter().collect();
        let chunk = serde_json::json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":text},"finish_reason":null}]});
        body.push_str(&format!("data: {chunk}\n\n"));
    }
    body.push_str("data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n");
    body.push_str("data: [DONE]\n\n");
    body
}

/// A stand-in LLM that answers "答：<question>" after `delay`.
pub async fn echo_llm(server: &MockServer, delay: Duration) {
    echo_llm_mock(delay).mount(server).await;
}

/// The mock [`echo_llm`] mounts, for tests that limit or order it.
pub fn echo_llm_mock(delay: Duration) -> Mock {
    Mock::given(method("POST")).and(path("/v1/chat/completions")).respond_with(move |request: &Request| {
        let answer = format!("答：{}", last_user_message(request));
        ResponseTemplate::new(200)
            .insert_header("content-type", "text/event-stream")
            .set_body_string(sse_answer(&answer))
            .set_delay(delay)
    })
}

/// A stand-in WeChat API: tokens and customer-service sends succeed.
pub async fn wechat_ok(server: &MockServer) {
    wechat_ok_sending_after(server, Duration::ZERO).await;
}

/// A stand-in WeChat that gives tokens and answers every customer-service send with `answer`,
/// after `delay`.
pub async fn wechat_answering_sends_with(server: &MockServer, answer: serde_json::Value, delay: Duration) {
    Mock::given(method("POST"))
        .and(path("/cgi-bin/stable_token"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"access_token":"TOKEN-1","expires_in":7200})),
        )
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer).set_delay(delay))
        .mount(server)
        .await;
}

/// [`wechat_ok`], with each customer-service send answered after `delay`.
pub async fn wechat_ok_sending_after(server: &MockServer, delay: Duration) {
    wechat_answering_sends_with(server, serde_json::json!({"errcode":0,"errmsg":"ok"}), delay).await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/typing"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"errcode":0,"errmsg":"ok"})))
        .mount(server)
        .await;
}

/// The config every test starts from; `extra` is appended (later keys win only in new tables,
/// so tests pass overrides through `env` instead).
pub fn base_config(llm: &MockServer, wechat: &MockServer) -> String {
    format!(
        r#"
[server]
bind = "127.0.0.1:0"
workers = 2

[store]
kind = "memory"

[llm]
backend = "openai"
base_url = "{llm}/v1"
api_key = "sk-test"
model = "test-model"
max_concurrency = 8
max_waiting = 64
first_token_timeout_secs = 10
total_timeout_secs = 20
max_retries = 0

[messages]
ai_label = ""

[delivery]
max_attempts = 3
retry_base_delay_ms = 10
retry_max_delay_ms = 50

[[channels]]
id = "{CHANNEL}"
kind = "wechat_mp"
app_id = "wx-test-app"
app_secret = "test-secret"
token = "{WECHAT_TOKEN}"
api_base = "{wechat}"
reply_mode = "push"
"#,
        llm = llm.uri(),
        wechat = wechat.uri(),
    )
}

/// Starts the application with `config` and these environment overrides.
pub async fn spawn_with(
    config: &str,
    env: &[(&str, &str)],
    kinds: ChannelKinds,
    wechat: MockServer,
    llm: MockServer,
) -> TestApp {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let config = Config::from_toml(config, env).unwrap_or_else(|e| panic!("test config: {e:#}"));
    let app = Application::build_with(config, kinds).await.unwrap_or_else(|e| panic!("build: {e:#}"));
    let address = format!("http://127.0.0.1:{}", app.port());
    let _actor_threads = Some(app.actor_threads());
    actix_web::rt::spawn(app.run_until_stopped());
    TestApp { address, wechat, llm, http: reqwest::Client::new(), _actor_threads }
}

/// Starts the application with the base config, an echoing LLM answering after `llm_delay`, and
/// a WeChat API that accepts everything.
pub async fn spawn_app(env: &[(&str, &str)], llm_delay: Duration) -> TestApp {
    let (llm, wechat) = echo_and_wechat_ok(llm_delay).await;
    spawn_with(&base_config(&llm, &wechat), env, ChannelKinds::builtin(), wechat, llm).await
}

/// [`spawn_app`] with the echoing LLM's first `held` answers kept back until
/// [`HeldAnswers::release`].
pub async fn spawn_app_holding_answers(env: &[(&str, &str)], held: usize) -> (TestApp, HeldAnswers) {
    let (llm, wechat) = echo_and_wechat_ok(Duration::ZERO).await;
    let holder = HeldAnswers::start(&llm, held);
    let mut env = env.to_vec();
    env.push(holder.env_override());
    let app = spawn_with(&base_config(&llm, &wechat), &env, ChannelKinds::builtin(), wechat, llm).await;
    (app, holder)
}

/// The stand-ins of [`spawn_app`]: an LLM echoing after `llm_delay`, and a WeChat API that
/// accepts everything.
async fn echo_and_wechat_ok(llm_delay: Duration) -> (MockServer, MockServer) {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, llm_delay).await;
    wechat_ok(&wechat).await;
    (llm, wechat)
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// WeChat's plaintext-mode signature.
pub fn signature(token: &str, timestamp: &str, nonce: &str) -> String {
    let mut parts = [token, timestamp, nonce];
    parts.sort_unstable();
    hex::encode(Sha1::digest(parts.concat().as_bytes()))
}

/// A signed query string for the WeChat webhook.
pub fn signed_query(timestamp: u64) -> String {
    let (timestamp, nonce) = (timestamp.to_string(), "8763");
    format!("signature={}&timestamp={timestamp}&nonce={nonce}&openid=x", signature(WECHAT_TOKEN, &timestamp, nonce))
}

pub fn text_xml(openid: &str, msg_id: u64, content: &str) -> String {
    text_xml_sent_at(openid, msg_id, content, now())
}

/// [`text_xml`] sent at `create_time` (Unix seconds) by WeChat's clock.
pub fn text_xml_sent_at(openid: &str, msg_id: u64, content: &str, create_time: u64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_test]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
         <CreateTime>{create_time}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{content}]]></Content>\
         <MsgId>{msg_id}</MsgId></xml>"
    )
}

impl TestApp {
    pub fn webhook_url(&self, channel: &str) -> String {
        format!("{}/webhooks/{channel}", self.address)
    }

    /// POSTs a signed text message; returns status and body.
    pub async fn post_text(&self, openid: &str, msg_id: u64, content: &str) -> (u16, String) {
        self.post_signed(&text_xml(openid, msg_id, content)).await
    }

    pub async fn post_signed(&self, xml: &str) -> (u16, String) {
        let url = format!("{}?{}", self.webhook_url(CHANNEL), signed_query(now()));
        let response = self.http.post(url).body(xml.to_owned()).send().await.unwrap_or_else(|e| panic!("{e}"));
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    pub async fn metrics(&self) -> String {
        let response = self.http.get(format!("{}/metrics", self.address)).send().await;
        match response {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until every accepted message is finished (answered or given up).
    pub async fn wait_until_idle(&self) {
        self.wait_for_metric("yizhan_journal_open 0").await;
    }

    /// Waits until `/metrics` shows `line` (a series and its value).
    pub async fn wait_for_metric(&self, line: &str) {
        wait_for(line, || async { self.metrics().await.lines().any(|shown| shown == line) }).await;
    }

    /// Customer-service sends received by the stand-in WeChat API, as JSON bodies.
    pub async fn sent_messages(&self) -> Vec<serde_json::Value> {
        self.wechat
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|request| request.url.path() == "/cgi-bin/message/custom/send")
            .map(|request| serde_json::from_slice(&request.body).unwrap_or_default())
            .collect()
    }

    /// The texts of [`Self::sent_messages`], in order.
    pub async fn sent_texts(&self) -> Vec<String> {
        let sent = self.sent_messages().await;
        sent.iter().map(|message| message["text"]["content"].as_str().unwrap_or_default().to_owned()).collect()
    }

    pub async fn llm_requests(&self) -> Vec<Request> {
        self.llm
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            // Questions only: not the start-up probe (a GET).
            .filter(|request| {
                request.method == wiremock::http::Method::POST
                    && (request.url.path().ends_with("/chat/completions") || request.url.path().starts_with("/api/v1"))
            })
            .collect()
    }
}

/// Polls `condition` until it holds; fails the test after 15 s (a generous bound, not a timing
/// assertion: the condition normally holds within milliseconds).
pub async fn wait_for<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if condition().await {
            return;
        }
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Posts `xml` the way WeChat does: the first two attempts are abandoned after `window`, up to
/// three attempts. Returns the attempt number (1-based) that got an answer, and that answer.
///
/// The third is given far longer than the window: the server answers its last attempt
/// `passive_margin_ms` before the window's end in any case, and a loaded test machine that stalls
/// for that long must not turn the answer into a timeout. (A lapsing attempt answers only after
/// the window, so the first two still end as WeChat's would.)
pub async fn wechat_delivers_within(app: &TestApp, xml: &str, window: Duration) -> Option<(usize, String)> {
    wechat_delivers_with_lapses(app, xml, window, |_| {}).await
}

/// [`wechat_delivers_within`], calling `after_lapse` with the number of each attempt given up
/// on, before the next is sent (to release a held answer between two attempts, say).
pub async fn wechat_delivers_with_lapses(
    app: &TestApp,
    xml: &str,
    window: Duration,
    mut after_lapse: impl FnMut(usize),
) -> Option<(usize, String)> {
    let client = reqwest::Client::new();
    for attempt in 1..=3 {
        let url = format!("{}?{}", app.webhook_url(CHANNEL), signed_query(now()));
        let patience = if attempt < 3 { window } else { Duration::from_secs(30) };
        if let Ok(response) = client.post(url).body(xml.to_owned()).timeout(patience).send().await {
            if let Ok(body) = response.text().await {
                return Some((attempt, body));
            }
        }
        after_lapse(attempt);
    }
    None
}

/// `base_config` on the SQLite store at `db`.
pub fn on_sqlite(config: String, db: &std::path::Path) -> String {
    config.replace("kind = \"memory\"", &format!("kind = \"sqlite\"\npath = \"{}\"", db.display()))
}

/// The SQLite store at `db`, as a previous run of Yizhan would have left it.
pub fn open_store(db: &std::path::Path) -> yizhan::store::SqliteStore {
    yizhan::store::SqliteStore::open(db, yizhan::store::SqliteOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// A stand-in LLM that keeps answers back until the test lets them go: for answers that must
/// come after something the test does (all of WeChat's attempts, say), where a delay would
/// have to guess how long a loaded machine takes to get there.
///
/// Each request is passed on at once to a wiremock server, which records it and makes the
/// answer as usual; the answers to the first `held` questions (POSTs, numbered as their
/// requests are read) are kept until [`HeldAnswers::release`] lets them go. Point the app at it
/// with the environment variable [`HeldAnswers::env_override`] gives.
pub struct HeldAnswers {
    base_url: String,
    /// How many of the held answers may go, and the condition their threads wait on.
    released: std::sync::Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>,
}

impl HeldAnswers {
    pub fn start(behind: &MockServer, held: usize) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("local address: {e}"));
        let released = std::sync::Arc::new((std::sync::Mutex::new(0), std::sync::Condvar::new()));
        let behind = *behind.address();
        let questions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gate = std::sync::Arc::clone(&released);
        // Ends with the test binary: the listener is never closed, and the threads are few.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (gate, questions) = (std::sync::Arc::clone(&gate), std::sync::Arc::clone(&questions));
                std::thread::spawn(move || pass_on(stream, behind, held, &questions, &gate));
            }
        });
        Self { base_url: format!("http://{address}/v1"), released }
    }

    /// The environment variable, and its value, that sets the app's `[llm] base_url` to it.
    pub fn env_override(&self) -> (&'static str, &str) {
        ("YIZHAN__LLM__BASE_URL", &self.base_url)
    }

    /// Lets the answers to the first `count` questions go (those released together, all at once
    /// and in no set order).
    pub fn release(&self, count: usize) {
        let (lock, condvar) = &*self.released;
        let mut released = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *released = (*released).max(count);
        condvar.notify_all();
    }
}

impl Drop for HeldAnswers {
    /// A test that ends (or fails) early leaves no thread waiting.
    fn drop(&mut self) {
        self.release(usize::MAX);
    }
}

/// One connection of [`HeldAnswers`]: the request goes to `behind` (asked to close the
/// connection, so that its answer ends where the bytes do), and its answer comes back once
/// released if it is one of the first `held` questions.
fn pass_on(
    mut client: std::net::TcpStream,
    behind: std::net::SocketAddr,
    held: usize,
    questions: &std::sync::atomic::AtomicUsize,
    gate: &(std::sync::Mutex<usize>, std::sync::Condvar),
) {
    use std::io::{BufReader, Read, Write};
    let Some(request) = crate::raw_http::read_request(&mut BufReader::new(&mut client)) else { return };
    let head = head_closing_connection(&request.request_line, request.header_lines.iter().map(String::as_str));
    let body = request.body;
    let question =
        request.request_line.starts_with("POST ").then(|| questions.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    let mut answer = Vec::new();
    let passed_on = std::net::TcpStream::connect(behind).and_then(|mut upstream| {
        upstream.write_all(head.as_bytes())?;
        upstream.write_all(&body)?;
        upstream.read_to_end(&mut answer)
    });
    if passed_on.is_err() {
        return;
    }
    if let Some(question) = question.filter(|question| *question < held) {
        let (lock, condvar) = gate;
        let released = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _released = condvar
            .wait_while(released, |released| *released <= question)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    // The app's client must not keep this connection for another question: it closes now, and
    // the answer says so whatever wiremock said.
    let Some(head_end) = answer.windows(4).position(|window| window == b"\r\n\r\n") else { return };
    let head = String::from_utf8_lossy(&answer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    answer.splice(..head_end + 4, head_closing_connection(status_line, lines).into_bytes());
    let _ = client.write_all(&answer).and_then(|()| client.flush());
}

/// A message head, through its blank line: `start_line` and `header_lines` (each with or
/// without its `\r\n`), any `connection` header among them replaced by `connection: close`.
fn head_closing_connection<'a>(start_line: &str, header_lines: impl Iterator<Item = &'a str>) -> String {
    let mut head = format!("{}\r\nconnection: close\r\n", start_line.trim_end_matches("\r\n"));
    for line in header_lines.map(|line| line.trim_end_matches("\r\n")) {
        let name = line.split_once(':').map_or("", |(name, _)| name);
        if !name.eq_ignore_ascii_case("connection") {
            head.push_str(line);
            head.push_str("\r\n");
        }
    }
    head.push_str("\r\n");
    head
}
