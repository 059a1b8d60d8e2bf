//! Splitting long text into parts a platform accepts, at the most natural place available.
//!
//! Invariants of [`split_text`]: every part is at most `max_bytes` bytes of UTF-8 (for
//! `max_bytes >= 4`), no part is empty or whitespace-only, no cut falls inside a character (nor
//! inside a grapheme, such as a flag or an emoji family, unless one is longer than a part), and
//! joining the parts gives back the text less the whitespace at the cuts.
//!
//! Platform-neutral: it knows nothing of markup. A channel that must keep markup balanced across
//! parts (Feishu's code fences) repairs the parts itself; one whose markup must not be cut (a
//! link) names it to [`split_text_keeping`].

use std::ops::Range;

/// Sentence-ending characters a cut may follow. ASCII ones count only before whitespace (or at
/// the end), so `3.14` and `example.com` are not sentence ends.
const SENTENCE_ENDS: [char; 10] = ['。', '！', '？', '；', '…', '.', '!', '?', ';', '\u{FF0E}'];

/// A cut at a natural break is taken only if it keeps at least this share of the window, so a
/// break near the start does not waste one of the few messages a platform allows.
const MIN_FILL_DIVISOR: usize = 2;

/// Splits `text` into parts of at most `max_bytes` UTF-8 bytes.
///
/// Cuts prefer, in order: a paragraph break (blank line), a line break, a sentence end
/// (`。！？；.!?;`), a space, and finally any character boundary. A natural break is used when it
/// falls in the second half of the allowed size; otherwise the latest break of any kind is used,
/// and only text without any break is cut at a character boundary.
///
/// Whitespace at each cut is dropped; a paragraph or line cut keeps the next line's indentation.
/// A `max_bytes` below 4 is treated as 4 so that every character fits; nothing panics.
pub fn split_text(text: &str, max_bytes: usize) -> Vec<String> {
    split_text_keeping(text, max_bytes, |_| Vec::new())
}

/// [`split_text`], never cutting inside the byte ranges `keep` finds in the text still to split
/// (markup such as a link, whose halves would show as raw text), unless one is too long for a
/// part: a cut that would fall inside one moves to the break before it, or to its start.
pub fn split_text_keeping(text: &str, max_bytes: usize, keep: impl Fn(&str) -> Vec<Range<usize>>) -> Vec<String> {
    let max_bytes = max_bytes.max(4);
    let mut parts = Vec::new();
    let mut rest = text.trim_start_matches(['\n', '\r']);
    while !rest.is_empty() {
        if rest.len() <= max_bytes {
            push_part(&mut parts, rest);
            break;
        }
        // Only what a cut here could fall inside: a window of two parts, so that each cut
        // costs the same however long the text.
        let mut kept = keep(&rest[..floor_char_boundary(rest, max_bytes.saturating_mul(2))]);
        // One longer than a part is cut like any text.
        kept.retain(|range| range.len() <= max_bytes);
        let (cut, kind) = choose_cut(rest, max_bytes, &kept);
        let (head, tail) = rest.split_at(cut);
        push_part(&mut parts, head);
        rest = match kind {
            // The tail starts a line: keep its indentation, drop only the empty lines.
            Cut::Paragraph | Cut::Line => tail.trim_start_matches(['\n', '\r']),
            Cut::Sentence | Cut::Space => tail.trim_start(),
            Cut::Char => tail,
        };
    }
    parts
}

