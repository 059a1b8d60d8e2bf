//! Answer text → what Feishu is sent: a plain `text` message or a markdown card, parts that fit
//! Feishu's size limits, the CardKit streaming card, and idempotency keys.
//!
//! Invariants: [`render_parts`] never returns a part over its byte limit or an empty one, and
//! loses no text; every string Feishu would interpret as an `<at>` tag is defused before it is
//! sent, so a model's answer can never @-mention anyone (least of all `@all`).

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

use yizhan_channel_common::markdown::unbreakable_spans;
use yizhan_channel_common::split::split_text_keeping;

/// Parts sent as messages (not streamed into a card) up to this many characters without
/// markdown go out as plain `text`, which reads like a person typing; longer ones go into a
/// card, which is easier to read.
pub const PLAIN_TEXT_MAX_CHARS: usize = 500;

/// Feishu refuses a card (or rich text) whose *request body* is over 30 KB (error 230025:
/// 卡片及富文本消息请求体最大不能超过30KB). Taken as 30,000 bytes, the smaller reading.
pub const CARD_MAX_BYTES: usize = 30_000;

/// What a send or reply request holds besides the card's content string: `msg_type`, `uuid`,
/// `receive_id` and the JSON around them (about 150 bytes), with room to spare.
const REQUEST_FRAME_BYTES: usize = 512;

/// The size of the request body that carries `content` (a card's JSON string), which escapes
/// it a second time: every quote and line break in the answer counts three or two times.
pub fn request_bytes(content: &str) -> usize {
    serde_json::to_string(content).map_or(usize::MAX, |encoded| encoded.len()).saturating_add(REQUEST_FRAME_BYTES)
}

/// The id of the markdown element the streaming card writes into.
pub const STREAM_ELEMENT_ID: &str = "answer";

/// Room kept in each part for closing and reopening a code fence cut in two.
const FENCE_RESERVE: usize = 32;

/// Feishu's idempotency `uuid` is at most 50 characters.
const MAX_UUID_LEN: usize = 50;

/// A message body as the send and reply APIs take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageBody {
    /// `text` or `interactive`.
    pub msg_type: &'static str,
    /// The JSON-encoded content string.
    pub content: String,
}

/// Whether the text uses markdown the reader would otherwise see as raw syntax.
pub fn has_markdown(text: &str) -> bool {
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    Parser::new_ext(text, options).any(|event| {
        !matches!(
            event,
            Event::Start(Tag::Paragraph)
                | Event::End(TagEnd::Paragraph)
                | Event::Text(_)
                | Event::SoftBreak
                | Event::HardBreak
        )
    })
}

/// Whether `text` should be sent as a card rather than a text message.
pub fn wants_card(text: &str) -> bool {
    text.chars().count() > PLAIN_TEXT_MAX_CHARS || has_markdown(text)
}

/// Inserts a zero-width space into every `<at …>` tag opener, which Feishu would otherwise turn
/// into a real @-mention (in text messages and card markdown alike).
pub fn defuse_mentions(text: &str) -> Cow<'_, str> {
    let is_tag = |at: usize| {
        let rest = &text.as_bytes()[at..];
        rest.len() >= 4
            && rest[1..3].eq_ignore_ascii_case(b"at")
            && (rest[3].is_ascii_whitespace() || rest[3] == b'>' || rest[3] == b'/')
    };
    let hits: Vec<usize> = text.match_indices('<').map(|(at, _)| at).filter(|&at| is_tag(at)).collect();
    if hits.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + hits.len() * 3);
    let mut from = 0;
    for at in hits {
        out.push_str(&text[from..=at]);
        out.push('\u{200B}');
        from = at + 1;
    }
    out.push_str(&text[from..]);
    Cow::Owned(out)
}

/// The content of a card holding one markdown element. Card JSON 2.0, as the streaming card:
/// JSON 1.0's markdown shows headings, quotes, tables and inline code as raw text (Feishu's
/// rich-text component docs), and a long streamed answer's later parts would then look unlike
/// its first. (Clients older than 7.20 show 2.0 cards as an upgrade hint; streaming needs
/// 7.20 anyway.)
pub fn card_content(markdown: &str) -> String {
    json!({
        "schema": "2.0",
        "body": {"elements": [{"tag": "markdown", "content": defuse_mentions(markdown)}]},
    })
    .to_string()
}

/// The content of a plain text message.
pub fn text_content(text: &str) -> String {
    json!({"text": defuse_mentions(text)}).to_string()
}

