//! `kill -9` the real binary while answers are in flight; after a restart every acknowledged
//! message is answered exactly once.

use crate::helpers::*;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

struct Yizhan {
    child: Child,
    address: String,
    /// The `message` of every log line so far.
    logged: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// A test that fails before it stops its binary must not leave it running: it would keep
/// calling the stand-ins (and their reused ports) of later tests.
impl Drop for Yizhan {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Yizhan {
    /// Waits for the process to exit (after a SIGTERM) and asserts it exited with success.
    async fn exits_cleanly(&mut self) {
        let mut exit = None;
        wait_for("yizhan to exit", || {
            exit = exit.or_else(|| self.child.try_wait().ok().flatten());
            let done = exit.is_some();
            async move { done }
        })
        .await;
        assert!(exit.is_some_and(|status| status.success()), "{exit:?}");
    }
}

/// Sends SIGTERM to `child`, as an operator's `kill` or systemd's stop would (by the system call:
/// minimal Debian images have no `kill` program). Whether the signal was sent.
fn sigterm(child: &Child) -> bool {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else { return false };
    // SAFETY: kill(2) takes two integers and touches no memory of this process.
    unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
}

/// The `yizhan` binary, without the test's own `YIZHAN*` variables: a developer's or CI's
/// `YIZHAN__LLM__BASE_URL`, say, would otherwise point it away from the stand-ins.
fn yizhan_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_yizhan"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("YIZHAN") {
            command.env_remove(name);
        }
    }
    command
}

/// Starts the `yizhan` binary and learns its port from its JSON log.
async fn start_binary(config: &PathBuf) -> Yizhan {
    start_binary_with(config, &[]).await
}

/// [`start_binary`] with environment overrides.
async fn start_binary_with(config: &PathBuf, env: &[(&str, &str)]) -> Yizhan {
    let mut child = yizhan_command()
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .env("YIZHAN_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start yizhan: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let (ports, port) = mpsc::channel();
    let logged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log_sink = logged.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let log: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(port) = log["fields"]["port"].as_u64() {
                let _ = ports.send(port);
            }
            if let Some(message) = log["fields"]["message"].as_str() {
                log_sink.lock().unwrap_or_else(|p| p.into_inner()).push(message.to_owned());
            }
        }
    });
    let mut found = None;
    wait_for("yizhan to listen", || {
        found = found.or_else(|| port.try_recv().ok());
        let ready = found.is_some();
        async move { ready }
    })
    .await;
    Yizhan { child, address: format!("http://127.0.0.1:{}", found.unwrap_or_default()), logged }
}

/// Accepts, into `store`, a direct text message `text` from `user` on `channel` (a 公众号 kind),
/// with platform message id `platform_id`.
async fn accept_text(
    store: &yizhan::store::SqliteStore,
    channel: &str,
    user: &str,
    platform_id: &str,
    text: &str,
) -> yizhan_channel_core::Envelope {
    use yizhan::store::Store;
    use yizhan_channel_core::{ChannelId, Conversation, ConversationKind, Envelope, ReplyHandle, Segment, Sender};
    let envelope = Envelope {
        id: Envelope::new_id(),
        channel: ChannelId::parse(channel).unwrap_or_else(|e| panic!("{e}")),
        channel_kind: "wechat_mp".into(),
        platform_message_id: platform_id.into(),
        received_at_ms: yizhan_channel_common::unix_millis(std::time::SystemTime::now()),
        conversation: Conversation { kind: ConversationKind::Direct, id: user.into() },
        sender: Sender { id: user.into(), name: None },
        content: vec![Segment::Text { text: text.into() }],
        mentions_self: true,
        // As the 公众号 channel journals it (its passive reply is addressed from this account).
        reply_handle: ReplyHandle(serde_json::json!({"account": "gh_test"})),
    };
    let accepted = store.accept(&envelope, Duration::from_secs(60)).await;
    assert!(matches!(accepted, Ok(yizhan::store::Acceptance::New)), "{accepted:?}");
    envelope
}

/// Records in `store` an answer to `envelope` in parts with `texts`, all pending, as the last
/// run would have before sending them; returns the parts.
async fn record_parts(
    store: &yizhan::store::SqliteStore,
    envelope: &yizhan_channel_core::Envelope,
    texts: &[String],
) -> Vec<yizhan_channel_core::Delivery> {
    use yizhan::store::Store;
    let parts: Vec<yizhan_channel_core::Delivery> = texts
        .iter()
        .enumerate()
        .map(|(index, text)| yizhan_channel_core::Delivery {
            delivery_id: yizhan::delivery::part_id(&envelope.id, index),
            channel: envelope.channel.clone(),
            conversation: envelope.conversation.clone(),
            recipient: envelope.sender.clone(),
            reply_handle: envelope.reply_handle.clone(),
            reply: yizhan_channel_core::Reply::text(text.clone()),
        })
        .collect();
    let key = format!("{}:d:{}", envelope.channel, envelope.sender.id);
    let recorded = store.record_answer(&envelope.id, &key, None, &parts).await;
    assert!(recorded.is_ok(), "{recorded:?}");
    parts
}

/// Starts the app in this process on the SQLite store at `db`, with an instant stand-in LLM.
async fn start_in_process_on(db: &std::path::Path) -> TestApp {
    start_in_process_with(db, &[]).await
}

/// [`start_in_process_on`] with environment overrides.
async fn start_in_process_with(db: &std::path::Path, env: &[(&str, &str)]) -> TestApp {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    wechat_ok(&wechat).await;
    let config = on_sqlite(base_config(&llm, &wechat), db);
    spawn_with(&config, env, yizhan::channels::ChannelKinds::builtin(), wechat, llm).await
}

