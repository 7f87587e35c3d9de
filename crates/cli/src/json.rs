//! JSON for the terminal: pretty-printed, with every character that could drive a terminal
//! escaped, and indented only so deep (a header nested thousands of levels deep would
//! otherwise print gigabytes of indentation).

use std::borrow::Cow;
use std::io::{self, Write};

use micro_framework::logging::escape_wire_text;
use serde::Serialize;
use serde_json::ser::{Formatter, Serializer};

use crate::error::CliError;

/// Containers nested deeper than this are printed compact, on their parent's line.
const MAX_INDENTED_DEPTH: usize = 32;

/// `value` as pretty JSON (two-space indent, as `serde_json::to_string_pretty`), as if it
/// were nested `depth` levels deep: an element of a top-level array is at depth 1.
pub fn pretty(value: &impl Serialize, depth: usize) -> Result<String, CliError> {
    let mut out = Vec::new();
    let formatter = Indented { depth, has_value: false };
    value.serialize(&mut Serializer::with_formatter(&mut out, formatter))?;
    let text = String::from_utf8(out)
        .map_err(|error| CliError::failure(format!("cannot write JSON: {error}")))?;
    Ok(terminal_safe(text))
}

/// `json` with the characters JSON allows raw in strings but a terminal acts on (DEL, C1
/// controls such as the one-byte CSI, bidirectional and zero-width formatting characters)
/// written as four-digit JSON escapes (`\u009b`): the same JSON value, nothing for the
/// terminal to act on.
/// (`serde_json` escapes the C0 controls itself; the line ends here are the indentation's.)
fn terminal_safe(json: String) -> String {
    if !json.chars().any(acts_on_terminal) {
        return json;
    }
    let mut safe = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if acts_on_terminal(c) {
            // every such character is in the Basic Multilingual Plane: one \u escape
            let _ = std::fmt::Write::write_fmt(&mut safe, format_args!("\\u{:04x}", u32::from(c)));
        } else {
            safe.push(c);
        }
    }
    safe
}

/// True for the characters the library's [`escape_wire_text`] escapes, the backslash and the
/// indentation's line ends apart.
fn acts_on_terminal(c: char) -> bool {
    if c.is_ascii() && !c.is_ascii_control() || c == '\\' || c == '\n' {
        return false;
    }
    matches!(escape_wire_text(c.encode_utf8(&mut [0; 4])), Cow::Owned(_))
}

/// `serde_json`'s pretty formatter, compact below [`MAX_INDENTED_DEPTH`].
struct Indented {
    /// How deep the container being written is.
    depth: usize,
    /// Whether the container being written has an element yet.
    has_value: bool,
}

impl Indented {
    /// Start a line for an element of the current container, unless it is printed compact.
    fn element<W: ?Sized + Write>(&self, writer: &mut W, first: bool) -> io::Result<()> {
        if !first {
            writer.write_all(b",")?;
        }
        self.indent(writer, self.depth)
    }

    fn indent<W: ?Sized + Write>(&self, writer: &mut W, depth: usize) -> io::Result<()> {
        if self.depth > MAX_INDENTED_DEPTH {
            return Ok(());
        }
        writer.write_all(b"\n")?;
        (0..depth).try_for_each(|_| writer.write_all(b"  "))
    }

    /// Close the current container (`]` or `}`).
    fn close<W: ?Sized + Write>(&mut self, writer: &mut W, bracket: &[u8]) -> io::Result<()> {
        if self.has_value {
            self.indent(writer, self.depth - 1)?;
        }
        self.depth -= 1;
        // the parent, which holds this container, has a value now
        self.has_value = true;
        writer.write_all(bracket)
    }

    fn open<W: ?Sized + Write>(&mut self, writer: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        writer.write_all(bracket)
    }
}

impl Formatter for Indented {
    fn begin_array<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open(writer, b"[")
    }

    fn end_array<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close(writer, b"]")
    }

    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.element(w, first)
    }

    fn end_array_value<W: ?Sized + Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open(writer, b"{")
    }

    fn end_object<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close(writer, b"}")
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.element(w, first)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    #[test]
    fn prints_as_serde_json_pretty() {
        let value = json!({"a": [1, {"b": null}, []], "c": {}, "d": "x"});
        let expected = serde_json::to_string_pretty(&value).unwrap();
        assert_eq!(pretty(&value, 0).unwrap(), expected);
        let element = pretty(&value, 1).unwrap();
        let array = format!("[\n  {element}\n]");
        assert_eq!(array, serde_json::to_string_pretty(&json!([value])).unwrap());
    }

    #[test]
    fn deep_values_are_compact_below_the_indented_depth() {
        let mut value = json!([]);
        for _ in 0..100 {
            value = json!([value]);
        }
        let text = pretty(&value, 0).unwrap();
        assert_eq!(text.lines().count(), 2 * MAX_INDENTED_DEPTH + 1, "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), value);
    }

    #[test]
    fn characters_a_terminal_acts_on_are_escaped() {
        let hostile = "\u{1b}[2J\u{7f}\u{9b}1m\u{85}\u{202e}\u{200b}\\é";
        let text = pretty(&json!({ "k": hostile }), 0).unwrap();
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
        assert!(text.contains("\\u009b") && text.contains("\\u202e"), "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["k"], hostile);
    }
}
