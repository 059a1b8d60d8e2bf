//! Flat XML pushes (WeChat, WeCom) → [`Fields`]: the text of the root element's direct children,
//! by element name.
//!
//! Invariants: reading never panics; a body that is not well-formed XML (or not UTF-8, or has a
//! `DOCTYPE`) is a [`MalformedXml`]; nested elements contribute nothing; CDATA and plain text are
//! both read, entities unescaped; the first occurrence of a name wins.

use quick_xml::events::Event as XmlEvent;
use quick_xml::Reader;
use std::collections::HashMap;

/// Why a body could not be read; the channel turns it into its own "malformed" error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MalformedXml(pub String);

fn malformed(reason: impl Into<String>) -> MalformedXml {
    MalformedXml(log_safe(&reason.into()))
}

/// The most characters of a reason kept: reasons quote the caller's bytes (an unknown entity's
/// name, a closing tag's), which may be a megabyte long, and they end up in logs.
const MAX_REASON_CHARS: usize = 160;

/// `reason` cut to [`MAX_REASON_CHARS`], with control characters escaped: a line break in an
/// unsigned body must not forge log lines.
fn log_safe(reason: &str) -> String {
    let mut safe = String::with_capacity(reason.len().min(MAX_REASON_CHARS * 4));
    for (count, character) in reason.chars().enumerate() {
        if count == MAX_REASON_CHARS {
            safe.push('…');
            break;
        }
        if character.is_control() {
            safe.extend(character.escape_default());
        } else {
            safe.push(character);
        }
    }
    safe
}

/// Field values by name, from a flat push (XML here, or a JSON variant the channel reads).
///
/// WeChat-family pushes are flat; the few nested elements some events carry (`ScanCodeInfo`,
/// `SendPicsInfo`) contribute only their direct text, which no field a channel reads needs.
#[derive(Debug, Default, Clone)]
pub struct Fields {
    values: HashMap<String, String>,
    /// Names are lower-cased on insert and lookup, for platforms whose variants spell them
    /// differently (WeCom's JSON callbacks: `tousername`, `AgentId`).
    ignore_case: bool,
}

impl Fields {
    /// Empty fields whose names match exactly.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empty fields whose names match without ASCII case.
    pub fn ignoring_case() -> Self {
        Self { ignore_case: true, ..Self::default() }
    }

    fn key<'a>(&self, name: &'a str) -> std::borrow::Cow<'a, str> {
        if self.ignore_case {
            name.to_ascii_lowercase().into()
        } else {
            name.into()
        }
    }

    /// Records a value. NOTE: the first occurrence wins; the platforms never repeat a field.
    pub fn insert(&mut self, name: &str, value: String) {
        let key = self.key(name).into_owned();
        self.values.entry(key).or_insert(value);
    }

    /// The raw value, untrimmed (message text keeps its whitespace).
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.values.get(self.key(name).as_ref()).map(String::as_str)
    }

    /// The trimmed value, `None` when absent or blank.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.raw(name).map(str::trim).filter(|value| !value.is_empty())
    }

    /// [`get`](Self::get), owned.
    pub fn owned(&self, name: &str) -> Option<String> {
        self.get(name).map(str::to_owned)
    }

    /// A finite number, or `None`. Non-finite values are dropped because envelopes are journaled
    /// as JSON, which cannot carry NaN.
    pub fn optional_number(&self, name: &str) -> Option<f64> {
        self.get(name).and_then(|value| value.parse::<f64>().ok()).filter(|value| value.is_finite())
    }
}

/// Reads the root's child elements from an XML body into `fields`.
pub fn read_xml(body: &[u8], fields: &mut Fields) -> Result<(), MalformedXml> {
    let text = std::str::from_utf8(body).map_err(|_| malformed("body is not UTF-8"))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = Reader::from_str(text);
    let mut depth = 0usize;
    let mut seen_root = false;
    // The child element being read: its name and its text and CDATA chunks.
    let mut current: Option<(String, Vec<Chunk>)> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|error| malformed(format!("invalid XML near byte {}: {error}", reader.error_position())))?;
        match event {
            XmlEvent::Start(start) => {
                if depth == 0 {
                    if seen_root {
                        return Err(malformed("more than one root element"));
                    }
                    seen_root = true;
                } else if depth == 1 {
                    current = Some((element_name(start.name().as_ref())?, Vec::new()));
                }
                depth += 1;
            }
            XmlEvent::Empty(start) => {
                if depth == 0 {
                    if seen_root {
                        return Err(malformed("more than one root element"));
                    }
                    seen_root = true;
                } else if depth == 1 {
                    fields.insert(&element_name(start.name().as_ref())?, String::new());
                }
            }
            XmlEvent::End(_) => {
                depth = depth.checked_sub(1).ok_or_else(|| malformed("unexpected closing tag"))?;
                if depth == 1 {
                    if let Some((name, chunks)) = current.take() {
                        fields.insert(&name, join_chunks(chunks));
                    }
                }
            }
            XmlEvent::Text(text) => {
                let text = text.unescape().map_err(|error| malformed(format!("bad character reference: {error}")))?;
                if depth == 0 && !text.trim().is_empty() {
                    return Err(malformed("text outside the root element"));
                }
                if depth == 2 {
                    if let Some((_, chunks)) = current.as_mut() {
                        chunks.push(Chunk::Text(text.into_owned()));
                    }
                }
            }
            XmlEvent::CData(data) => {
                if depth == 0 {
                    return Err(malformed("CDATA outside the root element"));
                }
                if depth == 2 {
                    let data = data.decode().map_err(|_| malformed("CDATA is not UTF-8"))?;
                    if let Some((_, chunks)) = current.as_mut() {
                        chunks.push(Chunk::CData(data.into_owned()));
                    }
                }
            }
            // NOTE: refused rather than ignored: the platforms never send one, and entity
            // definitions are how XML bombs start.
            XmlEvent::DocType(_) => return Err(malformed("DOCTYPE is not allowed")),
            XmlEvent::Decl(_) | XmlEvent::PI(_) | XmlEvent::Comment(_) => {}
            XmlEvent::Eof => break,
        }
    }
    if !seen_root {
        return Err(malformed("no XML element in the body"));
    }
    if depth != 0 {
        return Err(malformed("the root element is not closed"));
    }
    Ok(())
}

