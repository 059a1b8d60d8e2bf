//! LLM markdown → what a chat bubble can show: plain text, or the basic markdown subset some
//! platforms render.
//!
//! LLMs answer in markdown; in a bubble that renders none (WeChat, WeCom `text`), `**bold**`,
//! `## Title` and code fences are noise. [`to_plain_text`] keeps every word and all code, drops
//! the markup, and keeps the structure plain text can carry: paragraphs (blank lines), list
//! items (`• ` / `1. `), links as `text (url)`, table cells separated by ` | `.
//!
//! [`Markup::Basic`] is the subset WeCom's `markdown` messages render (doc path/90236): headings
//! `#`–`######`, bold `**…**`, links `[text](url)`, single-line inline code and quotes `>`.
//! Everything else (italics, strike-through, code fences, tables, images, lists) would show as
//! raw markup, so it degrades to text the way plain text does; code blocks become one inline code
//! per line, images a link to the picture.
//!
//! Invariants: rendering never fails or panics; every word and all code survive (images keep
//! their alt text and URL); runs of blank lines collapse to one; raw HTML is kept as text except
//! `<br>` (a newline) and the tags a [`Style`] drops.

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

/// Converts markdown to plain text ([`Style::PLAIN`]). Never fails: anything the parser does not
/// understand is kept as text.
pub fn to_plain_text(markdown: &str) -> String {
    render(markdown, Style::PLAIN)
}

/// Converts markdown to the text `style` asks for. Never fails.
pub fn render(markdown: &str, style: Style) -> String {
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let mut writer = Writer { style, ..Writer::default() };
    for event in Parser::new_ext(markdown, options) {
        writer.event(event);
    }
    writer.finish()
}

/// Which markup survives rendering.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Markup {
    /// No markup at all: for platforms that show message text verbatim.
    #[default]
    Plain,
    /// Headings, bold, links, single-line inline code and quotes (WeCom's `markdown` subset);
    /// the rest degrades to text.
    Basic,
}

/// How to render: which markup survives and which raw HTML tags are dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// The markup kept.
    pub markup: Markup,
    /// Raw HTML tags (lower-case names, e.g. `font`) removed, opening and closing, with their
    /// text kept: markup of one platform that would be noise in another's output. Every other
    /// tag is kept as text, so nothing the model wrote is lost.
    pub dropped_tags: &'static [&'static str],
}

impl Style {
    /// Plain text, raw HTML kept as text.
    pub const PLAIN: Style = Style { markup: Markup::Plain, dropped_tags: &[] };
    /// The basic markdown subset, raw HTML kept.
    pub const BASIC: Style = Style { markup: Markup::Basic, dropped_tags: &[] };

    /// Whether `tag` (trimmed, lower-cased raw HTML) opens or closes a dropped tag.
    fn drops(&self, tag: &str) -> bool {
        self.dropped_tags.iter().any(|name| {
            tag.strip_prefix('<').is_some_and(|rest| rest.starts_with(name))
                || tag.strip_prefix("</").and_then(|rest| rest.strip_suffix('>')) == Some(name)
        })
    }
}

/// Streams parser events into text.
#[derive(Default)]
struct Writer {
    style: Style,
    out: String,
    /// Consecutive text events, joined before stray `**` are removed (the parser may split a
    /// delimiter run it did not match across events).
    pending: String,
    /// One entry per open list: the next number for ordered lists, `None` for bullets.
    lists: Vec<Option<u64>>,
    /// Open links and images: destination and where their text starts in `out`.
    links: Vec<(String, usize)>,
    /// Open block quotes (basic markup): where each starts in `out`; its lines get `> `
    /// when it closes.
    quotes: Vec<usize>,
    /// Inside a fenced or indented code block, text is copied untouched.
    in_code_block: bool,
    /// The current code block's text (basic markup), written line by line when it closes.
    code: String,
    /// Cells written in the current table row.
    cells_in_row: usize,
}

impl Writer {
    fn markdown(&self) -> bool {
        self.style.markup == Markup::Basic
    }