async fn metric(http: &reqwest::Client, address: &str, name: &str) -> Option<i64> {
    let text = http.get(format!("{address}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
}

#[actix_web::test]
async fn every_acknowledged_message_is_answered_exactly_once_across_a_kill_9() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    // The first 25 questions are answered at once; the other 25 hang (until the first-token
    // timeout), so the moment to kill is a state that lasts, not a race against a delay.
    echo_llm_mock(Duration::ZERO).up_to_n_times(25).mount(&llm).await;
    echo_llm(&llm, Duration::from_secs(600)).await;
    wechat_ok(&wechat).await;
    let dir = std::env::temp_dir().join(format!("yizhan-crash-{}-{}", std::process::id(), now()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let config = on_sqlite(base_config(&llm, &wechat), &dir.join("yizhan.db"))
        .replace("max_concurrency = 8", "max_concurrency = 25")
        .replace("max_waiting = 64", "max_waiting = 1000");
    let config_path = dir.join("yizhan.toml");
    std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));

    let first = start_binary(&config_path).await;
    let mut app =
        TestApp { address: first.address.clone(), wechat, llm, http: reqwest::Client::new(), _actor_threads: None };
    let posts = (0..50u64).map(|user| {
        let app = &app;
        async move { app.post_text(&format!("oCrash{user}"), 50_000 + user, &format!("问题{user}")).await }
    });
    for (status, body) in futures_util::future::join_all(posts).await {
        assert_eq!((status, body.as_str()), (200, "success"));
    }
    // Kill while the second wave of 25 is inside its LLM call: the first wave's answers are
    // delivered and finished, the second wave's are not.
    wait_for("the first wave answered and the second asked", || async {
        app.sent_messages().await.len() == 25
            && metric(&app.http, &first.address, "yizhan_journal_open ").await == Some(25)
            && app.llm_requests().await.len() == 50
    })
    .await;
    let mut first = first;
    first.child.kill().unwrap_or_else(|e| panic!("kill -9: {e}"));
    let _ = first.child.wait();
    // The model answers again after the restart.
    app.llm.reset().await;
    echo_llm(&app.llm, Duration::ZERO).await;

    let mut second = start_binary(&config_path).await;
    let address = second.address.clone();
    wait_for("every message answered after the restart", || async {
        metric(&app.http, &address, "yizhan_journal_open ").await == Some(0)
    })
    .await;
    // WeChat retries each one now (same MsgId): every retry is known from before the kill,
    // acknowledged and not taken again.
    app.address = address.clone();
    let retries = (0..50u64).map(|user| {
        let app = &app;
        async move { app.post_text(&format!("oCrash{user}"), 50_000 + user, &format!("问题{user}")).await }
    });
    for (status, body) in futures_util::future::join_all(retries).await {
        assert_eq!((status, body.as_str()), (200, "success"));
    }
    let duplicates = "yizhan_webhook_requests_total{channel=\"mp\",outcome=\"duplicate\"} ";
    assert_eq!(metric(&app.http, &address, duplicates).await, Some(50), "{}", app.metrics().await);
    assert_eq!(metric(&app.http, &address, "yizhan_journal_open ").await, Some(0));
    let sent = app.sent_messages().await;
    let _ = second.child.kill();
    let _ = second.child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(sent.len(), 50, "{sent:#?}");
    for user in 0..50 {
        let to = format!("oCrash{user}");
        let answers: Vec<_> = sent.iter().filter(|m| m["touser"] == to.as_str()).collect();
        assert_eq!(answers.len(), 1, "{to} got {answers:?}");
        assert_eq!(answers[0]["text"]["content"], format!("答：问题{user}"));
    }
}

/// WeChat's second attempt parses into an envelope of its own; the answer it takes must finish
/// the envelope that was journaled, or that message stays open and is resumed at every start.
#[actix_web::test]
async fn a_passive_answer_taken_by_a_retry_finishes_the_journaled_message() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    // The answer comes once the first attempt was given up on, before the second is sent.
    let held = HeldAnswers::start(&llm, 1);
    wechat_ok(&wechat).await;
    let dir = std::env::temp_dir().join(format!("yizhan-retry-{}-{}", std::process::id(), now()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let db = dir.join("yizhan.db");
    let config = on_sqlite(base_config(&llm, &wechat), &db)
        .replace("reply_mode = \"push\"", "reply_mode = \"auto\"\npassive_window_ms = 2000\npassive_margin_ms = 300");
    let config_path = dir.join("yizhan.toml");
    std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));

    let mut yizhan = start_binary_with(&config_path, &[held.env_override()]).await;
    let app =
        TestApp { address: yizhan.address.clone(), wechat, llm, http: reqwest::Client::new(), _actor_threads: None };
    let xml = text_xml("oRetry", 7, "慢一点");
    let delivered = wechat_delivers_with_lapses(&app, &xml, Duration::from_millis(2_000), |_| held.release(1)).await;
    let (attempt, body) = delivered.unwrap_or_default();
    assert!(attempt == 2 && body.contains("答：慢一点"), "attempt {attempt}: {body}");
    app.wait_until_idle().await;
    yizhan.child.kill().unwrap_or_else(|e| panic!("kill -9: {e}"));
    let _ = yizhan.child.wait();

    use yizhan::store::Store;
    let unfinished = open_store(&db).unfinished().await.unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(unfinished.is_empty(), "{unfinished:?}");
}

/// At shutdown the server takes no new connections, so WeChat's retries cannot come in: a 公众号
/// answer ready after its attempt lapsed must be pushed before the process exits, not held for
/// a retry until the shutdown bound runs out.
#[actix_web::test]
async fn sigterm_pushes_a_passive_answer_no_retry_can_take_any_more() {
    let Stopped { app, delivered, .. } =
        sigterm_while_a_passive_answer_is_held("auto", AnswerComes::AfterTheAttempt, &[], None).await;
    assert_eq!(delivered.map(|(_, body)| body).as_deref(), Some("success"), "the lapsing attempt is the last");
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 1, "pushed before exit");
    assert!(sent[0]["text"]["content"].as_str().is_some_and(|text| text.starts_with("答：关机前")));
}

/// In passive mode the answer cannot be pushed, and no attempt will take it any more: it stays
/// journaled, its parts pending, for the next start (which parks it for the user's next
/// message).
#[actix_web::test]
async fn sigterm_in_passive_mode_leaves_a_held_answer_for_the_next_start() {
    let Stopped { app, unfinished, .. } =
        sigterm_while_a_passive_answer_is_held("passive", AnswerComes::AfterTheAttempt, &[], None).await;
    assert!(app.sent_messages().await.is_empty());
    let parts: Vec<String> =
        unfinished.iter().flat_map(|u| u.pending_parts.iter().flatten().map(|p| p.reply.text.clone())).collect();
    assert!(parts.len() == 1 && parts[0].starts_with("答：关机前"), "{unfinished:?}");
}

