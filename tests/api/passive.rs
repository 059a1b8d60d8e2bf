//! 公众号 `auto` and `passive` reply modes: answers inside WeChat's own webhook response, shared
//! across its retries, with the customer-service API and parking as fallbacks. WeChat's 5-second
//! window is scaled down to 1000 ms through `passive_window_ms` (answers stop being taken 300 ms
//! before its end, so a reply has that long to reach the client on a loaded machine); the
//! stand-in "WeChat" below gives up on an attempt after that long and retries, as WeChat does.
//! An answer that must come after all of a message's attempts is held back by [`HeldAnswers`]
//! until the test has made them, not delayed by a guess at how long a loaded machine takes.

use crate::helpers::*;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use yizhan::channels::ChannelKinds;
use yizhan_channel_wechat_crypto::{KeySlot, WxCrypto};

const WINDOW_MS: u64 = 1_000;

/// `reply_mode` and the scaled-down passive window ([`WINDOW_MS`]).
fn auto_env(mode: &'static str) -> Vec<(&'static str, &'static str)> {
    passive_env(mode, "1000")
}

/// `reply_mode` and a passive window of `window_ms`, answered 300 ms before its end.
fn passive_env(mode: &'static str, window_ms: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("YIZHAN__CHANNELS__MP__REPLY_MODE", mode),
        ("YIZHAN__CHANNELS__MP__PASSIVE_WINDOW_MS", window_ms),
        ("YIZHAN__CHANNELS__MP__PASSIVE_MARGIN_MS", "300"),
    ]
}

/// Posts `xml` the way WeChat does, abandoning each attempt after the (scaled-down) window.
async fn wechat_delivers(app: &TestApp, xml: &str) -> Option<(usize, String)> {
    wechat_delivers_within(app, xml, Duration::from_millis(WINDOW_MS)).await
}

/// WeChat's own 5 s window, for tests whose answer must be ready for the first attempt: an
/// answer the scaled-down window leaves 700 ms for could miss it on a loaded machine.
const IN_TIME_WINDOW_MS: u64 = 5_000;

/// [`auto_env`] with [`IN_TIME_WINDOW_MS`].
fn in_time_env(mode: &'static str) -> Vec<(&'static str, &'static str)> {
    passive_env(mode, "5000")
}

/// [`wechat_delivers`] with [`IN_TIME_WINDOW_MS`].
async fn wechat_delivers_in_time(app: &TestApp, xml: &str) -> Option<(usize, String)> {
    wechat_delivers_within(app, xml, Duration::from_millis(IN_TIME_WINDOW_MS)).await
}

fn passive_content(xml: &str) -> String {
    let start = xml.find("<Content><![CDATA[").map(|i| i + "<Content><![CDATA[".len());
    let end = xml.find("]]></Content>");
    match (start, end) {
        (Some(start), Some(end)) if start <= end => xml[start..end].to_owned(),
        _ => String::new(),
    }
}

/// The model's first `times` answers are `answer`, held back until the test releases them
/// (after all of WeChat's attempts); later questions are echoed at once. The app must use the
/// returned stand-in's `base_url`.
async fn late_answers_then_echo(llm: &MockServer, answer: &str, times: usize) -> HeldAnswers {
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "text/event-stream")
                .set_body_string(sse_answer(answer)),
        )
        .up_to_n_times(u64::try_from(times).unwrap_or(u64::MAX))
        .mount(llm)
        .await;
    echo_llm(llm, Duration::ZERO).await;
    HeldAnswers::start(llm, times)
}

#[actix_web::test]
async fn an_answer_ready_in_time_is_the_passive_reply_and_uses_no_api_quota() {
    let app = spawn_app(&in_time_env("auto"), Duration::from_millis(50)).await;
    let (attempt, body) = wechat_delivers_in_time(&app, &text_xml("oP1", 1, "你好")).await.unwrap_or_default();
    assert_eq!(attempt, 1);
    assert!(body.contains("<ToUserName><![CDATA[oP1]]></ToUserName>"), "{body}");
    assert!(body.contains("<FromUserName><![CDATA[gh_test]]></FromUserName>"), "{body}");
    assert_eq!(passive_content(&body), "答：你好");
    app.wait_until_idle().await;
    assert!(app.sent_messages().await.is_empty(), "no customer-service call");
}

/// WeChat retries only an attempt it got no answer to in time: a retry after a passive reply
/// proves that reply arrived too late (a queue before the handler, a slow network), so the
/// retry gets it again instead of `success`, which would end the retries with it lost.
#[actix_web::test]
async fn a_retry_after_a_passive_reply_gets_the_same_reply_again() {
    let app = spawn_app(&in_time_env("auto"), Duration::from_millis(50)).await;
    let xml = text_xml("oP13", 13, "迟到");
    let (attempt, first) = wechat_delivers_in_time(&app, &xml).await.unwrap_or_default();
    assert_eq!((attempt, passive_content(&first).as_str()), (1, "答：迟到"));
    // As if that reply had reached WeChat after its deadline: the retry comes.
    let (status, again) = app.post_signed(&xml).await;
    assert_eq!(status, 200);
    assert_eq!(passive_content(&again), "答：迟到", "{again}");
    app.wait_until_idle().await;
    assert_eq!(app.llm_requests().await.len(), 1);
    assert!(app.sent_messages().await.is_empty());
    let metrics = app.metrics().await;
    assert!(metrics.contains("outcome=\"passive_again\"} 1"), "{metrics}");
}

#[actix_web::test]
async fn a_slow_answer_reaches_the_second_attempt_with_one_llm_call() {
    let app = spawn_app(&auto_env("auto"), Duration::from_millis(1_200)).await;
    let (attempt, body) = wechat_delivers(&app, &text_xml("oP2", 2, "慢一点")).await.unwrap_or_default();
    // The second as a rule; the third if a stall on a loaded machine held the answer past the
    // second's last 300 ms (the point is one model call, answered passively).
    assert!(attempt >= 2, "attempt {attempt}: {body}");
    assert_eq!(passive_content(&body), "答：慢一点");
    app.wait_until_idle().await;
    assert_eq!(app.llm_requests().await.len(), 1);
    assert!(app.sent_messages().await.is_empty());
}

/// Ready after WeChat gave up on attempt 1 but while that handler still runs (the connection
/// is only half-closed): the answer must wait for attempt 2, not go down the dead connection.
#[actix_web::test]
async fn an_answer_ready_just_after_an_attempt_was_abandoned_goes_to_the_next_attempt() {
    let app = spawn_app(&auto_env("auto"), Duration::from_millis(WINDOW_MS + 60)).await;
    let (attempt, body) = wechat_delivers(&app, &text_xml("oP9", 9, "刚刚好")).await.unwrap_or_default();
    // Not the first's dead connection; the second as a rule, the third after a long stall.
    assert!(attempt >= 2, "attempt {attempt}: {body}");
    assert_eq!(passive_content(&body), "答：刚刚好");
    app.wait_until_idle().await;
    assert_eq!(app.llm_requests().await.len(), 1);
    assert!(app.sent_messages().await.is_empty());
}

