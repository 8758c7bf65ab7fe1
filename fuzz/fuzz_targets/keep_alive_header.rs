//! `KeepAliveHeader::parse` on arbitrary bytes: never panics; whatever parses formats to a value that
//! parses back to the same thing and formats the same again; several field lines parse like one line
//! that joins them with commas.

#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tower_keepalive::KeepAliveHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = KeepAliveHeader::parse(data) {
        let formatted = parsed.to_string();
        assert_eq!(parsed.to_header_value().as_bytes(), formatted.as_bytes());
        let reparsed = KeepAliveHeader::parse(formatted.as_bytes())
            .unwrap_or_else(|e| panic!("{formatted:?} does not parse back: {e}"));
        assert_eq!(reparsed, parsed, "{formatted:?}");
        assert_eq!(reparsed.to_string(), formatted);
        assert_eq!(parsed.timeout_secs(), parsed.timeout().map(|t| t.as_secs()));
    }

    // The same bytes as field lines, split at newlines (where they are valid field values).
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let mut headers = HeaderMap::new();
    for line in &lines {
        match HeaderValue::from_bytes(line) {
            Ok(value) => headers.append("keep-alive", value),
            Err(_) => return,
        };
    }
    if let Ok(Some(from_lines)) = KeepAliveHeader::from_headers(&headers) {
        let joined = lines.join(&b", "[..]);
        let from_joined = KeepAliveHeader::parse(&joined).unwrap_or_else(|e| {
            panic!(
                "lines parse, joined {:?} does not: {e}",
                String::from_utf8_lossy(&joined)
            )
        });
        assert_eq!(from_lines, from_joined);
    }
});
