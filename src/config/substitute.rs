//! `${VAR}` / `${VAR:default}` substitution in the string values of parsed configuration
//! files: never in their text, so a commented-out line is not read and a substituted value
//! (holding `#`, `"` or a leading `*`) cannot change the document around it.

use serde_json::Value;

use super::ConfigError;

/// Substitutes the references (see [`substitute`]) in every string of `value`, found under
/// `key`, at any depth; mapping keys and other scalars are kept.
///
/// # Errors
/// As [`substitute`]; an entry of a nested mapping is named `KEY.NAME`.
pub(super) fn substitute_values(
    value: &mut Value,
    key: &str,
    lookup: &impl Fn(&str) -> Result<Option<String>, ConfigError>,
) -> Result<(), ConfigError> {
    match value {
        Value::String(text) => *text = substitute(text, key, lookup)?,
        Value::Array(items) => {
            for item in items {
                substitute_values(item, key, lookup)?;
            }
        }
        Value::Object(entries) => {
            for (name, item) in entries.iter_mut() {
                substitute_values(item, &format!("{key}.{name}"), lookup)?;
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// Replaces every `${NAME}` and `${NAME:default}` in `text` (the value of `key`) by
/// `lookup(NAME)`, or by `default` when `lookup` returns `None`.
///
/// `NAME` is an ASCII letter or `_` followed by letters, digits and `_`. The default runs
/// from the first `:` to the `}` that closes the reference, braces inside it matched in
/// pairs, so it may hold `:` and references of its own (`${A:${B:x}}`), substituted when the
/// default is used, as Nameko (with its `regex` module) reads them. A variable that is set
/// but empty gives the empty string, not the default. Text that is not such a reference (a
/// lone `$`, `${` not followed by a name, `${not a name}`) is kept as is.
///
/// # Errors
/// `lookup`'s error (a variable set but not UTF-8); `${NAME}` without default whose
/// variable `lookup` does not know: the error's key is `NAME`. A reference without its
/// closing `}`: the error's key is `key`.
pub(super) fn substitute(
    text: &str,
    key: &str,
    lookup: &impl Fn(&str) -> Result<Option<String>, ConfigError>,
) -> Result<String, ConfigError> {
    substitute_nested(text, key, lookup, 0)
}

/// References nested deeper than this in defaults are refused: each level is a call, and a
/// value nested without end would overflow the stack.
const MAX_NESTING: usize = 16;

/// [`substitute`] of `text`, itself the default of `nesting` references.
fn substitute_nested(
    text: &str,
    key: &str,
    lookup: &impl Fn(&str) -> Result<Option<String>, ConfigError>,
    nesting: usize,
) -> Result<String, ConfigError> {
    if nesting > MAX_NESTING {
        let reason = format!("nests references more than {MAX_NESTING} deep in their defaults");
        return Err(ConfigError::new(key, "", reason));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match reference(after) {
            Reference::Not => {
                out.push_str("${");
                rest = after;
            }
            Reference::Unclosed => {
                let reason = "has a `${` without its closing `}`: a reference is ${VAR} or \
                              ${VAR:default}, with the braces of a default in pairs";
                return Err(ConfigError::new(key, "", reason));
            }
            Reference::Found { name, default, length } => {
                out.push_str(&resolve(name, default, key, lookup, nesting)?);
                rest = &after[length..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of the reference to `name`: the variable's, else its default, itself
/// substituted (read only when used, so an unset variable in the default of a set one is no
/// error).
fn resolve(
    name: &str,
    default: Option<&str>,
    key: &str,
    lookup: &impl Fn(&str) -> Result<Option<String>, ConfigError>,
    nesting: usize,
) -> Result<String, ConfigError> {
    match (lookup(name)?, default) {
        (Some(value), _) => Ok(value),
        (None, Some(default)) => substitute_nested(default, key, lookup, nesting + 1),
        (None, None) => {
            let reason = format!("environment variable {name} is not set (used in config file)");
            Err(ConfigError::new(name, "", reason))
        }
    }
}

/// What follows a `${`.
enum Reference<'a> {
    /// No variable name: the text is kept as is.
    Not,
    /// A name, then no closing `}`.
    Unclosed,
    /// `NAME}` or `NAME:default}`, taking `length` bytes.
    Found { name: &'a str, default: Option<&'a str>, length: usize },
}

/// Parses `NAME}` or `NAME:default}` at the start of `text` (just after `${`).
fn reference(text: &str) -> Reference<'_> {
    let name_end =
        text.find(|c: char| !(c == '_' || c.is_ascii_alphanumeric())).unwrap_or(text.len());
    let name = &text[..name_end];
    if !is_variable_name(name) {
        return Reference::Not;
    }
    let after_name = &text[name_end..];
    match after_name.chars().next() {
        Some('}') => Reference::Found { name, default: None, length: name_end + 1 },
        Some(':') => match closing_brace(&after_name[1..]) {
            Some(end) => Reference::Found {
                name,
                default: Some(&after_name[1..1 + end]),
                length: name_end + end + 2,
            },
            None => Reference::Unclosed,
        },
        None => Reference::Unclosed,
        Some(_) => Reference::Not,
    }
}

/// Where the `}` that ends a default is in `text`, the `{` and `}` before it in pairs.
fn closing_brace(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (index, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(index),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Whether `name` can name an environment variable in a reference.
fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::substitute;
    use crate::config::ConfigError;

    fn lookup(name: &str) -> Result<Option<String>, ConfigError> {
        Ok(match name {
            "HOST" => Some("rabbit".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        })
    }

    fn run(text: &str) -> String {
        match substitute(text, "KEY", &lookup) {
            Ok(out) => out,
            Err(err) => panic!("substitution of {text:?} failed: {err}"),
        }
    }

    #[test]
    fn set_variable_is_replaced() {
        assert_eq!(run("a ${HOST} b ${HOST:other}"), "a rabbit b rabbit");
    }

    #[test]
    fn unset_variable_takes_its_default() {
        assert_eq!(run("x: ${PORT:5672}"), "x: 5672");
        assert_eq!(run("x: '${PORT:}'"), "x: ''");
    }

    #[test]
    fn default_is_split_at_the_first_colon() {
        assert_eq!(
            run("${AMQP_URI:amqp://guest:guest@localhost:5672/}"),
            "amqp://guest:guest@localhost:5672/"
        );
    }

    #[test]
    fn set_but_empty_variable_is_empty() {
        assert_eq!(run("[${EMPTY:default}]"), "[]");
    }

    #[test]
    fn unset_variable_without_default_is_an_error() {
        let err = substitute("a: ${NOPE}", "KEY", &lookup).err();
        let err = err.map(|err| (err.key.clone(), err.to_string()));
        assert_eq!(
            err,
            Some((
                "NOPE".to_string(),
                "invalid config NOPE=\"\": environment variable NOPE is not set \
                 (used in config file)"
                    .to_string()
            ))
        );
    }

    #[test]
    fn non_references_are_kept() {
        assert_eq!(run("cost: $5, ${ unterminated"), "cost: $5, ${ unterminated");
        assert_eq!(run("${1X} ${a b} $HOST ${}"), "${1X} ${a b} $HOST ${}");
        assert_eq!(run("$${HOST}"), "$rabbit");
        assert_eq!(run("ünïcode ${HOST}é"), "ünïcode rabbité");
    }
}