/// A held attempt takes a long answer during shutdown in passive mode: its first part is the
/// reply, with the hint that more follows, and the rest is parked and saved in the store for
/// the user's next message after the restart.
#[actix_web::test]
async fn sigterm_in_passive_mode_parks_the_rest_of_a_long_answer_behind_the_hint() {
    // WeChat's whole window, with seconds to spare for the answer (released once the signal is
    // sent, while the attempt is held) and the disk.
    let env = [("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "100"), ("YIZHAN__CHANNELS__MP__PASSIVE_WINDOW_MS", "5000")];
    let Stopped { app, delivered, unfinished, parked } =
        sigterm_while_a_passive_answer_is_held("passive", AnswerComes::AfterTheSignal, &env, None).await;
    let (attempt, body) = delivered.unwrap_or_default();
    assert!(attempt == 1 && body.contains("答：关机前") && body.contains("继续"), "attempt {attempt}: {body}");
    assert!(app.sent_messages().await.is_empty());
    assert!(unfinished.is_empty(), "{unfinished:?}");
    assert!(parked.is_some_and(|parked| parked.contains("。。。")), "the rest is saved as parked");
}

/// The wait for unanswered messages ends (here at once) while an attempt is held for an answer
/// still being written: the attempt answers before the connections close, instead of being cut
/// off with no response (WeChat would show its 「该公众号暂时无法提供服务」).
#[actix_web::test]
async fn a_held_attempt_is_answered_when_the_shutdown_wait_ends() {
    // WeChat's whole window, far longer than the 1 s the connections get after the wait: the
    // attempt would still be waiting when they close, whenever the signal comes.
    let env = [("YIZHAN__SERVER__SHUTDOWN_TIMEOUT_SECS", "0"), ("YIZHAN__CHANNELS__MP__PASSIVE_WINDOW_MS", "5000")];
    let Stopped { delivered, .. } =
        sigterm_while_a_passive_answer_is_held("auto", AnswerComes::Never, &env, None).await;
    let (attempt, body) = delivered.unwrap_or_default();
    assert_eq!((attempt, body.as_str()), (1, "success"));
}

/// In auto mode an answer the send API refuses during shutdown would be parked, and parked
/// text dies with the process: it stays pending (not failed) for the next start instead.
#[actix_web::test]
async fn sigterm_in_auto_mode_leaves_a_refused_answer_for_the_next_start() {
    let refusal = serde_json::json!({"errcode": 48001, "errmsg": "api unauthorized"});
    let Stopped { app, unfinished, .. } =
        sigterm_while_a_passive_answer_is_held("auto", AnswerComes::AfterTheAttempt, &[], Some(refusal)).await;
    assert!(!app.sent_messages().await.is_empty(), "the push was tried");
    let parts: Vec<String> =
        unfinished.iter().flat_map(|u| u.pending_parts.iter().flatten().map(|p| p.reply.text.clone())).collect();
    assert!(parts.len() == 1 && parts[0].starts_with("答：关机前"), "{unfinished:?}");
}

/// A long answer refused during shutdown is left pending whole, its rest beyond the quota
/// included; that rest is not also saved as parked, or the next start would park it twice.
#[actix_web::test]
async fn sigterm_in_auto_mode_leaves_a_refused_long_answer_pending_and_not_also_parked() {
    let refusal = serde_json::json!({"errcode": 48001, "errmsg": "api unauthorized"});
    let env = [("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "100"), ("YIZHAN__CHANNELS__MP__SEND_QUOTA_PER_MESSAGE", "1")];
    let Stopped { unfinished, parked, .. } =
        sigterm_while_a_passive_answer_is_held("auto", AnswerComes::AfterTheAttempt, &env, Some(refusal)).await;
    let pending: usize = unfinished.iter().map(|u| u.pending_parts.as_ref().map_or(0, Vec::len)).sum();
    assert!(pending >= 2, "every part is left for the next start: {unfinished:?}");
    assert!(!parked.unwrap_or_default().contains("。。。"), "the rest is not parked as well");
}

/// The rest of a long answer beyond the send quota, parked during shutdown behind the continue
/// hint, is saved with the other parked answers for the next start.
#[actix_web::test]
async fn sigterm_in_auto_mode_saves_the_rest_beyond_the_quota_for_the_next_start() {
    let env = [("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "100"), ("YIZHAN__CHANNELS__MP__SEND_QUOTA_PER_MESSAGE", "1")];
    let Stopped { app, unfinished, parked, .. } =
        sigterm_while_a_passive_answer_is_held("auto", AnswerComes::AfterTheAttempt, &env, None).await;
    let sent = app.sent_texts().await;
    assert!(sent.len() == 1 && sent[0].contains("继续"), "within the quota, with the hint: {sent:?}");
    assert!(unfinished.is_empty(), "{unfinished:?}");
    let saved = parked.unwrap_or_default();
    assert!(saved.contains("。。。"), "the rest is saved: {saved}");
}

/// What [`sigterm_while_a_passive_answer_is_held`] saw.
struct Stopped {
    app: TestApp,
    /// The attempt that got an answer, and that answer.
    delivered: Option<(usize, String)>,
    /// What the store left unfinished.
    unfinished: Vec<yizhan::store::Unfinished>,
    /// The parked answers the stop left in the store, if any.
    parked: Option<String>,
}

/// Waits until `yizhan` has logged that it is shutting down: the first signal handled, and a
/// second one listened for.
async fn shutdown_begun(yizhan: &Yizhan) {
    let logged = yizhan.logged.clone();
    wait_for("the shutdown to begin", || {
        let begun = logged.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|m| m.starts_with("Shutting down"));
        async move { begun }
    })
    .await;
}

/// When the model's answer comes in [`sigterm_while_a_passive_answer_is_held`].
#[derive(Clone, Copy, PartialEq)]
enum AnswerComes {
    /// Once the message's attempt is over (it waits 1.7 s unless `env` changes the window).
    AfterTheAttempt,
    /// Once the shutdown has begun, while the attempt is still held.
    AfterTheSignal,
    /// Not before the process exits.
    Never,
}

/// Sends one 公众号 message (its answer coming as `answer_comes` says) to the binary in `mode` on
/// the SQLite store with `env`, SIGTERMs it once the message is accepted, and waits for the
/// exit. The send API answers `send_answer` when given, else success.
async fn sigterm_while_a_passive_answer_is_held(
    mode: &str,
    answer_comes: AnswerComes,
    env: &[(&str, &str)],
    send_answer: Option<serde_json::Value>,
) -> Stopped {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    let held = HeldAnswers::start(&llm, 1);
    if let Some(answer) = send_answer {
        Mock::given(method("POST"))
            .and(path("/cgi-bin/message/custom/send"))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer))
            .with_priority(1)
            .mount(&wechat)
            .await;
    }
    wechat_ok(&wechat).await;
    // Nanoseconds: tests of one mode start within the same second.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("yizhan-term-{mode}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let db = dir.join("yizhan.db");
    let config = on_sqlite(base_config(&llm, &wechat), &db)
        .replace("workers = 2", "workers = 2\nshutdown_timeout_secs = 5")
        .replace(
            "reply_mode = \"push\"",
            &format!("reply_mode = \"{mode}\"\npassive_window_ms = 2000\npassive_margin_ms = 300"),
        );
    let config_path = dir.join("yizhan.toml");
    std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));
    let mut env = env.to_vec();
    env.push(held.env_override());
    let mut yizhan = start_binary_with(&config_path, &env).await;
    let app =
        TestApp { address: yizhan.address.clone(), wechat, llm, http: reqwest::Client::new(), _actor_threads: None };
    // Once the message is accepted (and its attempt held), not at a guessed moment.
    let terminate = async {
        // The model asked too: by then the attempt that carried the message is held.
        wait_for("the message accepted", || async {
            metric(&app.http, &app.address, "yizhan_journal_open ").await == Some(1)
                && metric(&app.http, &app.address, "yizhan_llm_in_flight ").await == Some(1)
        })
        .await;
        let sent = sigterm(&yizhan.child);
        if answer_comes == AnswerComes::AfterTheSignal {
            shutdown_begun(&yizhan).await;
            held.release(1);
        }
        sent
    };
    // Long enough to need several parts when `max_part_bytes` is small.
    let xml = text_xml("oTermPassive", 80_000, &format!("关机前{}", "。".repeat(60)));
    // A first attempt with all the time it needs: once the listener pauses, no retry gets in, so
    // WeChat's window is not what is tested (and a loaded machine must not turn the answer into a
    // timeout).
    let deliver = async {
        let delivered = wechat_delivers_within(&app, &xml, Duration::from_secs(30)).await;
        if answer_comes == AnswerComes::AfterTheAttempt {
            held.release(1);
        }
        delivered
    };
    let (delivered, status) = futures_util::join!(deliver, terminate);
    assert!(status);
    yizhan.exits_cleanly().await;
    use yizhan::store::Store;
    let store = open_store(&db);
    let unfinished = store.unfinished().await.unwrap_or_else(|e| panic!("{e}"));
    let saved = store.load_parked().await.unwrap_or_else(|e| panic!("{e}"));
    let parked =
        (!saved.is_empty()).then(|| saved.into_iter().map(|(record, _)| record).collect::<Vec<_>>().join("\n"));
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Stopped { app, delivered, unfinished, parked }
}

/// An operator's second signal ends the wait for unanswered messages (they resume at the next
/// start) instead of leaving the process up for the whole shutdown bound.
#[actix_web::test]
async fn a_second_sigterm_stops_the_wait_for_unanswered_messages() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::from_secs(600)).await;
    wechat_ok(&wechat).await;
    let dir = std::env::temp_dir().join(format!("yizhan-term2-{}-{}", std::process::id(), now()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let db = dir.join("yizhan.db");
    let config =
        on_sqlite(base_config(&llm, &wechat), &db).replace("workers = 2", "workers = 2\nshutdown_timeout_secs = 600");
    let config_path = dir.join("yizhan.toml");
    std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));
    let mut yizhan = start_binary(&config_path).await;
    let app =
        TestApp { address: yizhan.address.clone(), wechat, llm, http: reqwest::Client::new(), _actor_threads: None };
    assert_eq!(app.post_text("oTwice", 90_000, "慢问题").await.0, 200);
    assert!(sigterm(&yizhan.child));
    shutdown_begun(&yizhan).await;
    assert!(sigterm(&yizhan.child));
    yizhan.exits_cleanly().await;
    use yizhan::store::Store;
    let unfinished = open_store(&db).unfinished().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(unfinished.len(), 1, "left for the next start");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stop that cuts a question's LLM call short (the shutdown bound passed while the model was