/// Chooses the message form for one part: a text message for short plain answers, a card
/// otherwise, and a text message again when the card would be over Feishu's 30 KB card limit
/// (text messages may be 150 KB), so a long part is shown unformatted rather than refused.
pub fn message_body(text: &str) -> MessageBody {
    if wants_card(text) {
        let content = card_content(text);
        if request_bytes(&content) <= CARD_MAX_BYTES {
            return MessageBody { msg_type: "interactive", content };
        }
    }
    MessageBody { msg_type: "text", content: text_content(text) }
}

/// What a streaming update sends for `text`, the whole answer so far: the card ends up holding
/// its first part, so at most `max_part_bytes` of it as the model wrote it, with mentions
/// defused; and within [`CARD_MAX_BYTES`] once escaped for the request, measured after defusing
/// (which lengthens each `<at` tag): an update over it would be refused and freeze the card
/// mid-answer. Cut at character boundaries.
pub fn stream_content(text: &str, max_part_bytes: usize) -> String {
    stream_content_and_whether_full(text, max_part_bytes).0
}

/// [`stream_content`], and whether the request limit cut it: a card that full shows the same
/// for every longer text, so later updates would change nothing.
pub fn stream_content_and_whether_full(text: &str, max_part_bytes: usize) -> (String, bool) {
    let mut end = text.len().min(max_part_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let defused = defuse_mentions(&text[..end]);
    let content = within_request_limit(&defused);
    (content.to_owned(), content.len() < defused.len())
}

/// The longest start of `text` within [`CARD_MAX_BYTES`] once escaped for the request (as
/// [`request_bytes`] measures it), in one pass: a start cut shorter than it could be would make
/// the card's text shrink and grow again between updates near the limit.
fn within_request_limit(text: &str) -> &str {
    let mut bytes = request_bytes("");
    for (at, ch) in text.char_indices() {
        bytes += json_escaped_len(ch);
        if bytes > CARD_MAX_BYTES {
            return &text[..at];
        }
    }
    text
}

/// The bytes `ch` takes inside a JSON string as serde_json writes it.
fn json_escaped_len(ch: char) -> usize {
    match ch {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        control if u32::from(control) < 0x20 => 6,
        other => other.len_utf8(),
    }
}

/// The CardKit card (JSON 2.0) an answer streams into: streaming mode on, `update_multi` (which
/// streaming requires), and one markdown element named [`STREAM_ELEMENT_ID`].
pub fn streaming_card(initial: &str) -> String {
    let initial = if initial.trim().is_empty() { "…" } else { initial };
    json!({
        "schema": "2.0",
        "config": {
            "streaming_mode": true,
            "update_multi": true,
            "streaming_config": {
                "print_frequency_ms": {"default": 50},
                "print_step": {"default": 2},
                // Show the rest of the previous text at once when a new update arrives, so the
                // card never lags behind the model.
                "print_strategy": "fast",
            },
        },
        "body": {
            "elements": [
                {"tag": "markdown", "element_id": STREAM_ELEMENT_ID, "content": defuse_mentions(initial)},
            ],
        },
    })
    .to_string()
}

/// The card a streamed answer ends as when its content can no longer be streamed (streaming
/// mode closed, by Feishu after its time limit or by an earlier run's finish): the card
/// [`streaming_card`] makes, holding `text`, with streaming mode off, to replace it whole.
pub fn final_card(text: &str) -> String {
    json!({
        "schema": "2.0",
        "config": {"streaming_mode": false, "update_multi": true},
        "body": {
            "elements": [
                {"tag": "markdown", "element_id": STREAM_ELEMENT_ID, "content": defuse_mentions(text)},
            ],
        },
    })
    .to_string()
}

/// A Feishu idempotency key (`uuid`, at most 50 characters) for `id`: the id itself when it fits
/// and is plain ASCII, otherwise a 40-hex-digit SHA-256 prefix of it (160 bits: no collisions in
/// practice, and stable across retries).
pub fn idempotency_key(id: &str) -> String {
    let plain = id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b':');
    if !id.is_empty() && id.len() <= MAX_UUID_LEN && plain {
        return id.to_owned();
    }
    let digest = hex::encode(Sha256::digest(id.as_bytes()));
    format!("y{}", &digest[..40])
}

/// Splits an answer into parts of at most `max_bytes`, preferring paragraph, line and sentence
/// breaks, keeping code fences balanced in every part, and shrinking any part whose card's
/// request would be over [`CARD_MAX_BYTES`] (JSON escaping, twice, can make it much larger than
/// the text).
pub fn render_parts(text: &str, max_bytes: usize) -> Vec<String> {
    let mut parts = Vec::new();
    for part in split_markdown(text, max_bytes) {
        fit_card(part, 4, &mut parts);
    }
    parts
}