    fn event(&mut self, event: Event<'_>) {
        if let Event::Text(text) = &event {
            if !self.in_code_block {
                self.pending.push_str(text);
                return;
            }
            if self.markdown() {
                self.code.push_str(text);
                return;
            }
        }
        self.flush_text();
        match event {
            Event::Start(tag) => self.start(tag),
            Event::End(tag) => self.end(tag),
            Event::Code(code) if self.markdown() => self.inline_code(&code),
            Event::Text(text) | Event::Code(text) => self.out.push_str(&text),
            Event::InlineMath(text) | Event::DisplayMath(text) => self.out.push_str(&text),
            Event::Html(html) | Event::InlineHtml(html) => self.html(&html),
            Event::FootnoteReference(name) => {
                self.out.push('[');
                self.out.push_str(&name);
                self.out.push(']');
            }
            Event::SoftBreak | Event::HardBreak => self.out.push('\n'),
            Event::Rule => {
                self.block_break();
                self.out.push_str("——————");
                self.block_break();
            }
            Event::TaskListMarker(done) => self.out.push_str(if done { "☑ " } else { "☐ " }),
        }
    }

    fn start(&mut self, tag: Tag<'_>) {
        match tag {
            Tag::Heading { level, .. } => {
                if self.lists.is_empty() {
                    self.block_break();
                }
                if self.markdown() {
                    // NOTE: `HeadingLevel` discriminants are 1..=6.
                    self.out.push_str(&"#".repeat(level as usize));
                    self.out.push(' ');
                }
            }
            Tag::BlockQuote(_) => {
                if self.lists.is_empty() {
                    self.block_break();
                }
                if self.markdown() {
                    self.quotes.push(self.out.len());
                }
            }
            Tag::Paragraph | Tag::HtmlBlock => {
                if self.lists.is_empty() {
                    self.block_break();
                }
            }
            Tag::CodeBlock(_) => {
                self.block_break();
                self.in_code_block = true;
                self.code.clear();
            }
            Tag::List(first) => {
                if self.lists.is_empty() {
                    self.block_break();
                } else {
                    self.line_break();
                }
                self.lists.push(first);
            }
            Tag::Item => {
                self.line_break();
                // Capped: `- - - x` nests a list per dash, and an indent per level would make
                // the output quadratic in what the model wrote.
                let depth = self.lists.len().saturating_sub(1).min(MAX_LIST_INDENT);
                self.out.push_str(&"  ".repeat(depth));
                match self.lists.last_mut() {
                    Some(Some(number)) => {
                        self.out.push_str(&format!("{number}. "));
                        *number = number.saturating_add(1);
                    }
                    _ => self.out.push_str("• "),
                }
            }
            Tag::Table(_) => self.block_break(),
            Tag::TableHead | Tag::TableRow => self.cells_in_row = 0,
            Tag::TableCell => {
                if self.cells_in_row > 0 {
                    self.out.push_str(" | ");
                }
                self.cells_in_row += 1;
            }
            Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. } => {
                self.links.push((dest_url.into_string(), self.out.len()));
            }
            Tag::Strong if self.markdown() => self.out.push_str("**"),
            Tag::FootnoteDefinition(_)
            | Tag::DefinitionList
            | Tag::DefinitionListTitle
            | Tag::DefinitionListDefinition => self.line_break(),
            Tag::Emphasis
            | Tag::Strong
            | Tag::Strikethrough
            | Tag::Superscript
            | Tag::Subscript
            | Tag::MetadataBlock(_) => {}
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Paragraph | TagEnd::Heading(_) | TagEnd::HtmlBlock => self.end_block(),
            TagEnd::BlockQuote(_) => {
                if self.markdown() {
                    self.close_quote();
                }
                self.end_block();
            }
            TagEnd::CodeBlock => {
                self.in_code_block = false;
                if self.markdown() {
                    self.write_code_block();
                }
                self.block_break();
            }
            TagEnd::List(_) => {
                self.lists.pop();
                if self.lists.is_empty() {
                    self.block_break();
                } else {
                    self.line_break();
                }
            }
            TagEnd::Item | TagEnd::TableHead | TagEnd::TableRow => self.line_break(),
            TagEnd::Table => self.block_break(),
            TagEnd::Link | TagEnd::Image => self.close_link(),
            TagEnd::Strong if self.markdown() => self.close_strong(),
            TagEnd::FootnoteDefinition
            | TagEnd::DefinitionList
            | TagEnd::DefinitionListTitle
            | TagEnd::DefinitionListDefinition => self.line_break(),
            TagEnd::TableCell
            | TagEnd::Emphasis
            | TagEnd::Strong
            | TagEnd::Strikethrough
            | TagEnd::Superscript
            | TagEnd::Subscript
            | TagEnd::MetadataBlock(_) => {}
        }
    }

    fn end_block(&mut self) {
        if self.lists.is_empty() {
            self.block_break();
        } else {
            self.line_break();
        }
    }

    /// Closes `**`, or removes the opening `**` when the bold text turned out empty (`****`
    /// would show as four asterisks).
    fn close_strong(&mut self) {
        if self.out.ends_with("**") {
            self.out.truncate(self.out.len() - 2);
        } else {
            self.out.push_str("**");
        }
    }

    /// Single-line code in backticks; code the subset could not delimit (it contains a backtick or a
    /// line break) is written as is.
    fn inline_code(&mut self, code: &str) {
        if code.is_empty() || code.contains(['`', '\n']) {
            self.out.push_str(code);
        } else {
            self.out.push('`');
            self.out.push_str(code);
            self.out.push('`');
        }
    }

    /// The basic subset has no code blocks and its inline code cannot span lines, so every line of a block
    /// becomes inline code of its own: the code stays verbatim and visibly code.
    fn write_code_block(&mut self) {
        let code = std::mem::take(&mut self.code);
        let lines: Vec<&str> = code.trim_end_matches(['\n', '\r']).lines().collect();
        for (index, line) in lines.iter().enumerate() {
            if index > 0 {
                self.out.push('\n');
            }
            if line.trim().is_empty() {
                continue;
            }
            self.inline_code(line);
        }
    }

    /// Prefixes every line written since the quote opened with `> ` (`>` for blank lines).
    fn close_quote(&mut self) {
        let Some(start) = self.quotes.pop() else { return };
        // Only the outermost quote prefixes its lines: a nested one would copy and prefix the
        // same text again at each level, quadratic in a nesting the model's output controls.
        if !self.quotes.is_empty() {
            return;
        }
        if !self.out.is_char_boundary(start) {
            return;
        }
        let quoted = self.out.get(start..).unwrap_or_default().trim().to_owned();
        self.out.truncate(start);
        let prefixed: Vec<String> = quoted
            .lines()
            .map(|line| if line.trim().is_empty() { ">".to_owned() } else { format!("> {line}") })
            .collect();
        self.out.push_str(&prefixed.join("\n"));
    }

    /// Finishes a link or image. Plain text: ` (url)` after the text, unless the text already is
    /// the URL (autolinks) or the URL points inside the document. Markdown: `[text](url)`;
    /// images, which the basic subset cannot show inline, become a link to the picture.
    fn close_link(&mut self) {
        let Some((url, start)) = self.links.pop() else { return };
        if url.is_empty() || url.starts_with('#') {
            return;
        }
        let text = self.out.get(start..).unwrap_or_default().trim().to_owned();
        if text.is_empty() {
            self.out.push_str(&url);
            return;
        }
        if self.markdown() {
            // NOTE: `start` is a char boundary: it was `out.len()` when the link opened.
            if self.out.is_char_boundary(start) {
                self.out.insert(start, '[');
                self.out.push_str(&format!("]({url})"));
            }
            return;
        }
        let bare = url.strip_prefix("mailto:").unwrap_or(&url);
        if text != url && text != bare {
            self.out.push_str(&format!(" ({url})"));
        }
    }

    /// Raw HTML is kept as text (nothing is lost), except line breaks, which become newlines,
    /// and the tags the style drops.
    fn html(&mut self, html: &str) {
        let tag = html.trim().to_ascii_lowercase();
        if matches!(tag.as_str(), "<br>" | "<br/>" | "<br />") {
            self.out.push('\n');
        } else if self.style.drops(&tag) {
            // Markup of another kind of message (WeCom's `<font color>` in a text message).
        } else {
            self.out.push_str(html);
        }
    }

    fn flush_text(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // Emphasis the parser could not match (CommonMark's flanking rules often fail around
        // CJK punctuation, e.g. `**“引用”**后`) would otherwise show up as literal `**`.
        let text = without_unmatched_strong(&self.pending);
        self.out.push_str(&text);
        self.pending.clear();
    }

    /// Ends the current line, if any.
    fn line_break(&mut self) {
        if !self.out.is_empty() && !self.out.ends_with('\n') {
            self.out.push('\n');
        }
    }

    /// Leaves exactly one blank line after what was written, if anything was.
    fn block_break(&mut self) {
        if self.out.is_empty() {
            return;
        }
        while self.out.ends_with(' ') {
            self.out.pop();
        }
        if !self.out.ends_with('\n') {
            self.out.push('\n');
        }
        if !self.out.ends_with("\n\n") {
            self.out.push('\n');
        }
    }

    fn finish(mut self) -> String {
        self.flush_text();
        if self.in_code_block && self.markdown() {
            // An unterminated fence still ends at the end of the input; keep its code.
            self.write_code_block();
        }
        let mut text = String::with_capacity(self.out.len());
        let mut newlines = 0;
        // Not `trim`: a code block that opens the answer keeps its first line's indentation.
        for ch in self.out.trim_start_matches(['\n', '\r']).trim_end().chars() {
            if ch == '\n' {
                newlines += 1;
                if newlines > 2 {
                    continue;
                }
            } else {
                newlines = 0;
            }
            text.push(ch);
        }
        text
    }
}