fn push_part(parts: &mut Vec<String>, part: &str) {
    let part = part.trim_end();
    if !part.trim_start().is_empty() {
        parts.push(part.to_owned());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Paragraph,
    Line,
    Sentence,
    Space,
    Char,
}

/// Where to cut `rest` (longer than `max_bytes`): a byte offset in `1..=max_bytes` on a char
/// boundary, except when the first character alone is longer than `max_bytes` (impossible for
/// `max_bytes >= 4`), when it is that character's length.
///
/// No cut falls strictly inside a range of `kept` (byte ranges of `rest`) when another can be
/// had: a character cut inside one moves to its start, if that is not the part's start.
fn choose_cut(rest: &str, max_bytes: usize, kept: &[Range<usize>]) -> (usize, Cut) {
    let limit = floor_char_boundary(rest, max_bytes);
    if limit == 0 {
        let first = rest.chars().next().map_or(rest.len(), char::len_utf8);
        return (first, Cut::Char);
    }
    let window = &rest[..limit];
    let candidates = [
        (window.rfind("\n\n").map(|at| at + 2), Cut::Paragraph),
        (window.rfind('\n').map(|at| at + 1), Cut::Line),
        (last_sentence_end(rest, limit), Cut::Sentence),
        (last_space_end(window), Cut::Space),
    ];
    let inside = |at: usize| kept.iter().find(|range| range.start < at && at < range.end);
    let usable = |cut: &Option<usize>| cut.filter(|&at| at > 0 && at <= limit && inside(at).is_none());
    for (cut, kind) in &candidates {
        if let Some(at) = usable(cut).filter(|&at| at >= limit / MIN_FILL_DIVISOR) {
            return (at, *kind);
        }
    }
    candidates
        .iter()
        .filter_map(|(cut, kind)| usable(cut).map(|at| (at, *kind)))
        .max_by_key(|(at, _)| *at)
        .unwrap_or_else(|| {
            let at = grapheme_floor(rest, limit);
            match inside(at) {
                Some(range) if range.start > 0 => (range.start, Cut::Char),
                _ => (at, Cut::Char),
            }
        })
}

/// The last grapheme boundary of `rest` in `1..=limit` (`limit` a char boundary), so that a cut
/// with no break to use does not split a flag (two regional indicators), an emoji joined with
/// ZWJs, or a letter from its combining marks; `limit` itself when the first grapheme is longer.
fn grapheme_floor(rest: &str, limit: usize) -> usize {
    use unicode_segmentation::UnicodeSegmentation;
    rest.grapheme_indices(true)
        .map(|(at, grapheme)| at + grapheme.len())
        .take_while(|&end| end <= limit)
        .last()
        .unwrap_or(limit)
}

/// The largest char boundary of `text` that is at most `index`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    if index >= text.len() {
        return text.len();
    }
    (0..=index).rev().find(|&at| text.is_char_boundary(at)).unwrap_or(0)
}

/// The offset just after the last sentence end within `rest[..limit]`.
fn last_sentence_end(rest: &str, limit: usize) -> Option<usize> {
    rest[..limit]
        .char_indices()
        .rev()
        .filter(|(_, ch)| SENTENCE_ENDS.contains(ch))
        .map(|(at, ch)| (at + ch.len_utf8(), ch))
        .find(|&(end, ch)| {
            // ASCII punctuation ends a sentence only before whitespace or the end of the text.
            !ch.is_ascii() || !matches!(rest[end..].chars().next(), Some(next) if !next.is_whitespace())
        })
        .map(|(end, _)| end)
}