/// Splits `part` again until its card fits, at most `depth` times.
fn fit_card(part: String, depth: u32, out: &mut Vec<String>) {
    let size = if wants_card(&part) { request_bytes(&card_content(&part)) } else { 0 };
    if size <= CARD_MAX_BYTES || depth == 0 || part.len() <= 64 {
        out.push(part);
        return;
    }
    // Scale the text down by how much its card is over, with some slack for the card frame.
    let target = (part.len() * CARD_MAX_BYTES / size).saturating_sub(256).max(64);
    for smaller in split_markdown(&part, target) {
        fit_card(smaller, depth - 1, out);
    }
}

/// An open code fence: its marker (```` ``` ```` or `~~~`, possibly longer) and info string.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fence {
    marker: String,
    info: String,
}

impl Fence {
    /// The line that reopens this fence in the next part. The info string (language) is kept
    /// only when short, so the reserve always suffices.
    fn reopen(&self) -> String {
        if self.info.len() <= 12 {
            format!("{}{}", self.marker, self.info)
        } else {
            self.marker.clone()
        }
    }
}

/// Reads `text` line by line and returns the fence still open at its end, starting from `open`.
fn fence_state(text: &str, mut open: Option<Fence>) -> Option<Fence> {
    for line in text.lines() {
        let trimmed = line.trim_start();
        let Some(ch) = trimmed.chars().next().filter(|ch| *ch == '`' || *ch == '~') else { continue };
        let run = trimmed.chars().take_while(|c| *c == ch).count();
        if run < 3 {
            continue;
        }
        let rest = trimmed[run..].trim();
        match &open {
            Some(fence) => {
                let closes = fence.marker.starts_with(ch) && run >= fence.marker.len() && rest.is_empty();
                if closes {
                    open = None;
                }
            }
            None => {
                // A backtick fence's info string may not contain backticks (CommonMark).
                if ch == '`' && rest.contains('`') {
                    continue;
                }
                let info = rest.split_whitespace().next().unwrap_or_default().to_owned();
                open = Some(Fence { marker: trimmed[..run].to_owned(), info });
            }
        }
    }
    open
}