/// Splits markdown into parts of at most `max_bytes` (see [`split_text`](crate::split_text))
/// keeping `**` bold balanced: where a cut falls inside a bold run (a paragraph longer than a
/// part), the part is closed there and the next reopens it, instead of both showing a stray
/// `**`. Only when the text's own `**` pair up (a literal one, `2**10`, leaves it as split) and
/// every part's backticks do (a lone one would make the count of the part after it wrong). A
/// `**` inside inline code does not count.
pub fn split_keeping_strong(text: &str, max_bytes: usize) -> Vec<String> {
    let parts = crate::split::split_text_keeping(text, max_bytes, unbreakable_spans);
    let cut_inside_bold = parts.len() > 1
        && strong_markers(text).is_multiple_of(2)
        && parts.iter().any(|part| strong_markers(part) % 2 == 1);
    if !cut_inside_bold {
        return parts;
    }
    // Room for a `**` at either end.
    let narrower = crate::split::split_text_keeping(text, max_bytes.saturating_sub(4), unbreakable_spans);
    if narrower.iter().any(|part| part.matches('`').count() % 2 == 1) {
        return parts;
    }
    let mut open = false;
    narrower
        .into_iter()
        .map(|part| {
            let mut part = match (open, part.strip_prefix("**")) {
                // The cut fell just before the closing `**`, which the previous part got: the
                // marker goes rather than doubling into `****`.
                (true, Some(rest)) => rest.to_owned(),
                (true, None) => format!("**{part}"),
                (false, _) => part,
            };
            open = strong_markers(&part) % 2 == 1;
            if open {
                part.push_str("**");
            }
            part
        })
        // A part that was only the closing marker, given to the part before it.
        .filter(|part| !part.trim().is_empty())
        .collect()
}

