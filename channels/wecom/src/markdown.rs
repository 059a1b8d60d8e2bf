//! LLM markdown → what a WeCom message can show: WeCom's markdown subset, or plain text.
//!
//! WeCom app messages of type `markdown` render only a subset (doc path/90236): headings `#`–
//! `######`, bold `**…**`, links `[text](url)`, single-line inline code, quotes `>` and
//! `<font color="info|comment|warning">` — the shared renderer's [`Markup::Basic`], with raw HTML
//! (the colour tags) kept. `text` messages get plain text, where a colour tag means nothing and is
//! dropped.
//!
//! Invariants: neither function fails or panics; every word and all code survive (images keep
//! their alt text and URL, as a link in markdown); runs of blank lines collapse to one.

use yizhan_channel_common::markdown::{render, Markup, Style};

/// WeCom `text` messages: plain text, `<font>` tags dropped (their text kept).
const TEXT: Style = Style { markup: Markup::Plain, dropped_tags: &["font"] };

/// WeCom `markdown` messages: the basic subset, `<font color>` passed through.
const MARKDOWN: Style = Style { markup: Markup::Basic, dropped_tags: &[] };

/// Converts markdown to plain text for WeCom `text` messages. Never fails: anything the parser
/// does not understand is kept as text.
pub fn to_plain_text(markdown: &str) -> String {
    render(markdown, TEXT)
}

/// Converts markdown to the subset WeCom's `markdown` messages render. Never fails.
pub fn to_wecom_markdown(markdown: &str) -> String {
    render(markdown, MARKDOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_drops_colour_tags_and_code_fences() {
        let text = to_plain_text("<font color=\"info\">好</font>\n\n```\nlet x = 1;\n```");
        assert_eq!(text, "好\n\nlet x = 1;");
    }

    #[test]
    fn markdown_keeps_wecom_colour_tags_and_its_subset() {
        let text = to_wecom_markdown("## 状态\n\n<font color=\"info\">正常</font>，见[文档](https://example.com/a)。");
        assert_eq!(text, "## 状态\n\n<font color=\"info\">正常</font>，见[文档](https://example.com/a)。");
    }
}