enum Chunk {
    Text(String),
    CData(String),
}

/// An element's value. When it holds CDATA, the whitespace around the CDATA is formatting, not
/// content, so whitespace-only text chunks are dropped.
fn join_chunks(chunks: Vec<Chunk>) -> String {
    let has_cdata = chunks.iter().any(|chunk| matches!(chunk, Chunk::CData(_)));
    chunks
        .into_iter()
        .filter_map(|chunk| match chunk {
            Chunk::CData(data) => Some(data),
            Chunk::Text(text) if has_cdata && text.trim().is_empty() => None,
            Chunk::Text(text) => Some(text),
        })
        .collect()
}

fn element_name(raw: &[u8]) -> Result<String, MalformedXml> {
    std::str::from_utf8(raw).map(str::to_owned).map_err(|_| malformed("element name is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(xml: &str) -> Result<Fields, MalformedXml> {
        let mut fields = Fields::new();
        read_xml(xml.as_bytes(), &mut fields).map(|()| fields)
    }

    #[test]
    fn reasons_quoting_the_body_are_short_and_on_one_line() {
        let forged = format!("x\n2025-01-01T00:00:00Z ERROR forged line {}", "y".repeat(10_000));
        for xml in [
            format!("<xml><Encrypt>&{forged};</Encrypt></xml>"),
            format!("<xml><A>1</{forged}></xml>"),
            format!("<xml><A>1</A></xml>\r\n<{forged}>"),
        ] {
            let Err(MalformedXml(reason)) = fields(&xml) else { panic!("accepted: {xml:.40}") };
            assert!(reason.len() < 1024, "{} bytes: {reason:.80}", reason.len());
            assert!(!reason.contains(['\n', '\r']), "{reason}");
        }
    }

    #[test]
    fn cdata_and_plain_text_values_are_both_read() {
        let parsed = fields(
            "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><CreateTime>123</CreateTime>\
             <Content> <![CDATA[a]]>]]&gt;<![CDATA[b]]> </Content></xml>",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.get("ToUserName"), Some("gh_1"));
        assert_eq!(parsed.get("CreateTime"), Some("123"));
        assert_eq!(parsed.raw("Content"), Some("a]]>b"));
    }

    #[test]
    fn entities_in_plain_text_are_unescaped_and_unknown_ones_refused() {
        let parsed =
            fields("<xml><Content>a &lt;b&gt; &amp; &#x4F60;</Content></xml>").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.raw("Content"), Some("a <b> & 你"));
        assert!(fields("<xml><Content>&bogus;</Content></xml>").is_err());
    }

    #[test]
    fn nested_and_unknown_elements_are_ignored() {
        let parsed = fields(
            "<?xml version=\"1.0\"?><xml><!-- c --><Unknown>x</Unknown>\
             <ScanCodeInfo><ScanType>qrcode</ScanType></ScanCodeInfo><MsgType>event</MsgType><Empty/></xml>",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.get("MsgType"), Some("event"));
        assert_eq!(parsed.get("ScanType"), None);
        assert_eq!(parsed.raw("Empty"), Some(""));
    }

    #[test]
    fn the_first_occurrence_of_a_name_wins() {
        let parsed = fields("<xml><A>1</A><A>2</A></xml>").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.get("A"), Some("1"));
    }

    #[test]
    fn names_match_exactly_unless_case_is_ignored() {
        let exact = fields("<xml><AgentId>7</AgentId></xml>").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(exact.get("AgentID"), None);
        let mut folded = Fields::ignoring_case();
        read_xml(b"<xml><AgentId>7</AgentId></xml>", &mut folded).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(folded.get("AgentID"), Some("7"));
    }

    #[test]
    fn broken_documents_are_malformed() {
        for body in [
            "",
            "   ",
            "<xml>",
            "<xml><a></b></xml>",
            "<xml></xml><xml></xml>",
            "hello",
            "<xml><a>1</a></xml>trailing",
            "<!DOCTYPE x [<!ENTITY a \"b\">]><xml><a>&a;</a></xml>",
            "{\"json\": true}",
        ] {
            assert!(fields(body).is_err(), "accepted {body:?}");
        }
        assert!(read_xml(b"<xml>\xff</xml>", &mut Fields::new()).is_err());
    }

    #[test]
    fn non_finite_numbers_are_dropped() {
        let parsed = fields("<xml><Location_X>NaN</Location_X><Location_Y>1</Location_Y></xml>")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.optional_number("Location_X"), None);
        assert_eq!(parsed.optional_number("Location_Y"), Some(1.0));
    }
}