/// The offset just after the last whitespace character in `window`.
fn last_space_end(window: &str) -> Option<usize> {
    window.char_indices().rev().find(|(_, ch)| ch.is_whitespace()).map(|(at, ch)| at + ch.len_utf8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forced_cut_keeps_flags_and_emoji_sequences_whole() {
        for (text, whole) in [
            (format!("a{}", "🇨🇳".repeat(300)), "🇨🇳"),
            (format!("a{}", "👨\u{200d}👩\u{200d}👧".repeat(200)), "👨\u{200d}👩\u{200d}👧"),
        ] {
            let parts = split_text(&text, 2048);
            assert!(parts.len() > 1);
            for part in &parts {
                assert!(part.len() <= 2048);
                let rest = part.trim_start_matches('a');
                assert_eq!(rest.replace(whole, ""), "", "a part cut inside {whole:?}");
            }
        }
    }

    fn assert_invariants(text: &str, parts: &[String], max: usize) {
        for part in parts {
            assert!(!part.trim().is_empty(), "empty part in {parts:?}");
            assert!(part.len() <= max, "part of {} bytes over {max}", part.len());
        }
        let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        assert_eq!(squash(&parts.concat()), squash(text), "text was lost or reordered");
    }

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(split_text("你好", 2048), vec!["你好".to_owned()]);
    }

    #[test]
    fn text_of_exactly_the_limit_is_one_part() {
        let text = "好".repeat(20); // 60 bytes
        assert_eq!(split_text(&text, 60), vec![text.clone()]);
        let parts = split_text(&format!("{text}a"), 60);
        assert_eq!(parts.len(), 2);
        assert_invariants(&format!("{text}a"), &parts, 60);
    }

    #[test]
    fn a_long_chinese_answer_is_split_at_sentence_ends_within_the_limit() {
        let sentence = "大型语言模型可以回答各种问题，但回答往往很长。";
        let text: String = sentence.repeat(3000 / sentence.chars().count() + 1);
        assert!(text.chars().count() >= 3000);
        let parts = split_text(&text, 2048);
        assert!(parts.len() >= 4, "{} parts", parts.len());
        assert_invariants(&text, &parts, 2048);
        for part in &parts[..parts.len() - 1] {
            assert!(part.ends_with('。'), "cut mid-sentence: …{}", &part[part.len() - 9..]);
        }
    }

    #[test]
    fn paragraph_breaks_win_over_sentence_ends() {
        let first = "第一段。".repeat(20); // 240 bytes
        let second = "第二段。".repeat(20);
        let text = format!("{first}\n\n{second}");
        let parts = split_text(&text, 300);
        assert_eq!(parts, vec![first, second]);
    }

    #[test]
    fn line_breaks_win_over_sentence_ends() {
        let text = format!("{}\n{}", "一句。".repeat(15), "二句。".repeat(15));
        let parts = split_text(&text, 200);
        assert_eq!(parts, vec!["一句。".repeat(15), "二句。".repeat(15)]);
    }

    #[test]
    fn a_cut_never_falls_inside_a_multi_byte_character() {
        for max in 4..40 {
            let text = "a好😀é".repeat(30);
            let parts = split_text(&text, max);
            assert_invariants(&text, &parts, max);
        }
    }

    #[test]
    fn a_long_paragraph_without_punctuation_is_cut_at_char_boundaries() {
        let text = "无标点的长段落".repeat(200);
        let parts = split_text(&text, 2048);
        assert_invariants(&text, &parts, 2048);
        assert_eq!(parts.concat(), text);
        assert!(parts[0].len() > 2040);
    }

    #[test]
    fn english_is_cut_between_words_not_inside_them() {
        let text = "word ".repeat(100);
        let parts = split_text(&text, 64);
        assert_invariants(&text, &parts, 64);
        for part in &parts {
            assert!(part.split(' ').all(|w| w == "word"), "{part:?}");
        }
    }

    #[test]
    fn ascii_dots_inside_numbers_and_domains_are_not_sentence_ends() {
        let text = format!("{} pi is 3.14159 and example.com is a domain", "x".repeat(30));
        let parts = split_text(&text, 48);
        assert_invariants(&text, &parts, 48);
        assert!(parts.iter().all(|p| !p.ends_with("3.") && !p.ends_with("example.")), "{parts:?}");
    }

    #[test]
    fn whitespace_only_or_empty_text_gives_no_parts() {
        assert!(split_text("", 100).is_empty());
        assert!(split_text(" \n\n \n", 100).is_empty());
    }

    #[test]
    fn a_tiny_limit_still_makes_progress_without_panicking() {
        let text = "😀好a";
        for max in 0..6 {
            let parts = split_text(text, max);
            assert_eq!(parts.concat(), text);
        }
    }

    #[test]
    fn indentation_after_a_line_cut_is_kept() {
        let text = format!("{}\n    indented code line", "x".repeat(50));
        let parts = split_text(&text, 60);
        assert_eq!(parts[1], "    indented code line");
    }
}