/// The rest of a long answer goes out through the send API after its start was the passive
/// reply; the user's next message must not be answered before that rest is out (its own
/// attempt would otherwise carry the next answer ahead of it).
#[actix_web::test]
async fn the_next_answer_waits_until_the_rest_of_a_passive_answer_is_sent() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::from_millis(50)).await;
    wechat_ok_sending_after(&wechat, Duration::from_millis(150)).await;
    let mut env = auto_env("auto");
    env.push(("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "100"));
    let app = spawn_with(&base_config(&llm, &wechat), &env, ChannelKinds::builtin(), wechat, llm).await;
    let question = "长".repeat(100);
    // Whichever attempt carries the start (the first, unless the machine is very slow).
    let (_, first) = wechat_delivers(&app, &text_xml("oP14", 14, &question)).await.unwrap_or_default();
    assert!(passive_content(&first).starts_with("答："), "{first}");
    let (_, second) = wechat_delivers(&app, &text_xml("oP14", 15, "下一个")).await.unwrap_or_default();
    assert_eq!(passive_content(&second), "答：下一个", "{second}");
    // Every send of the first answer's rest had been made before the second reply left.
    let rest = app.sent_texts().await;
    assert!(rest.len() >= 2, "{rest:?}");
    app.wait_until_idle().await;
    assert_eq!(app.sent_texts().await, rest);
    let shown: String = [passive_content(&first)].into_iter().chain(rest).collect();
    assert_eq!(shown.replace('\n', ""), format!("答：{question}"));
}

#[actix_web::test]
async fn an_answer_that_renders_to_nothing_releases_the_held_attempt_at_once() {
    let mut env = auto_env("auto");
    env.push(("YIZHAN__MESSAGES__WELCOME", ""));
    let app = spawn_app(&env, Duration::ZERO).await;
    let subscribe = format!(
        "<xml><ToUserName>gh_test</ToUserName><FromUserName>oP10</FromUserName><CreateTime>{}</CreateTime>\
         <MsgType>event</MsgType><Event>subscribe</Event></xml>",
        now()
    );
    // All the time it needs: an attempt held for an answer would lapse only after WeChat's own
    // 5 s window, past this client's patience, and show as a later attempt.
    let (attempt, body) = wechat_delivers_in_time(&app, &subscribe).await.unwrap_or_default();
    assert_eq!((attempt, body.as_str()), (1, "success"));
    app.wait_until_idle().await;
    assert!(app.sent_messages().await.is_empty());
}

#[actix_web::test]
async fn a_very_slow_answer_is_acknowledged_on_the_third_attempt_and_pushed() {
    let (app, held) = spawn_app_holding_answers(&auto_env("auto"), 1).await;
    let (attempt, body) = wechat_delivers(&app, &text_xml("oP3", 3, "很慢")).await.unwrap_or_default();
    assert_eq!((attempt, body.as_str()), (3, "success"));
    held.release(1);
    app.wait_until_idle().await;
    assert_eq!(app.llm_requests().await.len(), 1);
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["touser"], "oP3");
    assert_eq!(sent[0]["text"]["content"], "答：很慢");
}

/// WeChat's earlier attempts may never have reached Yizhan (refused while it restarted, say):
/// the message's age by WeChat's clock tells which attempt a request is. The first one seen as
/// late as WeChat's last answers within its window (`success` here, the answer being slow; it
/// is pushed), not held for a retry that never comes, which would end in WeChat's error page.
#[actix_web::test]
async fn an_attempt_as_late_as_wechats_last_answers_within_its_window_though_first_seen() {
    let (app, held) = spawn_app_holding_answers(&auto_env("auto"), 1).await;
    // Sent 11 s ago: WeChat tries every 5 s (whatever the window here), so this is its third.
    let xml = text_xml_sent_at("oLate", 31, "晚到", now() - 11);
    let url = format!("{}?{}", app.webhook_url(CHANNEL), signed_query(now()));
    let response = reqwest::Client::new().post(url).body(xml).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.text().await.unwrap_or_default(), "success");
    held.release(1);
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["text"]["content"], "答：晚到");
}

#[actix_web::test]
async fn an_answer_refused_with_48001_is_delivered_with_the_next_message() {
    let app =
        first_answer_missing_all_attempts("auto", serde_json::json!({"errcode":48001,"errmsg":"api unauthorized"}))
            .await;
    assert!(!app.sent_messages().await.is_empty());
}

/// Not only a refusal: a send that failed for good for any reason (here the IP whitelist) is
/// still carried by the user's next passive reply.
#[actix_web::test]
async fn an_answer_whose_send_is_misconfigured_is_delivered_with_the_next_message() {
    let app =
        first_answer_missing_all_attempts("auto", serde_json::json!({"errcode":40164,"errmsg":"invalid ip"})).await;
    assert!(!app.sent_messages().await.is_empty());
}

/// A 公众号 account in push mode (with `env` too) whose send API refuses every part with
/// 48001; an instant echo model.
async fn spawn_push_refused_with_48001(env: &[(&'static str, &'static str)]) -> TestApp {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    let refused = serde_json::json!({"errcode":48001,"errmsg":"api unauthorized"});
    wechat_answering_sends_with(&wechat, refused, Duration::ZERO).await;
    let mut env = env.to_vec();
    env.push(("YIZHAN__CHANNELS__MP__REPLY_MODE", "push"));
    spawn_with(&base_config(&llm, &wechat), &env, ChannelKinds::builtin(), wechat, llm).await
}

/// In push mode no webhook response carries an answer, so text parked there would come out
/// only on a 继续 nobody asked for: a refused answer is recorded failed and counted instead.
#[actix_web::test]
async fn in_push_mode_a_refused_answer_is_recorded_failed_not_parked() {
    let app = spawn_push_refused_with_48001(&[]).await;
    assert_eq!(app.post_text("oPush", 80, "问题").await, (200, "success".to_owned()));
    app.wait_until_idle().await;
    let metrics = app.metrics().await;
    assert!(metrics.contains("yizhan_deliveries_total{channel=\"mp\",outcome=\"refused\"} 1"), "{metrics}");
    assert!(!metrics.contains("path=\"parked\""), "{metrics}");
}

