//! Markdown → readable plain text, because WeChat shows message text verbatim.
//!
//! LLMs answer in markdown; in a WeChat bubble `**bold**`, `## Title` and code fences are noise.
//! The conversion keeps every word and all code, drops the markup, and keeps the structure that
//! plain text can carry: paragraphs (blank lines), list items (`• ` / `1. `), links as
//! `text (url)`, table cells separated by ` | `.

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

/// Converts markdown to plain text. Never fails: anything the parser does not understand is kept
/// as text.
pub fn to_plain_text(markdown: &str) -> String {
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let mut writer = PlainWriter::default();
    for event in Parser::new_ext(markdown, options) {
        writer.event(event);
    }
    writer.finish()
}

/// Streams parser events into plain text.
#[derive(Default)]
struct PlainWriter {
    out: String,
    /// Consecutive text events, joined before stray `**` are removed (the parser may split a
    /// delimiter run it did not match across events).
    pending: String,
    /// One entry per open list: the next number for ordered lists, `None` for bullets.
    lists: Vec<Option<u64>>,
    /// Open links and images: destination and where their text starts in `out`.
    links: Vec<(String, usize)>,
    /// Inside a fenced or indented code block, text is copied untouched.
    in_code_block: bool,
    /// Cells written in the current table row.
    cells_in_row: usize,
}

impl PlainWriter {
    fn event(&mut self, event: Event<'_>) {
        if let Event::Text(text) = &event {
            if !self.in_code_block {
                self.pending.push_str(text);
                return;
            }
        }
        self.flush_text();
        match event {
            Event::Start(tag) => self.start(tag),
            Event::End(tag) => self.end(tag),
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
            Tag::Paragraph | Tag::Heading { .. } | Tag::BlockQuote(_) | Tag::HtmlBlock => {
                if self.lists.is_empty() {
                    self.block_break();
                }
            }
            Tag::CodeBlock(_) => {
                self.block_break();
                self.in_code_block = true;
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
                let depth = self.lists.len().saturating_sub(1);
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
            TagEnd::Paragraph | TagEnd::Heading(_) | TagEnd::BlockQuote(_) | TagEnd::HtmlBlock => {
                if self.lists.is_empty() {
                    self.block_break();
                } else {
                    self.line_break();
                }
            }
            TagEnd::CodeBlock => {
                self.in_code_block = false;
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

    /// Appends ` (url)` after a link's (or image's alt) text, unless the text already is the URL (autolinks) or
    /// the URL points inside the document.
    fn close_link(&mut self) {
        let Some((url, start)) = self.links.pop() else { return };
        if url.is_empty() || url.starts_with('#') {
            return;
        }
        let text = self.out.get(start..).unwrap_or_default().trim();
        let bare = url.strip_prefix("mailto:").unwrap_or(&url);
        if text == url || text == bare {
            return;
        }
        if text.is_empty() {
            self.out.push_str(&url);
        } else {
            self.out.push_str(&format!(" ({url})"));
        }
    }

    /// Raw HTML is kept as text (nothing is lost), except line breaks, which become newlines.
    fn html(&mut self, html: &str) {
        let tag = html.trim().to_ascii_lowercase();
        if matches!(tag.as_str(), "<br>" | "<br/>" | "<br />") {
            self.out.push('\n');
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
        let text = self.pending.replace("**", "");
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
        let mut text = String::with_capacity(self.out.len());
        let mut newlines = 0;
        for ch in self.out.trim().chars() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emphasis_and_heading_markers_disappear() {
        let text = to_plain_text("## 标题\n\n这是**重点**和*斜体*，还有~~删除~~。");
        assert_eq!(text, "标题\n\n这是重点和斜体，还有删除。");
    }

    #[test]
    fn unmatched_bold_markers_around_cjk_punctuation_are_removed() {
        let text = to_plain_text("他说**“你好”**然后走了。");
        assert!(!text.contains("**"), "{text}");
        assert!(text.contains("“你好”"), "{text}");
    }

    #[test]
    fn code_fences_go_but_the_code_stays_verbatim() {
        let text = to_plain_text("看代码：\n\n```rust\nfn main() {\n    println!(\"**hi**\");\n}\n```\n\n用 `cargo run` 运行。");
        assert_eq!(
            text,
            "看代码：\n\nfn main() {\n    println!(\"**hi**\");\n}\n\n用 cargo run 运行。"
        );
        assert!(!text.contains('`'));
    }

    #[test]
    fn links_show_their_url_after_the_text() {
        assert_eq!(to_plain_text("见[文档](https://example.com/a)。"), "见文档 (https://example.com/a)。");
        assert_eq!(to_plain_text("<https://example.com>"), "https://example.com");
        assert_eq!(to_plain_text("![图](https://example.com/p.png)"), "图 (https://example.com/p.png)");
    }

    #[test]
    fn lists_become_bullets_and_numbers() {
        let text = to_plain_text("步骤：\n\n1. 第一\n2. 第二\n   - 子项\n\n- 甲\n- 乙");
        assert_eq!(text, "步骤：\n\n1. 第一\n2. 第二\n  • 子项\n\n• 甲\n• 乙");
    }

    #[test]
    fn ordered_lists_keep_their_start_number() {
        assert_eq!(to_plain_text("3. c\n4. d"), "3. c\n4. d");
    }

    #[test]
    fn paragraphs_and_line_breaks_are_kept() {
        assert_eq!(to_plain_text("第一行\n第二行\n\n\n\n第二段"), "第一行\n第二行\n\n第二段");
    }

    #[test]
    fn tables_become_pipe_separated_lines() {
        let text = to_plain_text("| a | b |\n|---|---|\n| 1 | 2 |");
        assert_eq!(text, "a | b\n1 | 2");
    }

    #[test]
    fn plain_text_passes_through_unchanged() {
        let plain = "你好，世界。Hello, world! 1 + 1 = 2";
        assert_eq!(to_plain_text(plain), plain);
    }
}
