//! Text that came from the wire, made safe to show: bounded in length, and escaped before it
//! reaches a log line or a terminal.

use std::borrow::Cow;
use std::fmt::Write as _;

/// The most bytes of an error text the framework keeps, logs, sends back or puts in a header:
/// a bad input's error may quote the input, which can be megabytes.
pub const MAX_ERROR_TEXT: usize = 4096;

/// `text` cut to at most `limit` bytes (on a character boundary) with the full size stated;
/// `text` itself when it fits.
///
/// ```
/// use micro_framework::logging::bounded;
/// assert_eq!(bounded("short", 16), "short");
/// assert_eq!(bounded(&"x".repeat(100), 10), "xxxxxxxxxx… (truncated: 100 bytes in all)");
/// ```
pub fn bounded(text: &str, limit: usize) -> Cow<'_, str> {
    if text.len() <= limit {
        return Cow::Borrowed(text);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… (truncated: {} bytes in all)", &text[..end], text.len()))
}

/// `text` with every character that could forge a line or drive a terminal escaped as
/// `\u{..}` (or `\n`, `\r`, `\t`): control characters (newline, escape, NUL, ...), and the
/// invisible formatting characters that reorder or hide text (bidirectional overrides,
/// zero-width characters). A backslash is doubled, so an escaped text cannot be faked.
///
/// ```
/// use micro_framework::logging::escape_wire_text;
/// assert_eq!(escape_wire_text("plain text"), "plain text");
/// assert_eq!(escape_wire_text("a\nINFO forged"), "a\\nINFO forged");
/// assert_eq!(escape_wire_text("\u{1b}]0;title\u{7}"), "\\u{1b}]0;title\\u{7}");
/// assert_eq!(escape_wire_text("abc\u{202e}fed"), "abc\\u{202e}fed");
/// ```
pub fn escape_wire_text(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            '\\' => escaped.push_str("\\\\"),
            c if needs_escape(c) => {
                let _ = write!(escaped, "\\u{{{:x}}}", u32::from(c));
            }
            c => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || is_invisible_format(c)
}

/// Unicode format characters (category Cf) that can reorder, hide or join text on a screen.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_cuts_on_a_character_boundary() {
        let text = "é".repeat(10);
        let cut = bounded(&text, 5);
        assert!(cut.starts_with("éé…"), "{cut}");
        assert!(cut.ends_with("(truncated: 20 bytes in all)"));
    }

    #[test]
    fn escaping_leaves_no_control_or_format_character() {
        let hostile = "line\r\nforged\u{0}\u{1b}[2J\u{202e}\u{2066}\u{200b}\\u{a}";
        let escaped = escape_wire_text(hostile);
        assert!(!escaped.chars().any(|c| c.is_control() || is_invisible_format(c)), "{escaped}");
        assert_eq!(escaped, "line\\r\\nforged\\u{0}\\u{1b}[2J\\u{202e}\\u{2066}\\u{200b}\\\\u{a}");
    }

    #[test]
    fn ordinary_text_is_borrowed() {
        assert!(matches!(escape_wire_text("ünïcode ok ✓"), Cow::Borrowed(_)));
        assert!(matches!(bounded("ok", 2), Cow::Borrowed(_)));
    }
}