/// An answer longer than the send quota parks its end behind the continue word before it is
/// sent; refused, the start never showed the hint, and the end is dropped with it: a later
/// 「继续」 finds nothing parked, instead of bringing the end of an answer the user never saw.
#[actix_web::test]
async fn in_push_mode_a_refused_long_answer_leaves_nothing_parked() {
    let app = spawn_push_refused_with_48001(&[("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "100")]).await;
    app.post_text("oPushLong", 82, &"问".repeat(240)).await;
    app.wait_until_idle().await;
    app.post_text("oPushLong", 83, "继续").await;
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    let last = sent.last().and_then(|message| message["text"]["content"].as_str()).unwrap_or_default();
    assert_eq!(last, "没有待查看的内容了，请直接提问吧。", "{sent:?}");
    assert_eq!(app.llm_requests().await.len(), 1);
}

/// [`base_config`] on the memory store, or with `sqlite` on a SQLite store in `dir`.
fn config_on_store(llm: &MockServer, wechat: &MockServer, sqlite: bool, dir: &std::path::Path) -> String {
    let config = base_config(llm, wechat);
    if sqlite {
        on_sqlite(config, &dir.join("yizhan.db"))
    } else {
        config
    }
}

/// Posts `questions` from `user`, each answered before the next; returns every prompt the
/// model was sent, as text.
async fn prompts_after(app: &TestApp, user: &str, questions: &[(u64, &str)]) -> Vec<String> {
    for (msg_id, question) in questions {
        app.post_text(user, *msg_id, question).await;
        app.wait_until_idle().await;
    }
    app.llm_requests().await.iter().map(|request| String::from_utf8_lossy(&request.body).into_owned()).collect()
}

/// Taking out the turn of an answer nobody received leaves the conversation's other turns as
/// they were: the oldest, trimmed when that turn went in at the history's cap, is still there.
#[actix_web::test]
async fn an_answer_nobody_received_at_the_history_cap_leaves_the_older_turns() {
    for sqlite in [false, true] {
        let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
        echo_llm(&llm, Duration::ZERO).await;
        let refused = ResponseTemplate::new(200).set_body_json(serde_json::json!({"errcode":48001,"errmsg":"x"}));
        // The first two answers go out; the third is refused.
        Mock::given(method("POST"))
            .and(path("/cgi-bin/message/custom/send"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"errcode":0,"errmsg":"ok"})))
            .up_to_n_times(2)
            .mount(&wechat)
            .await;
        Mock::given(method("POST"))
            .and(path("/cgi-bin/message/custom/send"))
            .respond_with(refused)
            .up_to_n_times(1)
            .mount(&wechat)
            .await;
        wechat_ok(&wechat).await;
        let dir = std::env::temp_dir().join(format!("yizhan-cap-{sqlite}-{}-{}", std::process::id(), now()));
        let config = config_on_store(&llm, &wechat, sqlite, &dir);
        let env = [
            ("YIZHAN__CHANNELS__MP__REPLY_MODE", "push"),
            ("YIZHAN__DELIVERY__MAX_ATTEMPTS", "1"),
            ("YIZHAN__SESSION__HISTORY_MAX_TURNS", "2"),
        ];
        let app = spawn_with(&config, &env, ChannelKinds::builtin(), wechat, llm).await;
        let prompts = prompts_after(&app, "oCap", &[(1, "第一问"), (2, "第二问"), (3, "第三问"), (4, "第四问")]).await;
        let last = prompts.last().cloned().unwrap_or_default();
        assert!(last.contains("答：第一问") && last.contains("答：第二问"), "sqlite: {sqlite}: {last}");
        assert!(!last.contains("答：第三问"), "sqlite: {sqlite}: {last}");
        drop(app);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// An answer refused for good before any of it reached the user leaves no turn behind: the
/// next prompt must not show the model saying what the user never read. An answer that
/// arrived stays, and so does one whose send failed in a way that may have arrived (a gateway's
/// 502, retries used up). On both stores (the SQLite one reads the history back after the
/// refusal).
#[actix_web::test]
async fn an_answer_nobody_received_is_left_out_of_the_next_prompts() {
    let refused = ResponseTemplate::new(200).set_body_json(serde_json::json!({"errcode":48001,"errmsg":"x"}));
    let unknown = ResponseTemplate::new(502).set_body_string("bad gateway");
    for (sqlite, first_send, left_out) in [(false, &refused, true), (true, &refused, true), (false, &unknown, false)] {
        let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
        echo_llm(&llm, Duration::ZERO).await;
        Mock::given(method("POST"))
            .and(path("/cgi-bin/message/custom/send"))
            .respond_with(first_send.clone())
            .up_to_n_times(1)
            .mount(&wechat)
            .await;
        wechat_ok(&wechat).await;
        let dir = std::env::temp_dir().join(format!("yizhan-unseen-{}-{}", std::process::id(), now()));
        let config = config_on_store(&llm, &wechat, sqlite, &dir);
        let env = [("YIZHAN__CHANNELS__MP__REPLY_MODE", "push"), ("YIZHAN__DELIVERY__MAX_ATTEMPTS", "1")];
        let app = spawn_with(&config, &env, ChannelKinds::builtin(), wechat, llm).await;
        let prompts = prompts_after(&app, "oUnseen", &[(1, "第一问"), (2, "第二问"), (3, "第三问")]).await;
        assert_eq!(prompts.len(), 3, "sqlite: {sqlite}");
        let kept = prompts[1].contains("答：第一问") && prompts[2].contains("答：第一问");
        let gone = !prompts[1].contains("第一问") && !prompts[2].contains("第一问");
        assert!(if left_out { gone } else { kept }, "sqlite: {sqlite}, left out: {left_out}: {prompts:?}");
        assert!(prompts[2].contains("答：第二问"), "sqlite: {sqlite}: {prompts:?}");
        // The first answer's one send (failed), then the two others.
        let sent = app.sent_messages().await;
        assert_eq!(sent.len(), 3, "sqlite: {sqlite}: {sent:?}");
        drop(app);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Passive mode is for accounts without the send API: an answer too late for every attempt
/// waits for the next message, and no send (or typing) call is made at all.
#[actix_web::test]
async fn in_passive_mode_an_answer_too_late_for_every_attempt_comes_with_the_next_message() {
    let app = first_answer_missing_all_attempts("passive", serde_json::json!({"errcode":0,"errmsg":"ok"})).await;
    let calls = app.wechat.received_requests().await.unwrap_or_default();
    let paths: Vec<String> = calls.iter().map(|request| request.url.path().to_owned()).collect();
    assert!(paths.is_empty(), "{paths:?}");
}

/// The first question is answered after all three of WeChat's attempts; the send API answers
/// `send_answer`. Asserts that the next question's passive reply brings the first answer.
async fn first_answer_missing_all_attempts(mode: &'static str, send_answer: serde_json::Value) -> TestApp {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    // The first question's answer comes after all three attempts; later ones at once.
    let held = late_answers_then_echo(&llm, "第一个答案", 1).await;
    wechat_answering_sends_with(&wechat, send_answer, Duration::ZERO).await;
    let config = base_config(&llm, &wechat);
    let mut env = auto_env(mode);
    env.push(held.env_override());
    let app = spawn_with(&config, &env, ChannelKinds::builtin(), wechat, llm).await;

    let (attempt, body) = wechat_delivers(&app, &text_xml("oPark", 10, "第一个问题")).await.unwrap_or_default();
    assert_eq!((attempt, body.as_str()), (3, "success"));
    held.release(1);
    app.wait_until_idle().await;
    assert!(app.metrics().await.contains("yizhan_answers_total{channel=\"mp\",path=\"parked\"} 1"));

    // Whichever attempt takes the new answer (the first, unless a loaded machine holds it past
    // its 700 ms) brings the parked one with it.
    let (_, body) = wechat_delivers(&app, &text_xml("oPark", 11, "第二个问题")).await.unwrap_or_default();
    let content = passive_content(&body);
    assert!(content.starts_with("【你上一条消息的回复】\n第一个答案"), "{content}");
    assert!(content.ends_with("答：第二个问题"), "{content}");
    app
}

/// In passive mode an answer of more parts than the send API's quota of five, too late for every
/// attempt, is parked (whole: the quota is the send API's) and comes over the next messages,
/// each showing the continue hint at its end only, all of it in order.
#[actix_web::test]
async fn in_passive_mode_a_late_answer_of_many_parts_is_parked_without_a_hint_inside() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    let answer = "一二三四五六七八九十。".repeat(40);
    let held = late_answers_then_echo(&llm, &answer, 1).await;
    wechat_ok(&wechat).await;
    let mut env = auto_env("passive");
    // 3 bytes a character: eight parts of 180 bytes or fewer.
    env.push(("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "180"));
    env.push(held.env_override());
    let app = spawn_with(&base_config(&llm, &wechat), &env, ChannelKinds::builtin(), wechat, llm).await;
    let (attempt, body) = wechat_delivers(&app, &text_xml("oWhole", 40, "长答")).await.unwrap_or_default();
    assert_eq!((attempt, body.as_str()), (3, "success"));
    held.release(1);
    app.wait_until_idle().await;
    let hint = "（回复「继续」查看剩余内容）";
    let mut shown = String::new();
    for msg_id in 41..80 {
        let (_, body) = wechat_delivers(&app, &text_xml("oWhole", msg_id, "继续")).await.unwrap_or_default();
        let content = passive_content(&body);
        if content.contains("没有待查看的内容了") {
            break;
        }
        let text = content.strip_suffix(hint).unwrap_or(&content);
        assert!(!text.contains("继续"), "a hint inside the text: {content}");
        shown.push_str(text.trim_start_matches("【你上一条消息的回复】"));
        app.wait_until_idle().await;
    }
    let shown: String = shown.chars().filter(|c| !c.is_whitespace()).collect();
    assert_eq!(shown, answer);
}

#[actix_web::test]
async fn in_passive_mode_the_rest_of_a_long_answer_waits_for_the_continue_word() {
    let long_question = "长".repeat(300);
    let app = spawn_app(
        &[
            ("YIZHAN__CHANNELS__MP__REPLY_MODE", "passive"),
            ("YIZHAN__CHANNELS__MP__PASSIVE_WINDOW_MS", "1000"),
            ("YIZHAN__CHANNELS__MP__PASSIVE_MARGIN_MS", "300"),
            ("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "600"),
        ],
        Duration::ZERO,
    )
    .await;
    let (_, first) = wechat_delivers(&app, &text_xml("oLong", 20, &long_question)).await.unwrap_or_default();
    let first = passive_content(&first);
    assert!(first.ends_with("（回复「继续」查看剩余内容）"), "{first}");
    app.wait_until_idle().await;
    let (_, rest) = wechat_delivers(&app, &text_xml("oLong", 21, "继续")).await.unwrap_or_default();
    let rest = passive_content(&rest);
    let shown: String = (first.trim_end_matches("（回复「继续」查看剩余内容）").to_owned() + &rest)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    assert_eq!(shown, format!("答：{long_question}"));
    app.wait_until_idle().await;
    assert!(app.sent_messages().await.is_empty(), "passive mode never calls the send API");
    assert_eq!(app.llm_requests().await.len(), 1, "继续 asks no LLM");
}

/// A parked answer too long to go beside the next answer is not put back unannounced (it would
/// come out only on a 继续 nobody knows to send): the reply shows its start with the hint, and
/// 继续 brings the rest of it, then the new answer.
#[actix_web::test]
async fn a_parked_answer_too_long_to_go_beside_the_next_one_is_announced_and_comes_first() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    let older = "旧".repeat(300);
    let held = late_answers_then_echo(&llm, &older, 1).await;
    wechat_ok(&wechat).await;
    let mut env = auto_env("passive");
    env.push(("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "600"));
    env.push(held.env_override());
    let app = spawn_with(&base_config(&llm, &wechat), &env, ChannelKinds::builtin(), wechat, llm).await;
    let (attempt, body) = wechat_delivers(&app, &text_xml("oTooLong", 50, "第一个问题")).await.unwrap_or_default();
    assert_eq!((attempt, body.as_str()), (3, "success"));
    held.release(1);
    app.wait_until_idle().await;

    let hint = "（回复「继续」查看剩余内容）";
    let (_, body) = wechat_delivers(&app, &text_xml("oTooLong", 51, "第二个问题")).await.unwrap_or_default();
    let mut shown = vec![passive_content(&body)];
    assert!(shown[0].starts_with("【你上一条消息的回复】\n旧") && shown[0].ends_with(hint), "{}", shown[0]);
    let nothing_parked = "没有待查看的内容了，请直接提问吧。";
    for id in 52..60 {
        app.wait_until_idle().await;
        let (_, body) = wechat_delivers(&app, &text_xml("oTooLong", id, "继续")).await.unwrap_or_default();
        let reply = passive_content(&body);
        if reply == nothing_parked {
            break;
        }
        shown.push(reply);
    }
    assert!(shown.len() < 8, "继续 never ran out: {shown:?}");
    let all: String = shown
        .concat()
        .replace(hint, "")
        .replace("【你上一条消息的回复】", "")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    assert_eq!(all, format!("{older}答：第二个问题"));
    assert!(app.sent_messages().await.is_empty(), "passive mode never calls the send API");
}

#[actix_web::test]
async fn a_safe_mode_message_gets_an_encrypted_passive_reply() {
    const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    let mut env = in_time_env("auto");
    env.push(("YIZHAN__CHANNELS__MP__ENCODING_AES_KEY", AES_KEY));
    let app = spawn_app(&env, Duration::from_millis(50)).await;
    let crypto = WxCrypto::new(WECHAT_TOKEN, AES_KEY, None, "wx-test-app").unwrap_or_else(|e| panic!("{e}"));
    let encrypt =
        crypto.encrypt(&text_xml("oSafe", 30, "加密你好"), KeySlot::Current).unwrap_or_else(|e| panic!("{e}"));
    let (timestamp, nonce) = (now().to_string(), "777");
    let msg_signature = yizhan_channel_wechat_crypto::msg_signature(WECHAT_TOKEN, &timestamp, nonce, &encrypt);
    let url = format!(
        "{}?signature={}&timestamp={timestamp}&nonce={nonce}&encrypt_type=aes&msg_signature={msg_signature}",
        app.webhook_url(CHANNEL),
        signature(WECHAT_TOKEN, &timestamp, nonce)
    );
    let body =
        format!("<xml><ToUserName><![CDATA[gh_test]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>");
    let response = app.http.post(url).body(body).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
    let reply = response.text().await.unwrap_or_default();
    let field = |name: &str| -> String {
        let open = format!("<{name}><![CDATA[");
        let start = reply.find(&open).map(|i| i + open.len()).unwrap_or(0);
        let end = reply[start..].find("]]>").map(|i| start + i).unwrap_or(start);
        reply[start..end].to_owned()
    };
    let reply_timestamp = reply
        .split("<TimeStamp>")
        .nth(1)
        .and_then(|rest| rest.split("</TimeStamp>").next())
        .unwrap_or_default()
        .to_owned();
    let opened = crypto
        .verify_and_decrypt(&field("MsgSignature"), &reply_timestamp, &field("Nonce"), &field("Encrypt"))
        .unwrap_or_else(|e| panic!("reply does not verify: {e}\n{reply}"));
    assert_eq!(passive_content(&opened.message), "答：加密你好");
}

#[actix_web::test]
async fn the_first_answer_to_a_user_carries_the_ai_label() {
    let app = spawn_app(&[("YIZHAN__MESSAGES__AI_LABEL", "「以下内容由AI生成」")], Duration::ZERO).await;
    app.post_text("oLabel", 40, "一").await;
    app.wait_until_idle().await;
    app.post_text("oLabel", 41, "二").await;
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert_eq!(sent[0]["text"]["content"], "「以下内容由AI生成」\n答：一");
    assert_eq!(sent[1]["text"]["content"], "答：二");
}

/// With no history in the prompt (`history_max_turns = 0`), a returning user is still told
/// from a first contact: the label is not repeated on every answer.
#[actix_web::test]
async fn without_history_in_the_prompt_only_the_first_answer_carries_the_ai_label() {
    let env = [("YIZHAN__MESSAGES__AI_LABEL", "「AI」"), ("YIZHAN__SESSION__HISTORY_MAX_TURNS", "0")];
    let app = spawn_app(&env, Duration::ZERO).await;
    app.post_text("oNoHistory", 42, "一").await;
    app.wait_until_idle().await;
    app.post_text("oNoHistory", 43, "二").await;
    app.wait_until_idle().await;
    assert_eq!(app.sent_texts().await, ["「AI」\n答：一", "答：二"]);
    let requests = app.llm_requests().await;
    let second: serde_json::Value = serde_json::from_slice(&requests[1].body).unwrap_or_default();
    let asked: Vec<&str> =
        second["messages"].as_array().into_iter().flatten().filter_map(|m| m["content"].as_str()).collect();
    assert!(!asked.contains(&"一"), "no history in the prompt: {asked:?}");
}

#[actix_web::test]
async fn a_long_pushed_answer_stays_within_the_five_message_quota_and_continues_on_request() {
    // Ends in code: the parked rest is plain text already and must not be rendered again.
    let question = format!("{}\n\n```\nprintln!(\"**hi**\"); // __init__\n```", "问".repeat(240));
    let app = spawn_app(&[("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "100")], Duration::ZERO).await;
    app.post_text("oQuota", 50, &question).await;
    app.wait_until_idle().await;
    let first = app.sent_messages().await;
    assert_eq!(first.len(), 5, "the customer-service quota is 5 messages per user message");
    let hint = "（回复「继续」查看剩余内容）";
    let last = first[4]["text"]["content"].as_str().unwrap_or_default().to_owned();
    assert!(last.ends_with(hint), "{last}");
    app.post_text("oQuota", 51, "继续").await;
    app.wait_until_idle().await;
    let all = app.sent_messages().await;
    let shown: String = all
        .iter()
        .map(|m| m["text"]["content"].as_str().unwrap_or_default().replace(hint, ""))
        .collect::<String>()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    assert_eq!(shown, format!("答：{}println!(\"**hi**\");//__init__", "问".repeat(240)));
    assert_eq!(app.llm_requests().await.len(), 1);
}

/// The fifth part, the one saying 「继续」 brings the rest, fails in a way that may have
/// arrived (a gateway's 504): the user may be reading that hint, so the rest stays parked for
/// the continue word instead of being dropped.
#[actix_web::test]
async fn the_rest_stays_parked_when_the_part_with_the_hint_may_have_arrived() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    let sent_ok = ResponseTemplate::new(200).set_body_json(serde_json::json!({"errcode":0,"errmsg":"ok"}));
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(sent_ok)
        .up_to_n_times(4)
        .mount(&wechat)
        .await;
    Mock::given(method("POST"))
        .and(path("/cgi-bin/message/custom/send"))
        .respond_with(ResponseTemplate::new(504).set_body_string("gateway timeout"))
        .up_to_n_times(1)
        .mount(&wechat)
        .await;
    wechat_ok(&wechat).await;
    let config = base_config(&llm, &wechat);
    let env = [
        ("YIZHAN__CHANNELS__MP__REPLY_MODE", "push"),
        ("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "100"),
        ("YIZHAN__DELIVERY__MAX_ATTEMPTS", "1"),
    ];
    let app = spawn_with(&config, &env, ChannelKinds::builtin(), wechat, llm).await;
    let question = "问".repeat(240);
    app.post_text("oHint", 60, &question).await;
    app.wait_until_idle().await;
    let hint = "（回复「继续」查看剩余内容）";
    let first = app.sent_texts().await;
    assert_eq!(first.len(), 5, "{first:?}");
    assert!(first[4].ends_with(hint), "{first:?}");
    app.post_text("oHint", 61, "继续").await;
    app.wait_until_idle().await;
    let shown: String = app
        .sent_texts()
        .await
        .iter()
        .map(|text| text.replace(hint, ""))
        .collect::<String>()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    assert_eq!(shown, format!("答：{question}"), "the rest came with 「继续」");
    assert!(app.metrics().await.contains("yizhan_deliveries_total{channel=\"mp\",outcome=\"maybe_delivered\"} 1"));
}

/// WeChat retries only once its own 5 s are up, and an answer before then, even an empty
/// one, ends its retries: an attempt that took nothing is held past those 5 s even where a
/// shorter window is set (400 ms here; held for 1.2 times it, the attempt answered at 480 ms).
#[actix_web::test]
async fn an_attempt_that_took_nothing_is_held_past_wechats_own_window_whatever_window_is_set() {
    let env = [
        ("YIZHAN__CHANNELS__MP__REPLY_MODE", "auto"),
        ("YIZHAN__CHANNELS__MP__PASSIVE_WINDOW_MS", "400"),
        ("YIZHAN__CHANNELS__MP__PASSIVE_MARGIN_MS", "100"),
    ];
    let app = spawn_app(&env, Duration::from_secs(30)).await;
    let url = format!("{}?{}", app.webhook_url(CHANNEL), signed_query(now()));
    let xml = text_xml("oHeld", 95, "慢的问题");
    let attempt = app.http.post(url).body(xml).timeout(Duration::from_millis(1_500)).send().await;
    assert!(attempt.as_ref().is_err_and(reqwest::Error::is_timeout), "answered within WeChat's 5 s: {attempt:?}");
}

/// Issue 4: the official compatible-mode vector (token `spamtest`), posted through the webhook, is
/// answered with an encrypted passive reply that decrypts with the same parameters.
#[actix_web::test]
async fn the_official_safe_mode_vector_is_answered_with_an_encrypted_passive_reply() {
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("../../channels/wechat-crypto/tests/vectors/crypto.json"))
            .unwrap_or_default();
    let vector = vectors
        .as_array()
        .and_then(|all| all.iter().find(|v| v["name"] == "mp_decrypt_compat_mode_spamtest"))
        .map(|v| v["inputs"].clone())
        .unwrap_or_default();
    let input = |key: &str| vector[key].as_str().unwrap_or_default().to_owned();
    let (token, aes_key, appid) = (input("token"), input("encoding_aes_key"), input("appid"));
    let mut env = in_time_env("auto");
    env.extend([
        ("YIZHAN__CHANNELS__MP__TOKEN", token.as_str()),
        ("YIZHAN__CHANNELS__MP__APP_ID", appid.as_str()),
        ("YIZHAN__CHANNELS__MP__ENCODING_AES_KEY", aes_key.as_str()),
        ("YIZHAN__CHANNELS__MP__REPLAY_WINDOW_SECS", "0"),
    ]);
    let app = spawn_app(&env, Duration::from_millis(50)).await;
    let url = format!(
        "{}?timestamp={}&nonce={}&encrypt_type=aes&msg_signature={}",
        app.webhook_url(CHANNEL),
        input("timestamp"),
        input("nonce"),
        input("msg_signature")
    );
    let response = app.http.post(url).body(input("post_body_xml")).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
    let reply = response.text().await.unwrap_or_default();
    let between = |open: &str, close: &str| -> String {
        reply.split(open).nth(1).and_then(|rest| rest.split(close).next()).unwrap_or_default().to_owned()
    };
    let crypto = WxCrypto::new(&token, &aes_key, None, &appid).unwrap_or_else(|e| panic!("{e}"));
    let opened = crypto
        .verify_and_decrypt(
            &between("<MsgSignature><![CDATA[", "]]>"),
            &between("<TimeStamp>", "</TimeStamp>"),
            &between("<Nonce><![CDATA[", "]]>"),
            &between("<Encrypt><![CDATA[", "]]>"),
        )
        .unwrap_or_else(|e| panic!("reply does not verify: {e}\n{reply}"));
    assert!(opened.message.contains("<ToUserName><![CDATA[oyORnuP8q7ou2gfYjqLzSIWZf0rs]]></ToUserName>"));
    assert_eq!(passive_content(&opened.message), "答：abcdteT");
    app.wait_until_idle().await;
    assert!(app.sent_messages().await.is_empty());
}

/// The 公众号 channel, 300 ms slower to read each webhook (a loaded worker, a slow disk).
/// The built-in 公众号 channel, slow to read the webhooks given in its delays (by call number,
/// from 1; those not given are read at once).
struct SlowToRead {
    inner: std::sync::Arc<dyn yizhan_channel_core::Channel>,
    delays: &'static [Duration],
    calls: std::sync::atomic::AtomicUsize,
}

impl SlowToRead {
    /// Registers it as `wechat_mp` in a set of the built-in kinds.
    fn kinds(delays: &'static [Duration]) -> ChannelKinds {
        let mut kinds = ChannelKinds::builtin();
        let builtin = ChannelKinds::builtin();
        kinds.register("wechat_mp", move |settings, http| {
            let inner = builtin.build(settings, http)?;
            Ok(std::sync::Arc::new(SlowToRead { inner, delays, calls: Default::default() }) as std::sync::Arc<_>)
        });
        kinds
    }
}

impl yizhan_channel_core::Channel for SlowToRead {
    fn id(&self) -> &yizhan_channel_core::ChannelId {
        self.inner.id()
    }
    fn kind(&self) -> &str {
        self.inner.kind()
    }
    fn capabilities(&self) -> yizhan_channel_core::Capabilities {
        self.inner.capabilities()
    }
    fn handle_webhook(
        &self,
        request: &yizhan_channel_core::WebhookRequest,
    ) -> Result<yizhan_channel_core::WebhookOutcome, yizhan_channel_core::ChannelError> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(self.delays.get(call).copied().unwrap_or_default());
        self.inner.handle_webhook(request)
    }
    fn render(&self, reply: &yizhan_channel_core::Reply) -> Vec<yizhan_channel_core::Reply> {
        self.inner.render(reply)
    }
    fn passive_reply(
        &self,
        request: &yizhan_channel_core::WebhookRequest,
        envelope: &yizhan_channel_core::Envelope,
        reply: &yizhan_channel_core::Reply,
    ) -> Result<yizhan_channel_core::WebhookResponse, yizhan_channel_core::ChannelError> {
        self.inner.passive_reply(request, envelope, reply)
    }
    fn deliver<'a>(
        &'a self,
        delivery: &'a yizhan_channel_core::Delivery,
    ) -> yizhan_channel_core::BoxFuture<
        'a,
        Result<yizhan_channel_core::DeliveryReceipt, yizhan_channel_core::ChannelError>,
    > {
        self.inner.deliver(delivery)
    }
}

/// WeChat's window runs from when it sent the request: time spent reading and journaling it
/// comes out of the wait, or an answer ready after WeChat hung up would be taken by the
/// abandoned attempt (and lost: the retry would find the message answered).
#[actix_web::test]
async fn the_passive_wait_counts_from_when_the_request_arrived() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::from_millis(650)).await;
    wechat_ok(&wechat).await;
    const SLOW: Duration = Duration::from_millis(300);
    let kinds = SlowToRead::kinds(&[SLOW, SLOW, SLOW]);
    let app = spawn_with(&base_config(&llm, &wechat), &auto_env("auto"), kinds, wechat, llm).await;
    let (attempt, body) = wechat_delivers(&app, &text_xml("oSlowRead", 30, "慢读")).await.unwrap_or_default();
    // Not the first (it would take the answer if its wait counted from when its handler began);
    // the second as a rule, the third if a loaded machine started the second late.
    assert!(attempt >= 2, "attempt {attempt}: {body}");
    assert_eq!(passive_content(&body), "答：慢读", "{body}");
    app.wait_until_idle().await;
    assert!(app.sent_messages().await.is_empty());
}

/// WeChat's last attempt, read so slowly that its window is over before it could wait: an
/// answer ready by then must not go into its reply (written to a connection WeChat closed,
/// with nothing after it to notice: the answer would be lost, recorded as given). It is pushed.
#[actix_web::test]
async fn a_last_attempt_already_past_its_window_leaves_a_ready_answer_to_be_pushed() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    // Ready once the second attempt was given up on, before the third is read (1100 ms late).
    let held = HeldAnswers::start(&llm, 1);
    wechat_ok(&wechat).await;
    const THIRD_READ_SLOWLY: [Duration; 3] = [Duration::ZERO, Duration::ZERO, Duration::from_millis(1_100)];
    let kinds = SlowToRead::kinds(&THIRD_READ_SLOWLY);
    let mut env = auto_env("auto");
    env.push(held.env_override());
    let app = spawn_with(&base_config(&llm, &wechat), &env, kinds, wechat, llm).await;
    let xml = text_xml("oLate", 31, "迟到");
    // Every attempt, the last too, is given up after the window, as WeChat does.
    let client = reqwest::Client::new();
    let mut in_time = Vec::new();
    for attempt in 1..=3 {
        let url = format!("{}?{}", app.webhook_url(CHANNEL), signed_query(now()));
        let timeout = Duration::from_millis(WINDOW_MS);
        if let Ok(response) = client.post(url).body(xml.clone()).timeout(timeout).send().await {
            if let Ok(body) = response.text().await {
                in_time.push(body);
            }
        }
        if attempt == 2 {
            // Once the second has stopped waiting (WeChat gave up on it; its handler may have
            // begun late), so that no attempt can take the answer.
            wait_for("the second attempt past its wait", || async {
                let metrics = app.metrics().await;
                metrics.contains("yizhan_passive_attempts_total{channel=\"mp\"} 2")
                    && metrics.contains("yizhan_passive_waiting{channel=\"mp\"} 0")
            })
            .await;
            held.release(1);
        }
    }
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert!(in_time.iter().all(|body| passive_content(body).is_empty()), "in time: {in_time:?}");
    assert_eq!(sent.len(), 1, "pushed once: {sent:?}");
    assert_eq!(sent[0]["text"]["content"], "答：迟到");
    assert!(
        app.metrics().await.lines().all(|line| !line.starts_with("yizhan_passive_fallback_pushes_total")),
        "pushed by the fallback timer"
    );
}

/// WeChat hangs up on its last attempt before the answer is ready (the request queued before the
/// handler began, so its window ran out first; actix-web keeps running a handler whose client
/// left). The answer, ready after that, is pushed, not written to the closed connection and
/// recorded as given.
#[actix_web::test]
async fn an_answer_ready_after_the_last_attempt_hung_up_is_pushed() {
    let (app, held) = spawn_app_holding_answers(&passive_env("auto", "3000"), 1).await;
    let connections = attempts_left_open(&app, &text_xml("oGone", 33, "挂断"), 0).await;
    // WeChat gives up on them all, the last one while its handler waits for the answer.
    drop(connections);
    held.release(1);
    wait_for("the answer pushed", || async { app.sent_messages().await.len() == 1 }).await;
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 1, "pushed once: {sent:?}");
    assert_eq!(sent[0]["text"]["content"], "答：挂断");
}

/// WeChat's three attempts at `xml`, each on a connection of its own, sent once the one before
/// was counted (after `attempts_before` attempts of other messages), and left open: for the
/// test to close, as WeChat does when it gives up.
async fn attempts_left_open(app: &TestApp, xml: &str, attempts_before: usize) -> Vec<std::net::TcpStream> {
    use std::io::Write;
    let host = app.address.trim_start_matches("http://").to_owned();
    let mut connections = Vec::new();
    for attempt in 1..=3 {
        let mut connection = std::net::TcpStream::connect(&host).unwrap_or_else(|e| panic!("{e}"));
        let head = format!(
            "POST /webhooks/{CHANNEL}?{} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
            signed_query(now()),
            xml.len()
        );
        connection.write_all(format!("{head}{xml}").as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let counted = attempts_before + attempt;
        app.wait_for_metric(&format!("yizhan_passive_attempts_total{{channel=\"mp\"}} {counted}")).await;
        connections.push(connection);
    }
    connections
}

/// Nor does WeChat's last attempt, closed before it gave up waiting, take the user's parked
/// text into a reply no one reads: it stays parked for the next message.
#[actix_web::test]
async fn a_last_attempt_whose_connection_closed_leaves_parked_text_parked() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    // The first two questions' answers come when the test releases them.
    let held = late_answers_then_echo(&llm, "第一个答案", 2).await;
    wechat_ok(&wechat).await;
    let mut env = passive_env("passive", "2000");
    env.push(held.env_override());
    let app = spawn_with(&base_config(&llm, &wechat), &env, ChannelKinds::builtin(), wechat, llm).await;
    // The first answer comes after every attempt, and is parked.
    let first = attempts_left_open(&app, &text_xml("oShut", 34, "第一个问题"), 0).await;
    app.wait_for_metric("yizhan_passive_waiting{channel=\"mp\"} 0").await;
    held.release(1);
    app.wait_for_metric("yizhan_answers_total{channel=\"mp\",path=\"parked\"} 1").await;
    drop(first);
    // The second question's attempts all close before the last one gives up waiting.
    drop(attempts_left_open(&app, &text_xml("oShut", 35, "第二个问题"), 3).await);
    app.wait_for_metric("yizhan_passive_waiting{channel=\"mp\"} 0").await;
    assert!(!app.metrics().await.contains("path=\"unparked\""), "parked text written to a closed connection");
    held.release(2);
    app.wait_for_metric("yizhan_answers_total{channel=\"mp\",path=\"parked\"} 2").await;
    app.wait_until_idle().await;
    let (_, body) = wechat_delivers(&app, &text_xml("oShut", 36, "第三个问题")).await.unwrap_or_default();
    assert!(passive_content(&body).starts_with("【你上一条消息的回复】\n第一个答案"), "{body}");
}

/// A menu click opens only 3 customer-service messages (not a typed message's 5): a long answer
/// to a menu prompt stops at 3, the last saying that more follows on 「继续」.
#[actix_web::test]
async fn an_answer_to_a_menu_click_keeps_to_its_three_message_quota() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    echo_llm(&llm, Duration::ZERO).await;
    wechat_ok(&wechat).await;
    let config = format!("{}menu.LONG = {{ prompt = \"{}\" }}\n", base_config(&llm, &wechat), "问".repeat(240));
    let env = [("YIZHAN__CHANNELS__MP__MAX_PART_BYTES", "100")];
    let app = spawn_with(&config, &env, ChannelKinds::builtin(), wechat, llm).await;
    let click = format!(
        "<xml><ToUserName>gh_test</ToUserName><FromUserName>oMenu</FromUserName><CreateTime>{}</CreateTime>\
         <MsgType>event</MsgType><Event>CLICK</Event><EventKey>LONG</EventKey></xml>",
        now()
    );
    assert_eq!(app.post_signed(&click).await.0, 200);
    app.wait_until_idle().await;
    let sent = app.sent_messages().await;
    assert_eq!(sent.len(), 3, "three messages after a menu click");
    let last = sent[2]["text"]["content"].as_str().unwrap_or_default();
    assert!(last.ends_with("（回复「继续」查看剩余内容）"), "{last}");
}

/// Two answers too late for every attempt: the second message's last attempt shows the first
/// (parked meanwhile) with the hint, and 继续 brings the second, then says nothing is left.
#[actix_web::test]
async fn the_continue_word_brings_parked_answers_oldest_first_one_at_a_time() {
    let (app, held) = spawn_app_holding_answers(&auto_env("passive"), 2).await;
    // Both answers arrive after every attempt of their own message; when the second message's
    // last attempt has no answer of its own, it shows the first answer, parked meanwhile.
    let (attempt, body) = wechat_delivers(&app, &text_xml("oOrder", 40, "问题一")).await.unwrap_or_default();
    assert_eq!((attempt, body.as_str()), (3, "success"));
    // The first answer comes while the second message is being tried, with the first still open.
    let second = text_xml("oOrder", 41, "问题三");
    let window = Duration::from_millis(WINDOW_MS);
    let (attempt, body) =
        wechat_delivers_with_lapses(&app, &second, window, |_| held.release(1)).await.unwrap_or_default();
    assert_eq!(
        (attempt, passive_content(&body).as_str()),
        (3, "【你上一条消息的回复】\n答：问题一\n（回复「继续」查看剩余内容）")
    );
    held.release(2);
    app.wait_until_idle().await;
    let mut shown = Vec::new();
    for id in [42, 43] {
        let (_, body) = wechat_delivers(&app, &text_xml("oOrder", id, "继续")).await.unwrap_or_default();
        shown.push(passive_content(&body));
    }
    assert_eq!(shown, ["答：问题三", "没有待查看的内容了，请直接提问吧。"]);
}

/// Two answers parked (both later than all of their messages' attempts): the next answer does
/// not overtake the second. The reply shows the first with the hint, and 继续 brings the second,
/// then the new one.
#[actix_web::test]
async fn an_answer_ready_in_time_waits_behind_every_answer_parked_before_it() {
    let (llm, wechat) = (MockServer::start().await, MockServer::start().await);
    let held = late_answers_then_echo(&llm, "慢的答案", 2).await;
    wechat_ok(&wechat).await;
    let mut env = auto_env("passive");
    env.push(held.env_override());
    let app = spawn_with(&base_config(&llm, &wechat), &env, ChannelKinds::builtin(), wechat, llm).await;
    // Sent together: each one's last attempt comes before either answer is parked.
    let (one, two) = (text_xml("oTwo", 70, "问题一"), text_xml("oTwo", 71, "问题二"));
    let (first, second) = tokio::join!(wechat_delivers(&app, &one), wechat_delivers(&app, &two));
    assert_eq!((first.unwrap_or_default().1, second.unwrap_or_default().1), ("success".into(), "success".into()));
    held.release(2);
    app.wait_until_idle().await;

    let hint = "（回复「继续」查看剩余内容）";
    let (_, body) = wechat_delivers(&app, &text_xml("oTwo", 72, "问题三")).await.unwrap_or_default();
    let mut shown = vec![passive_content(&body)];
    assert_eq!(shown[0], format!("【你上一条消息的回复】\n慢的答案\n{hint}"));
    for id in [73, 74, 75] {
        app.wait_until_idle().await;
        let (_, body) = wechat_delivers(&app, &text_xml("oTwo", id, "继续")).await.unwrap_or_default();
        shown.push(passive_content(&body).replace(hint, "").trim().to_owned());
    }
    assert_eq!(shown[1..], ["慢的答案", "答：问题三", "没有待查看的内容了，请直接提问吧。"]);
}

/// WeChat sends a retry only once it gave up on the attempt before; a handler of that attempt
/// can still be waiting (it began late, behind a queue). The answer goes to the retry, the
/// attempt WeChat listens to; the superseded one lapses (answering nothing in time).
#[actix_web::test]
async fn a_retry_takes_the_answer_from_an_attempt_still_waiting() {
    let env = [
        ("YIZHAN__CHANNELS__MP__REPLY_MODE", "auto"),
        ("YIZHAN__CHANNELS__MP__PASSIVE_WINDOW_MS", "5000"),
        ("YIZHAN__CHANNELS__MP__PASSIVE_MARGIN_MS", "300"),
        // One worker: the first attempt's handler counts itself (right after the journal task
        // it waits for) before the retry is read, so that the retry is the second attempt.
        ("YIZHAN__SERVER__WORKERS", "1"),
    ];
    let (app, held) = spawn_app_holding_answers(&env, 1).await;
    let xml = text_xml("oRetry", 90, "重试");
    let url = format!("{}?{}", app.webhook_url(CHANNEL), signed_query(now()));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap_or_else(|e| panic!("{e}"));
    let post = |client: reqwest::Client, url: String, xml: String| async move {
        let response = client.post(url).body(xml).send().await.unwrap_or_else(|e| panic!("{e}"));
        response.text().await.unwrap_or_default()
    };
    let first = actix_web::rt::spawn(post(client.clone(), url.clone(), xml.clone()));
    // Once the first attempt is held, the retry comes in.
    app.wait_for_metric("yizhan_passive_attempts_total{channel=\"mp\"} 1").await;
    let second = actix_web::rt::spawn(post(client, url, xml));
    // The answer, once the retry is held too.
    app.wait_for_metric("yizhan_passive_attempts_total{channel=\"mp\"} 2").await;
    held.release(1);
    let second = second.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(passive_content(&second).contains("答：重试"), "the retry: {second}");
    let first = first.await.unwrap_or_else(|e| panic!("{e}"));
    // It lapsed: nothing in time (an empty answer, past WeChat's window).
    assert_eq!(first, "", "the superseded attempt answered");
    app.wait_until_idle().await;
    assert!(app.sent_messages().await.is_empty(), "answered passively, not pushed");
}