/// The byte ranges of `text` a cut must not fall inside: links and images (`[text](url)`,
/// `![alt](url)`, on one line), inline code (a backtick run to the next run of the same length,
/// within the paragraph) and bare URLs (`http://` or `https://` up to whitespace or a non-ASCII
/// character). Cut, each would show as raw markup, or a dead link, in both parts. A code fence
/// is no span. Linear in the text's length, so that no input makes it slow.
pub fn unbreakable_spans(text: &str) -> Vec<std::ops::Range<usize>> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    // The last `[` of the line, and the backtick run that opened inline code (start, length).
    let (mut bracket, mut code): (Option<usize>, Option<(usize, usize)>) = (None, None);
    // The next `)` or line break at or after some offset, found once (each byte is looked at
    // once however many `](` a line holds); `bytes.len()` when there is none.
    let mut stop: Option<usize> = None;
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            // A code fence (three or more backticks opening a line): its lines may be cut
            // between (Feishu repairs the fence), so it is no span.
            b'`' if (at == 0 || bytes[at - 1] == b'\n') && bytes[at..].starts_with(b"```") => {
                at += bytes[at..].iter().take_while(|byte| **byte == b'`').count();
                continue;
            }
            b'`' => {
                let run = bytes[at..].iter().take_while(|byte| **byte == b'`').count();
                match code {
                    Some((start, length)) if length == run => {
                        spans.push(start..at + run);
                        code = None;
                    }
                    Some(_) => {}
                    None => code = Some((at, run)),
                }
                at += run;
                continue;
            }
            b'\n' => {
                bracket = None;
                if bytes.get(at + 1) == Some(&b'\n') {
                    code = None;
                }
            }
            _ if code.is_some() => {}
            b'[' => bracket = Some(at),
            b']' if bracket.is_some() && bytes.get(at + 1) == Some(&b'(') => {
                let from = at + 2;
                let end = match stop.filter(|found| *found >= from) {
                    Some(found) => found,
                    None => {
                        let found = bytes[from..]
                            .iter()
                            .position(|byte| matches!(byte, b')' | b'\n'))
                            .map_or(bytes.len(), |length| from + length);
                        stop = Some(found);
                        found
                    }
                };
                if let (Some(open), Some(b')')) = (bracket, bytes.get(end)) {
                    // An image's `!` goes with it.
                    let start = if open > 0 && bytes[open - 1] == b'!' { open - 1 } else { open };
                    spans.push(start..end + 1);
                    bracket = None;
                    at = end + 1;
                    continue;
                }
            }
            // Not inside a link's text (the link is the span).
            b'h' if bracket.is_none() && (text[at..].starts_with("https://") || text[at..].starts_with("http://")) => {
                let length = text[at..]
                    .find(|ch: char| ch.is_whitespace() || !ch.is_ascii() || matches!(ch, '<' | '>' | '"' | ']'))
                    .unwrap_or(text.len() - at);
                spans.push(at..at + length);
                at += length;
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    spans
}

