//! One HTTP/1.1 request read off a socket, for the tests' hand-rolled stand-in servers (where
//! wiremock cannot do what a test needs: trickle a stream, or hold an answer back).

use std::io::BufRead;

/// A request's line and header lines, each with its `\r\n`, and its body.
// Each stand-in reads only what it needs of it.
#[allow(dead_code)]
pub struct RawRequest {
    pub request_line: String,
    pub header_lines: Vec<String>,
    pub body: Vec<u8>,
}

/// Reads one request; `None` if the client went away before all of it came. The body is read by
/// its `content-length`: the clients under test send neither chunked bodies nor
/// `expect: 100-continue`.
pub fn read_request(reader: &mut impl BufRead) -> Option<RawRequest> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).ok()? == 0 {
        return None;
    }
    let mut header_lines = Vec::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            assert!(!name.eq_ignore_ascii_case("transfer-encoding"), "a chunked request body: {line}");
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        header_lines.push(line);
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body).ok()?;
    Some(RawRequest { request_line, header_lines, body })
}