/// still writing) leaves the question for the next start to ask, instead of recording the
/// apology as its answer, which the next start would then send. (The question is one the run
/// resumed at its start, whose session runs on the main thread, which the exit does not stop.)
#[actix_web::test]
async fn sigterm_during_a_slow_llm_call_leaves_the_question_not_the_apology() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::from_secs(30)).await;
    wechat_ok(&wechat).await;
    let dir = std::env::temp_dir().join(format!("yizhan-cut-{}-{}", std::process::id(), now()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let db = dir.join("yizhan.db");
    {
        let store = open_store(&db);
        accept_text(&store, CHANNEL, "oCut", "cut-1", "慢慢想").await;
    }
    let config_path = dir.join("yizhan.toml");
    std::fs::write(&config_path, on_sqlite(base_config(&llm, &wechat), &db)).unwrap_or_else(|e| panic!("{e}"));
    let mut yizhan = start_binary_with(&config_path, &[("YIZHAN__SERVER__SHUTDOWN_TIMEOUT_SECS", "1")]).await;
    let app =
        TestApp { address: yizhan.address.clone(), wechat, llm, http: reqwest::Client::new(), _actor_threads: None };
    wait_for("the resumed question asked", || async { app.llm_requests().await.len() == 1 }).await;
    assert!(sigterm(&yizhan.child));
    yizhan.exits_cleanly().await;
    assert!(app.sent_messages().await.is_empty(), "{:?}", app.sent_texts().await);
    use yizhan::store::Store;
    let unfinished = open_store(&db).unfinished().await.unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(unfinished.len(), 1);
    assert_eq!(unfinished[0].pending_parts, None, "to be asked again, not answered with the apology");
}

#[actix_web::test]
async fn sigterm_answers_what_was_accepted_before_exiting() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::from_millis(500)).await;
    wechat_ok(&wechat).await;
    let dir = std::env::temp_dir().join(format!("yizhan-term-{}-{}", std::process::id(), now()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let config = on_sqlite(base_config(&llm, &wechat), &dir.join("yizhan.db"));
    let config_path = dir.join("yizhan.toml");
    std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));
    let mut yizhan = start_binary(&config_path).await;
    let app =
        TestApp { address: yizhan.address.clone(), wechat, llm, http: reqwest::Client::new(), _actor_threads: None };
    for user in 0..5u64 {
        assert_eq!(app.post_text(&format!("oTerm{user}"), 70_000 + user, "问题").await.0, 200);
    }
    assert!(sigterm(&yizhan.child));
    yizhan.exits_cleanly().await;
    assert_eq!(app.sent_messages().await.len(), 5, "every accepted message answered before exit");

    // After a restart the conversation continues where it was, and WeChat's late retry of an
    // answered message is still recognised.
    let mut restarted = start_binary(&config_path).await;
    let app = TestApp { address: restarted.address.clone(), ..app };
    assert_eq!(app.post_text("oTerm0", 70_000, "问题").await.0, 200, "a retry from before the restart");
    assert_eq!(app.post_text("oTerm0", 70_100, "我刚才问了什么？").await.0, 200);
    let address = app.address.clone();
    wait_for("the follow-up answered", || async {
        metric(&app.http, &address, "yizhan_journal_open ").await == Some(0) && app.sent_messages().await.len() == 6
    })
    .await;
    let _ = restarted.child.kill();
    let _ = restarted.child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let requests = app.llm_requests().await;
    assert_eq!(requests.len(), 6, "the retry asked no LLM");
    let last: serde_json::Value = serde_json::from_slice(&requests[5].body).unwrap_or_default();
    let contents: Vec<&str> = last["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["content"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(contents[1..], ["问题", "答：问题", "我刚才问了什么？"]);
}