/// The `**` in `text` outside inline code (backtick spans).
fn strong_markers(text: &str) -> usize {
    let mut count = 0;
    let mut in_code = false;
    let mut rest = text;
    while let Some(ch) = rest.chars().next() {
        if ch == '`' {
            in_code = !in_code;
        } else if !in_code && rest.starts_with("**") {
            count += 1;
            rest = &rest[2..];
            continue;
        }
        rest = &rest[ch.len_utf8()..];
    }
    count
}

/// The deepest list nesting shown by indentation; deeper items stay at this indent.
const MAX_LIST_INDENT: usize = 8;

/// `text` without the `**` the parser left unmatched: those touching a non-ASCII character
/// (CJK text or punctuation, where CommonMark's flanking rules fail, as in `**“引用”**后`),
/// taken as pairs. When they are odd in number, the one missing is the opener of a pair whose
/// closer touches CJK (`- **Docker：**容器`): the `**` just before the first of them. Any other
/// `**` is text (`2**10`, `f(**kwargs)`) and stays.
fn without_unmatched_strong(text: &str) -> String {
    let positions: Vec<usize> = text.match_indices("**").map(|(at, _)| at).collect();
    let mut drop: Vec<bool> = positions
        .iter()
        .map(|&at| {
            let before = text[..at].chars().next_back();
            let after = text[at + 2..].chars().next();
            before.is_some_and(|ch| !ch.is_ascii()) || after.is_some_and(|ch| !ch.is_ascii())
        })
        .collect();
    if drop.iter().filter(|dropped| **dropped).count() % 2 == 1 {
        if let Some(first) = drop.iter().position(|dropped| *dropped).filter(|first| *first > 0) {
            drop[first - 1] = true;
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    for (&at, _) in positions.iter().zip(&drop).filter(|(_, dropped)| **dropped) {
        out.push_str(&text[rest..at]);
        rest = at + 2;
    }
    out.push_str(&text[rest..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(markdown: &str) -> String {
        render(markdown, Style::BASIC)
    }

    #[test]
    fn links_images_inline_code_and_urls_are_found_as_unbreakable() {
        let text =
            "见 [文档](https://a.example/x) 与 ![图](p.png)，用 `a [b](c)` 或 ``x`y``，再看 https://b.example/路径 完";
        let spans: Vec<&str> = unbreakable_spans(text).into_iter().map(|span| &text[span]).collect();
        assert_eq!(
            spans,
            ["[文档](https://a.example/x)", "![图](p.png)", "`a [b](c)`", "``x`y``", "https://b.example/"]
        );
        // Unclosed ones, and a link across lines, are not spans.
        assert!(unbreakable_spans("[a](b\nc) `open\n\nx`").is_empty());
        // A URL as a link's text: the link is the span.
        let linked = "看 [https://a.example](https://a.example) 吧";
        let spans: Vec<&str> = unbreakable_spans(linked).into_iter().map(|span| &linked[span]).collect();
        assert_eq!(spans, ["[https://a.example](https://a.example)"]);
        // A code fence is no span: its lines may be cut between.
        assert!(unbreakable_spans("```json\n{\"a\": 1}\n```\n").is_empty());
    }

    /// A fenced block longer than a part is still cut at its line breaks, not mid-line.
    #[test]
    fn a_long_code_block_is_cut_between_its_lines() {
        let block = format!("```\n{}```", "let value = compute(42);\n".repeat(20));
        for part in split_keeping_strong(&block, 200) {
            assert!(part.ends_with(';') || part.ends_with("```"), "cut mid-line: {part:?}");
        }
    }

    /// WeCom markdown: a cut that would fall inside a link moves before it, so the link stays
    /// clickable in one part instead of raw brackets in two.
    #[test]
    fn a_part_is_not_cut_inside_a_link() {
        let link = "[Rust 程序设计语言](https://doc.rust-lang.org/book/)";
        for filler in 20..40 {
            let text = format!("{} {link} 之后的文字。", "字".repeat(filler));
            let parts = split_keeping_strong(&text, 96);
            assert!(parts.len() > 1 && parts.iter().all(|part| part.len() <= 96), "{parts:?}");
            assert!(parts.iter().any(|part| part.contains(link)), "link cut: {parts:?}");
        }
    }

    /// Markup-heavy input is scanned in one pass per part: no input makes splitting slow.
    #[test]
    fn splitting_text_full_of_brackets_and_backticks_finishes() {
        let text = "[`](".repeat(25_000) + &"](".repeat(25_000) + &format!("[{}", "](".repeat(25_000));
        let parts = split_keeping_strong(&text, 2048);
        assert_eq!(parts.concat().len(), text.len());
    }

    #[test]
    fn bold_cut_across_parts_is_closed_and_reopened() {
        let text = format!("**{}**，完。`a**b`", "重点 ".repeat(20).trim_end());
        let parts = split_keeping_strong(&text, 64);
        assert!(parts.len() > 2, "{parts:?}");
        for part in &parts {
            assert!(part.len() <= 64, "{part}");
            assert_eq!(strong_markers(part) % 2, 0, "{part}");
        }
        let squash = |s: &str| s.replace("**", "").chars().filter(|c| !c.is_whitespace()).collect::<String>();
        assert_eq!(squash(&parts.concat()), squash(&text));
    }

    /// A cut just before the closing `**` (after a sentence end, as Chinese bold often is)
    /// closes the bold in its part and drops the marker from the next, not `****`.
    #[test]
    fn a_cut_just_before_the_closing_double_star_does_not_double_it() {
        let text = format!("**{}**{}", "重点句子。".repeat(3), "后文".repeat(5) + "。");
        let parts = split_keeping_strong(&text, 64);
        assert_eq!(parts, [format!("**{}**", "重点句子。".repeat(3)), "后文".repeat(5) + "。"]);
        for part in &parts {
            assert!(!part.contains("****") && part.len() <= 64, "{part}");
            assert_eq!(strong_markers(part) % 2, 0, "{part}");
        }
        // Cut so that the last part would be the closing marker alone: no empty part.
        let whole = format!("**{}**", "好。".repeat(19));
        let parts = split_keeping_strong(&whole, 64);
        assert!(parts.len() == 2 && parts.iter().all(|part| !part.trim().is_empty()), "{parts:?}");
        // A lone backtick in a part would make the next part's count wrong: left as split.
        let ticked = format!("it`s **{}**", "重点 ".repeat(20).trim_end());
        assert_eq!(split_keeping_strong(&ticked, 64), crate::split_text(&ticked, 64));
    }

    /// A literal `**` (not bold) or a text that fits leaves the split as it is.
    #[test]
    fn a_literal_double_star_or_a_text_that_fits_is_not_balanced() {
        assert_eq!(split_keeping_strong("计算 2**10 的值", 64), ["计算 2**10 的值"]);
        let long = format!("计算 2**10 的值。{}", "很长的说明。".repeat(20));
        assert_eq!(split_keeping_strong(&long, 64), crate::split_text(&long, 64));
        let exact = "a".repeat(64);
        assert_eq!(split_keeping_strong(&exact, 64), [exact]);
    }

    /// Nesting a model's output controls must not make the output (or the work) quadratic.
    #[test]
    fn deep_lists_and_quotes_stay_linear() {
        // About 20 bytes a level (a line, the capped indent, a bullet); quadratic was 50 MB.
        let list = "- ".repeat(5_000) + "x";
        assert!(to_plain_text(&list).len() < 200_000);
        assert!(basic(&list).len() < 200_000);
        let quotes = ">".repeat(2_000) + " x\n" + &"y\n".repeat(2_000);
        let quoted = basic(&quotes);
        assert!(quoted.len() < 64_000, "{} bytes", quoted.len());
        assert!(quoted.starts_with("> x"), "{}", &quoted[..40.min(quoted.len())]);
        assert_eq!(basic("> a\n> > b\n> c"), "> a\n>\n> b\n> c");
    }

    #[test]
    fn plain_emphasis_and_heading_markers_disappear() {
        let text = to_plain_text("## 标题\n\n这是**重点**和*斜体*，还有~~删除~~。");
        assert_eq!(text, "标题\n\n这是重点和斜体，还有删除。");
    }

    #[test]
    fn plain_code_fences_go_but_the_code_stays_verbatim() {
        let text = to_plain_text(
            "看代码：\n\n```rust\nfn main() {\n    println!(\"**hi**\");\n}\n```\n\n用 `cargo run` 运行。",
        );
        assert_eq!(text, "看代码：\n\nfn main() {\n    println!(\"**hi**\");\n}\n\n用 cargo run 运行。");
        assert!(!text.contains('`'));
    }

    #[test]
    fn plain_links_show_their_url_after_the_text() {
        assert_eq!(to_plain_text("见[文档](https://example.com/a)。"), "见文档 (https://example.com/a)。");
        assert_eq!(to_plain_text("<https://example.com>"), "https://example.com");
        assert_eq!(to_plain_text("![图](https://example.com/p.png)"), "图 (https://example.com/p.png)");
    }

    #[test]
    fn plain_lists_become_bullets_and_numbers() {
        let text = to_plain_text("步骤：\n\n1. 第一\n2. 第二\n   - 子项\n\n- 甲\n- 乙");
        assert_eq!(text, "步骤：\n\n1. 第一\n2. 第二\n  • 子项\n\n• 甲\n• 乙");
    }

    #[test]
    fn plain_ordered_lists_keep_their_start_number() {
        assert_eq!(to_plain_text("3. c\n4. d"), "3. c\n4. d");
    }

    #[test]
    fn plain_paragraphs_and_line_breaks_are_kept() {
        assert_eq!(to_plain_text("第一行\n第二行\n\n\n\n第二段"), "第一行\n第二行\n\n第二段");
    }

    #[test]
    fn plain_tables_become_pipe_separated_lines() {
        assert_eq!(to_plain_text("| a | b |\n|---|---|\n| 1 | 2 |"), "a | b\n1 | 2");
    }

    #[test]
    fn plain_text_keeps_raw_html_unless_the_style_drops_the_tag() {
        let markdown = "<font color=\"info\">好</font>\n\n```\nlet x = 1;\n```";
        assert_eq!(to_plain_text(markdown), "<font color=\"info\">好</font>\n\nlet x = 1;");
        let dropping = Style { dropped_tags: &["font"], ..Style::PLAIN };
        assert_eq!(render(markdown, dropping), "好\n\nlet x = 1;");
        assert_eq!(render("a<br>b <b>c</b>", dropping), "a\nb <b>c</b>");
    }

    #[test]
    fn basic_keeps_headings_bold_links_and_inline_code() {
        let text = basic("## 标题\n\n这是**重点**，见[文档](https://example.com/a)，运行 `cargo run`。");
        assert_eq!(text, "## 标题\n\n这是**重点**，见[文档](https://example.com/a)，运行 `cargo run`。");
    }

    #[test]
    fn basic_drops_the_markup_it_does_not_render() {
        assert_eq!(basic("*斜体*和~~删除~~"), "斜体和删除");
    }

    #[test]
    fn basic_tables_become_pipe_separated_lines() {
        assert_eq!(basic("| a | **b** |\n|---|---|\n| 1 | 2 |"), "a | **b**\n1 | 2");
    }

    #[test]
    fn basic_images_become_links_to_the_picture() {
        assert_eq!(basic("![图](https://example.com/p.png)"), "[图](https://example.com/p.png)");
        assert_eq!(basic("![](https://example.com/p.png)"), "https://example.com/p.png");
    }

    #[test]
    fn basic_code_blocks_become_one_inline_code_per_line() {
        let text = basic("看：\n\n```rust\nfn main() {\n\n    println!(\"**hi**\");\n}\n```");
        assert_eq!(text, "看：\n\n`fn main() {`\n\n`    println!(\"**hi**\");`\n`}`");
    }

    #[test]
    fn basic_quotes_prefix_every_line() {
        assert_eq!(basic("> 第一行\n> 第二行\n>\n> 第二段\n\n后文"), "> 第一行\n> 第二行\n>\n> 第二段\n\n后文");
    }

    #[test]
    fn basic_lists_become_bullets_and_numbers() {
        assert_eq!(basic("1. 第一\n2. **第二**\n   - 子项"), "1. 第一\n2. **第二**\n  • 子项");
    }

    #[test]
    fn basic_keeps_raw_html_such_as_colour_tags() {
        assert_eq!(basic("状态：<font color=\"info\">正常</font>"), "状态：<font color=\"info\">正常</font>");
    }

    #[test]
    fn unmatched_bold_markers_around_cjk_punctuation_are_removed() {
        for text in [to_plain_text("他说**“你好”**然后走了。"), basic("他说**“你好”**然后走了。")]
        {
            assert!(!text.contains("**"), "{text}");
            assert!(text.contains("“你好”"), "{text}");
        }
    }

    #[test]
    fn double_stars_that_are_not_emphasis_stay() {
        for (markdown, plain) in [
            ("计算 2**10 的值", "计算 2**10 的值"),
            ("调用 f(*args, **kwargs) 即可", "调用 f(*args, **kwargs) 即可"),
            ("他说**“你好”**，又说**“再见”**。", "他说“你好”，又说“再见”。"),
            ("- **Docker：**容器工具", "• Docker：容器工具"),
            ("**用法：**调用 f(**kwargs)", "用法：调用 f(**kwargs)"),
            ("**Python 示例：**如下", "Python 示例：如下"),
        ] {
            assert_eq!(to_plain_text(markdown), plain, "{markdown}");
        }
    }

    #[test]
    fn a_code_block_that_opens_the_answer_keeps_its_indentation() {
        assert_eq!(
            to_plain_text(
                "```python
    return 1
```"
            ),
            "    return 1"
        );
    }

    #[test]
    fn plain_text_passes_through_both_unchanged() {
        let plain = "你好，世界。Hello, world! 1 + 1 = 2";
        assert_eq!(to_plain_text(plain), plain);
        assert_eq!(basic(plain), plain);
    }

    #[test]
    fn an_unterminated_fence_keeps_its_code() {
        assert_eq!(basic("```\nlet x = 1;"), "`let x = 1;`");
    }
}