/// [`split_text`](yizhan_channel_common::split_text) with code fences repaired: a part that ends inside a fence gets it closed, and
/// the next part reopens it, so both render as code. A repair that would overflow `max_bytes`
/// (only with absurd fence markers) is skipped for that part. No cut falls inside a link, inline
/// code or a URL that fits a part (see [`unbreakable_spans`]).
fn split_markdown(text: &str, max_bytes: usize) -> Vec<String> {
    let budget = max_bytes.saturating_sub(FENCE_RESERVE).max(max_bytes / 2).max(4);
    let mut parts = Vec::new();
    let mut open: Option<Fence> = None;
    for raw in split_text_keeping(text, budget, unbreakable_spans) {
        let starts_in = open.clone();
        open = fence_state(&raw, open);
        let mut part = String::with_capacity(raw.len() + FENCE_RESERVE);
        if let Some(fence) = &starts_in {
            part.push_str(&fence.reopen());
            part.push('\n');
        }
        part.push_str(&raw);
        if let Some(fence) = &open {
            part.push('\n');
            part.push_str(&fence.marker);
        }
        parts.push(if part.len() <= max_bytes { part } else { raw });
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A first part full of mentions is streamed whole: the byte limit is the part's, measured
    /// before defusing lengthens it.
    #[test]
    fn a_first_part_full_of_mentions_streams_whole() {
        let text = "<at x> ".repeat(40);
        for part in render_parts(&text, 200) {
            assert_eq!(stream_content(&part, 200), defuse_mentions(&part), "{part}");
        }
    }

    #[test]
    fn plain_short_answers_are_text_and_markdown_is_a_card() {
        assert!(!has_markdown("你好！今天天气不错。1 + 1 = 2, a * b"));
        assert!(has_markdown("**重点**"));
        assert!(has_markdown("# 标题"));
        assert!(has_markdown("- a\n- b"));
        assert!(has_markdown("`code`"));
        assert!(has_markdown("[x](https://x.y)"));
        assert_eq!(message_body("你好").msg_type, "text");
        assert_eq!(message_body("你好").content, r#"{"text":"你好"}"#);
        assert_eq!(message_body("**你好**").msg_type, "interactive");
        assert_eq!(message_body(&"长".repeat(501)).msg_type, "interactive");
    }

    #[test]
    fn the_card_is_json_2_and_holds_one_markdown_element() {
        let card: serde_json::Value = serde_json::from_str(&card_content("## a")).unwrap_or_default();
        assert_eq!(card["schema"], "2.0");
        assert_eq!(card["body"]["elements"], serde_json::json!([{"tag": "markdown", "content": "## a"}]));
        assert!(card.get("elements").is_none() && card.get("config").is_none(), "{card}");
    }

    #[test]
    fn a_card_over_the_limit_falls_back_to_text() {
        let text = format!("**x**\n{}", "\"\n".repeat(CARD_MAX_BYTES / 2));
        assert_eq!(message_body(&text).msg_type, "text");
    }

    #[test]
    fn at_tags_from_the_model_are_defused() {
        let text = r#"hi <at user_id="all"></at> and <AT id=all></AT> but <atom> and a<b"#;
        let safe = defuse_mentions(text);
        assert!(!safe.contains("<at ") && !safe.contains("<AT "), "{safe}");
        assert!(safe.contains("<atom>") && safe.contains("a<b"));
        assert!(matches!(defuse_mentions("no tags <b>"), Cow::Borrowed(_)));
        assert!(!text_content(r#"<at user_id="all">"#).contains("<at "));
        assert!(!card_content(r#"<at id=all>"#).contains("<at "));
    }

    #[test]
    fn idempotency_keys_fit_feishus_fifty_characters_and_are_stable() {
        assert_eq!(idempotency_key("d-123"), "d-123");
        let long = "x".repeat(80);
        let key = idempotency_key(&long);
        assert_eq!(key.len(), 41);
        assert_eq!(key, idempotency_key(&long));
        assert_ne!(key, idempotency_key(&"x".repeat(81)));
        assert_ne!(idempotency_key("a/b"), "a/b");
    }

    #[test]
    fn the_streaming_card_is_json_2_in_streaming_mode() {
        let card: serde_json::Value = serde_json::from_str(&streaming_card("")).unwrap_or_default();
        assert_eq!(card["schema"], "2.0");
        assert_eq!(card["config"]["streaming_mode"], true);
        assert_eq!(card["config"]["update_multi"], true);
        assert_eq!(card["body"]["elements"][0]["element_id"], STREAM_ELEMENT_ID);
        assert_eq!(card["body"]["elements"][0]["content"], "…");
    }

    #[test]
    fn a_code_block_cut_in_two_is_closed_and_reopened() {
        let code: String = (0..40).map(|i| format!("let x{i} = {i};\n")).collect();
        let text = format!("Intro.\n\n```rust\n{code}```\n\nOutro.");
        let parts = render_parts(&text, 200);
        assert!(parts.len() > 2, "{parts:#?}");
        for part in &parts {
            assert!(part.len() <= 200, "{} bytes", part.len());
            assert_eq!(fence_state(part, None), None, "unbalanced fence in {part:?}");
        }
        assert!(parts[1].starts_with("```rust\n"), "{:?}", parts[1]);
    }

    #[test]
    fn long_answers_with_many_escapes_are_split_until_each_card_fits() {
        let text = "**title**\n".to_owned() + &"\"q\"\n".repeat(9_000);
        let parts = render_parts(&text, 30_000);
        assert!(parts.len() >= 2);
        for part in &parts {
            assert!(part.len() <= 30_000);
            let body = message_body(part);
            assert_eq!(body.msg_type, "interactive");
            assert!(request_bytes(&body.content) <= CARD_MAX_BYTES);
        }
    }

    #[test]
    fn a_streamed_update_keeps_the_longest_start_that_fits_the_request() {
        for unit in ["长", "\"引号\"\n", "a\u{1}\\b\t", "😀"] {
            let text = unit.repeat(CARD_MAX_BYTES);
            let kept = within_request_limit(&text);
            assert!(request_bytes(kept) <= CARD_MAX_BYTES, "{unit:?}");
            let next = text[kept.len()..].chars().next().map_or(0, char::len_utf8);
            assert!(request_bytes(&text[..kept.len() + next]) > CARD_MAX_BYTES, "{unit:?}: cut short");
        }
        assert_eq!(within_request_limit("短"), "短");
    }

    #[test]
    fn a_full_part_of_code_fits_its_card_request_not_only_its_card() {
        // About 29 KB of code with a quote or two per line: its card alone is under 30 KB, but
        // the request that carries it escapes every quote and line break again.
        let code = "    println!(\"{}\", \"value\");\n".repeat(900);
        let text = format!("```rust\n{code}```");
        for part in render_parts(&text, 30_000) {
            let body = message_body(&part);
            let request = serde_json::json!({"receive_id": "oc_x", "msg_type": body.msg_type, "content": body.content,
                "uuid": "y0123456789012345678901234567890123456789"});
            assert!(request.to_string().len() <= CARD_MAX_BYTES, "{} bytes", request.to_string().len());
        }
    }
}