#[actix_web::test]
async fn a_bad_config_exits_non_zero_naming_the_key_and_check_accepts_a_good_one() {
    let dir = std::env::temp_dir().join(format!("yizhan-check-{}-{}", std::process::id(), now()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    // Writes `text` as a config and runs `yizhan check` on it: whether it passed, and stderr.
    let check = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let output = yizhan_command().args(["check", "--config"]).arg(&path).output().unwrap_or_else(|e| panic!("{e}"));
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (passed, stderr) =
        check("bad.toml", "[llm]\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\nmax_concurrency = \"lots\"\n");
    assert!(!passed && stderr.contains("llm.max_concurrency"), "{stderr}");

    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/yizhan.example.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (passed, stderr) = check("example.toml", &example);
    assert!(passed, "{stderr}");
    // The file may come from YIZHAN_CONFIG; an empty one (a compose file's unset variable) means
    // the default, `yizhan.toml` in the working directory.
    std::fs::write(dir.join("yizhan.toml"), &example).unwrap_or_else(|e| panic!("{e}"));
    for (value, shown) in
        [(dir.join("example.toml").into_os_string(), "example.toml: OK"), ("".into(), "yizhan.toml: OK")]
    {
        let output = yizhan_command()
            .arg("check")
            .env("YIZHAN_CONFIG", &value)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains(shown),
            "{value:?}: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // A continue hint that leaves a 公众号 part no room for text.
    let long_hint = example
        .replace("more_hint = \"（回复「继续」查看剩余内容）\"", &format!("more_hint = \"{}\"", "继续".repeat(400)));
    assert_ne!(long_hint, example, "the example sets more_hint");
    let (passed, stderr) = check("long-hint.toml", &long_hint);
    assert!(!passed && stderr.contains("messages.more_hint"), "{stderr}");
    // So does a parked-answer prefix that leaves it none.
    let long_prefix = example
        .replace("parked_prefix = \"【你上一条消息的回复】\"", &format!("parked_prefix = \"{}\"", "上".repeat(700)));
    assert_ne!(long_prefix, example, "the example sets parked_prefix");
    let (passed, stderr) = check("long-prefix.toml", &long_prefix);
    assert!(!passed && stderr.contains("messages.parked_prefix"), "{stderr}");
    // An address that is none, and a database path under a file: found by `check`, not at start.
    // The example with the line setting `key` (`section.name`) replaced by `line`.
    let with = |key: &str, line: &str| {
        let (section, rest) = key.split_once('.').unwrap_or_default();
        let pattern = format!("\n{rest} = ");
        let start = example.find(&format!("[{section}]")).unwrap_or_else(|| panic!("no [{section}] in the example"));
        let at = start + example[start..].find(&pattern).unwrap_or_else(|| panic!("no {key} in the example"));
        let end = at + 1 + example[at + 1..].find('\n').unwrap_or(example.len() - at - 1);
        format!("{}\n{line}{}", &example[..at], &example[end..])
    };
    let (passed, stderr) = check("bad-bind.toml", &with("server.bind", "bind = \"not an address\""));
    assert!(!passed && stderr.contains("server.bind"), "{stderr}");
    let under_a_file = dir.join("example.toml").join("yizhan.db");
    let (passed, stderr) =
        check("bad-path.toml", &with("store.path", &format!("path = {:?}", under_a_file.display().to_string())));
    assert!(!passed && stderr.contains("store.path"), "{stderr}");
    // An unrelated variable that is not UTF-8 is none of Yizhan's business.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = dir.join("example.toml");
        let output = yizhan_command()
            .args(["check", "--config"])
            .arg(&path)
            .env("YIZHAN_TEST_JUNK", std::ffi::OsStr::from_bytes(b"\xff"))
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    // A misspelt channel key is an error too, not a setting silently left at its default.
    assert!(example.contains("\nrequire_mention_in_groups = "), "the example changed");
    let misspelt = example.replacen("\nrequire_mention_in_groups = ", "\nrequire_mention_in_group = ", 1);
    let (passed, stderr) = check("misspelt.toml", &misspelt);
    assert!(!passed && stderr.contains("require_mention_in_group`") && stderr.contains("feishu"), "{stderr}");
    // So is a reply mode the platform cannot serve, caught by `check` and not only at start.
    assert!(example.contains("\nkind = \"wecom\"\n"), "the example changed");
    let passive_wecom = example.replacen("\nkind = \"wecom\"\n", "\nkind = \"wecom\"\nreply_mode = \"passive\"\n", 1);
    let (passed, stderr) = check("passive-wecom.toml", &passive_wecom);
    assert!(!passed && stderr.contains("reply_mode"), "{stderr}");
    // And a passive window for a platform without passive replies, which would be ignored.
    let window_wecom = example.replacen("\nkind = \"wecom\"\n", "\nkind = \"wecom\"\npassive_window_ms = 3000\n", 1);
    let (passed, stderr) = check("window-wecom.toml", &window_wecom);
    assert!(!passed && stderr.contains("passive_window_ms"), "{stderr}");
    // And a margin that leaves no time in the window: no attempt would ever wait for an answer.
    assert!(example.contains("\npassive_margin_ms = 500\n"), "the example changed");
    let no_time =
        example.replacen("\npassive_margin_ms = 500\n", "\npassive_margin_ms = 500\npassive_window_ms = 400\n", 1);
    let (passed, stderr) = check("no-time.toml", &no_time);
    assert!(!passed && stderr.contains("passive_margin_ms"), "{stderr}");
    // And a window longer than WeChat's 5 s: it hangs up first, and the answer would be lost.
    let too_long =
        example.replacen("\npassive_margin_ms = 500\n", "\npassive_margin_ms = 500\npassive_window_ms = 5001\n", 1);
    let (passed, stderr) = check("too-long.toml", &too_long);
    assert!(!passed && stderr.contains("passive_window_ms") && stderr.contains("5000 ms"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_web::test]
async fn a_message_left_for_a_channel_since_removed_from_the_config_is_finished_unanswered() {
    let dir = std::env::temp_dir().join(format!("yizhan-gone-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    // The last run accepted a message on channel `gone` and stopped before answering it.
    {
        let store = open_store(&db);
        accept_text(&store, "gone", "oGone", "1", "你好").await;
    }
    // Restarted with `gone` no longer configured: nothing can answer it, and left open it would
    // pin its log segment (and every later one) for good.
    let app = start_in_process_on(&db).await;
    app.wait_until_idle().await;
    assert!(app.llm_requests().await.is_empty());
    assert!(app.sent_messages().await.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// An answer recorded before a crash but not yet (or not all) sent goes out at the next start
/// within the platform's per-message quota (公众号: 5 parts), counting what the last run sent;
/// the rest waits for 「继续」 as usual.
#[actix_web::test]
async fn an_answer_resent_after_a_restart_keeps_to_the_send_quota() {
    resend_after_a_restart(0, &["第0段", "第1段", "第2段", "第3段", "第4段"]).await;
}

#[actix_web::test]
async fn the_rest_of_a_partly_sent_answer_keeps_to_what_is_left_of_the_send_quota() {
    resend_after_a_restart(3, &["第3段", "第4段"]).await;
}

/// Seven parts recorded, the first `sent_before_the_crash` of them delivered, then a restart:
/// `expected` go out (the last with the 「继续」 hint).
async fn resend_after_a_restart(sent_before_the_crash: usize, expected: &[&str]) {
    use yizhan::store::Store;

    let dir =
        std::env::temp_dir().join(format!("yizhan-resend-{}-{}-{sent_before_the_crash}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    // The last run answered in seven parts, sent the first `sent_before_the_crash`, and stopped.
    {
        let store = open_store(&db);
        let envelope = accept_text(&store, CHANNEL, "oResend", "7", "长问题").await;
        let texts: Vec<String> = (0..7).map(|index| format!("第{index}段")).collect();
        let parts = record_parts(&store, &envelope, &texts).await;
        for part in &parts[..sent_before_the_crash] {
            assert!(store.part_delivered(&part.delivery_id).await.is_ok());
        }
    }
    let app = start_in_process_on(&db).await;
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(app.llm_requests().await.is_empty(), "answered before the crash: not asked again");
    let texts: Vec<&str> = sent.iter().map(|message| message["text"]["content"].as_str().unwrap_or_default()).collect();
    assert_eq!(texts.len(), expected.len(), "{texts:?}");
    for (text, start) in texts.iter().zip(expected) {
        assert!(text.starts_with(start), "{texts:?}");
    }
    assert!(texts.last().is_some_and(|last| last.contains("继续")), "{texts:?}");
}

/// An answer the last run recorded, resent after the restart and refused for good before any
/// of it was shown, takes its turn out of the history, as a new answer's does: the next
/// question's prompt does not have the model saying it.
#[actix_web::test]
async fn a_resent_answer_refused_for_good_leaves_no_turn_behind() {
    use yizhan::store::Store;
    let dir = std::env::temp_dir().join(format!("yizhan-resend-refused-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    {
        let store = open_store(&db);
        let envelope = accept_text(&store, CHANNEL, "oRefused", "r1", "旧问").await;
        let parts = record_parts(&store, &envelope, &["旧答".to_owned()]).await;
        let key = format!("{}:d:{}", envelope.channel, envelope.sender.id);
        let turn = yizhan::store::Turn { question: "旧问".into(), answer: "旧答".into() };
        // The turn as `record_answer` stores it with the answer (`record_parts` stores none).
        let recorded = store.record_answer(&envelope.id, &key, Some(turn), &parts).await;
        assert!(recorded.is_ok(), "{recorded:?}");
    }
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    let refused = serde_json::json!({"errcode":48001,"errmsg":"api unauthorized"});
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(refused))
        .up_to_n_times(1)
        .mount(&wechat)
        .await;
    wechat_ok(&wechat).await;
    let config = on_sqlite(base_config(&llm, &wechat), &db);
    let env = [("YIZHAN__CHANNELS__MP__REPLY_MODE", "push")];
    let app = spawn_with(&config, &env, yizhan::channels::ChannelKinds::builtin(), wechat, llm).await;
    app.wait_until_idle().await;
    app.post_text("oRefused", 2, "新问").await;
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    let prompts: Vec<String> =
        app.llm_requests().await.iter().map(|request| String::from_utf8_lossy(&request.body).into_owned()).collect();
    assert_eq!(prompts.len(), 1, "{prompts:?}");
    assert!(!prompts[0].contains("旧答") && prompts[0].contains("新问"), "{prompts:?}");
}

/// A conversation can come back from a stop with one more open message than its queue bound
/// (the one being answered, plus a full queue): every one is answered, none with the busy text.
#[actix_web::test]
async fn a_conversation_resumed_beyond_its_queue_bound_gets_every_answer() {
    let dir = std::env::temp_dir().join(format!("yizhan-resume-bound-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    {
        let store = open_store(&db);
        for index in 0..3 {
            accept_text(&store, CHANNEL, "oBacklog", &format!("b{index}"), &format!("问题{index}")).await;
        }
    }
    let app = start_in_process_with(&db, &[("YIZHAN__SESSION__MAX_PENDING", "1")]).await;
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    let texts = app.sent_texts().await;
    assert_eq!(texts, ["答：问题0", "答：问题1", "答：问题2"]);
}

/// Two answers to one user, both left partly unsent by the last run, go out one after the other
/// (not interleaved), in the order their messages were accepted.
#[actix_web::test]
async fn answers_resent_to_one_user_after_a_restart_do_not_interleave() {
    let dir = std::env::temp_dir().join(format!("yizhan-resend-order-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    {
        let store = open_store(&db);
        for (id, name) in [("r1", "甲"), ("r2", "乙")] {
            let envelope = accept_text(&store, CHANNEL, "oOrder", id, name).await;
            let texts: Vec<String> = (0..3).map(|index| format!("{name}{index}")).collect();
            record_parts(&store, &envelope, &texts).await;
        }
    }
    let app = start_in_process_on(&db).await;
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    let texts = app.sent_texts().await;
    assert_eq!(texts, ["甲0", "甲1", "甲2", "乙0", "乙1", "乙2"]);
}

/// An answer left partly unsent and a later message of the same user left unanswered: after a
/// restart the rest of the first answer goes out before the second message's answer, even when
/// the platform is slow to take it.
#[actix_web::test]
async fn a_resent_answer_leaves_before_the_answer_to_a_later_message_asked_again() {
    let dir = std::env::temp_dir().join(format!("yizhan-resend-then-ask-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    {
        let store = open_store(&db);
        let answered = accept_text(&store, CHANNEL, "oMixed", "m1", "甲").await;
        let texts: Vec<String> = (0..3).map(|index| format!("甲{index}")).collect();
        record_parts(&store, &answered, &texts).await;
        accept_text(&store, CHANNEL, "oMixed", "m2", "乙").await;
    }
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    wechat_ok_sending_after(&wechat, Duration::from_millis(100)).await;
    let config = on_sqlite(base_config(&llm, &wechat), &db);
    let app = spawn_with(&config, &[], yizhan::channels::ChannelKinds::builtin(), wechat, llm).await;
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(app.sent_texts().await, ["甲0", "甲1", "甲2", "答：乙"]);
}

/// A 公众号 retry arriving soon after a quick restart can carry the answer to a message the last
/// run accepted, as it would have without the restart, instead of being acknowledged `success`.
#[actix_web::test]
async fn a_platform_retry_after_a_quick_restart_carries_the_resumed_answer() {
    let dir = std::env::temp_dir().join(format!("yizhan-resume-passive-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    {
        let store = open_store(&db);
        accept_text(&store, CHANNEL, "oQuick", "91000", "重启前").await;
    }
    let env = [
        ("YIZHAN__CHANNELS__MP__REPLY_MODE", "passive"),
        ("YIZHAN__CHANNELS__MP__PASSIVE_WINDOW_MS", "2000"),
        ("YIZHAN__CHANNELS__MP__PASSIVE_MARGIN_MS", "300"),
    ];
    let app = start_in_process_with(&db, &env).await;
    let delivered =
        wechat_delivers_within(&app, &text_xml("oQuick", 91_000, "重启前"), Duration::from_millis(2_000)).await;
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    let (_, body) = delivered.unwrap_or_default();
    assert!(body.contains("答：重启前"), "{body}");
    assert!(app.sent_messages().await.is_empty(), "passive mode sends nothing");
}

/// Resumed within WeChat's first window, a message's next try is its second, not its last:
/// an answer not ready for the second is carried by the third (in passive mode, the only way
/// it reaches the user before they write again), instead of the second answering `success`.
/// WeChat's own window counts, not a shorter one configured for safety.
#[actix_web::test]
async fn a_message_resumed_within_its_first_window_still_has_two_tries_to_come() {
    let dir = std::env::temp_dir().join(format!("yizhan-resume-tries-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    // The stand-ins first: the message's age at the restart must stay well inside its window.
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    // The resumed message's answer comes once the second try was given up on, before the third.
    let held = HeldAnswers::start(&llm, 1);
    wechat_ok(&wechat).await;
    {
        let store = open_store(&db);
        accept_text(&store, CHANNEL, "oTries", "91001", "两次").await;
    }
    let env = [
        ("YIZHAN__CHANNELS__MP__REPLY_MODE", "passive"),
        ("YIZHAN__CHANNELS__MP__PASSIVE_WINDOW_MS", "1000"),
        ("YIZHAN__CHANNELS__MP__PASSIVE_MARGIN_MS", "300"),
        held.env_override(),
    ];
    let config = on_sqlite(base_config(&llm, &wechat), &db);
    let app = spawn_with(&config, &env, yizhan::channels::ChannelKinds::builtin(), wechat, llm).await;
    let xml = text_xml("oTries", 91_001, "两次");
    let delivered = wechat_delivers_with_lapses(&app, &xml, Duration::from_millis(4_000), |_| held.release(1)).await;
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    let (attempt, body) = delivered.unwrap_or_default();
    // The first try after the restart (WeChat's second) waited in vain and was left to lapse.
    assert_eq!(attempt, 2, "{body}");
    assert!(body.contains("答：两次"), "try {attempt}: {body}");
    assert!(app.sent_messages().await.is_empty(), "passive mode sends nothing");
}

/// Parked answers are saved in the store before their message is finished: after a graceful
/// restart (a deploy), the continue word still brings the rest of an answer.
#[actix_web::test]
async fn parked_answers_survive_a_graceful_restart() {
    parked_answers_survive_a_restart(true).await;
}

/// ... and after a `kill -9`.
#[actix_web::test]
async fn parked_answers_survive_a_kill_9() {
    parked_answers_survive_a_restart(false).await;
}

async fn parked_answers_survive_a_restart(graceful: bool) {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    wechat_ok(&wechat).await;
    let dir = std::env::temp_dir().join(format!("yizhan-parked-{graceful}-{}-{}", std::process::id(), now()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let config = on_sqlite(base_config(&llm, &wechat), &dir.join("yizhan.db")).replace(
        "reply_mode = \"push\"",
        "reply_mode = \"passive\"\npassive_window_ms = 2000\npassive_margin_ms = 300\nmax_part_bytes = 100",
    );
    let config_path = dir.join("yizhan.toml");
    std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));
    let window = Duration::from_millis(2_000);

    let mut first = start_binary(&config_path).await;
    let app =
        TestApp { address: first.address.clone(), wechat, llm, http: reqwest::Client::new(), _actor_threads: None };
    let question = format!("长{}尾巴", "。".repeat(60));
    let (_, reply) =
        wechat_delivers_within(&app, &text_xml("oParked", 95_000, &question), window).await.unwrap_or_default();
    assert!(reply.contains("继续"), "the rest is parked behind the hint: {reply}");
    wait_for("the answer finished", || async {
        metric(&app.http, &app.address, "yizhan_journal_open ").await == Some(0)
    })
    .await;
    if graceful {
        assert!(sigterm(&first.child));
        first.exits_cleanly().await;
    } else {
        first.child.kill().unwrap_or_else(|e| panic!("kill -9: {e}"));
        let _ = first.child.wait();
    }

    let mut second = start_binary(&config_path).await;
    let app = TestApp { address: second.address.clone(), ..app };
    let (_, more) =
        wechat_delivers_within(&app, &text_xml("oParked", 95_001, "继续"), window).await.unwrap_or_default();
    assert!(more.contains("。。。") && !more.contains("没有待查看"), "the parked rest comes back: {more}");
    assert!(sigterm(&second.child));
    second.exits_cleanly().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stop can leave an answer both pending (its message unfinished) and parked (saved with the
/// other parked answers). The next start sends it from its pending parts once, and forgets the
/// saved copy, or the continue word would show it a second time.
#[actix_web::test]
async fn an_answer_both_pending_and_saved_as_parked_comes_back_once() {
    an_answer_both_pending_and_parked_comes_back_once(true).await;
}

/// The same with the parked copy in the file an earlier version's graceful stop wrote.
#[actix_web::test]
async fn an_answer_both_pending_and_parked_in_an_earlier_versions_file_comes_back_once() {
    an_answer_both_pending_and_parked_comes_back_once(false).await;
}

async fn an_answer_both_pending_and_parked_comes_back_once(in_store: bool) {
    use yizhan::store::Store;
    let dir = std::env::temp_dir().join(format!("yizhan-parked-twice-{in_store}-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    {
        let store = open_store(&db);
        let envelope = accept_text(&store, CHANNEL, "oTwice", "96000", "长问题").await;
        let parts = record_parts(&store, &envelope, &["前半段".to_owned(), "后半段".to_owned()]).await;
        assert!(store.part_delivered(&parts[0].delivery_id).await.is_ok());
        let texts = serde_json::json!([[envelope.id, "后半段"]]);
        if in_store {
            park_in_store(&store, "oTwice", texts).await;
        } else {
            let record = serde_json::json!({"channel": CHANNEL, "user": "oTwice", "texts": texts, "age_secs": 0});
            let saved = serde_json::json!([record]).to_string();
            std::fs::write(dir.join("yizhan.db.parked.json"), saved).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let app = start_in_process_on(&db).await;
    app.wait_until_idle().await;
    assert_eq!(app.post_text("oTwice", 96_001, "继续").await.0, 200);
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    let texts = app.sent_texts().await;
    assert_eq!(texts, ["后半段", "没有待查看的内容了，请直接提问吧。"]);
}

/// A crash after the continue word took parked text but before its answer was recorded: after
/// the restart the message takes that text again (it was saved as taken, not as gone).
#[actix_web::test]
async fn parked_text_taken_by_the_continue_word_before_a_crash_is_taken_again() {
    let dir = std::env::temp_dir().join(format!("yizhan-parked-taken-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    {
        let store = open_store(&db);
        let continued = accept_text(&store, CHANNEL, "oTaken", "97000", "继续").await;
        park_in_store(
            &store,
            "oTaken",
            serde_json::json!([
                ["e-earlier", "e-earlier", "上次没看完的后半段", continued.id],
                ["e-later", "e-later", "另一个回答"]
            ]),
        )
        .await;
    }
    let app = start_in_process_on(&db).await;
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(app.llm_requests().await.is_empty(), "the continue word is not a question for the model");
    let texts = app.sent_texts().await;
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(texts[0].starts_with("上次没看完的后半段"), "{texts:?}");
}

/// A continue-word answer left pending by a stop (its text taken from the front of what was
/// parked, with later text parked behind it): after the restart its rest is parked where the
/// text it took was, so the next 「继续」 shows that rest, not the later text.
#[actix_web::test]
async fn the_rest_of_a_continue_word_answer_resent_after_a_restart_keeps_its_place() {
    let dir = std::env::temp_dir().join(format!("yizhan-parked-place-{}-{}", std::process::id(), now()));
    let db = dir.join("yizhan.db");
    {
        let store = open_store(&db);
        let continued = accept_text(&store, CHANNEL, "oPlace", "98000", "继续").await;
        record_parts(&store, &continued, &["前文第一段".to_owned(), "前文第二段".to_owned()]).await;
        park_in_store(
            &store,
            "oPlace",
            serde_json::json!([
                ["e-earlier", "e-earlier", "前文第一段\n\n前文第二段", continued.id],
                ["e-later", "e-later", "后来的回答"]
            ]),
        )
        .await;
    }
    let app = start_in_process_with(&db, &[("YIZHAN__CHANNELS__MP__SEND_QUOTA_PER_MESSAGE", "1")]).await;
    app.wait_until_idle().await;
    assert_eq!(app.post_text("oPlace", 98_001, "继续").await.0, 200);
    app.wait_until_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    let texts = app.sent_texts().await;
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts[0].starts_with("前文第一段") && texts[0].contains("继续"), "{texts:?}");
    assert!(texts[1].starts_with("前文第二段"), "the rest before the later answer: {texts:?}");
}

/// Saves `texts` (as the passive module saves them) as what is parked for `user` of [`CHANNEL`],
/// as a stopped run would have left them.
async fn park_in_store(store: &yizhan::store::SqliteStore, user: &str, texts: serde_json::Value) {
    use yizhan::store::Store;
    let record = serde_json::json!({"channel": CHANNEL, "user": user, "texts": texts, "age_secs": 0});
    let user =
        yizhan::store::ParkedUser { channel: CHANNEL.into(), user: user.into(), record: Some(record.to_string()) };
    assert!(store.save_parked(vec![user]).await.is_ok());
}
