//! `${VAR}` / `${VAR:default}` substitution in the string values of parsed configuration
//! files: never in their text, so a commented-out line is not read and a substituted value
//! (holding `#`, `"` or a leading `*`) cannot change the document around it.

use serde_json::Value;

use super::ConfigError;

/// Substitutes the references (see [`substitute`]) in every string of `value`, at any depth;
/// mapping keys and other scalars are kept.
///
/// # Errors
/// As [`substitute`].
pub(super) fn substitute_values(
    value: &mut Value,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        Value::String(text) => *text = substitute(text, lookup)?,
        Value::Array(items) => {
            for item in items {
                substitute_values(item, lookup)?;
            }
        }
        Value::Object(entries) => {
            for item in entries.values_mut() {
                substitute_values(item, lookup)?;
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// Replaces every `${NAME}` and `${NAME:default}` in `text` by `lookup(NAME)`, or by
/// `default` when `lookup` returns `None`.
///
/// `NAME` is an ASCII letter or `_` followed by letters, digits and `_`. The default runs
/// from the first `:` to the next `}`, so it may contain `:` but not `}`; references do not
/// nest. A variable that is set but empty gives the empty string, not the default. Text that
/// is not such a reference (a lone `$`, `${` without `}`, `${not a name}`) is kept as is.
///
/// # Errors
/// `${NAME}` without default whose variable `lookup` does not know: the error's key is
/// `NAME`.
fn substitute(text: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some((name, default, consumed)) = reference(after) else {
            out.push_str("${");
            rest = after;
            continue;
        };
        match (lookup(name), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                let reason =
                    format!("environment variable {name} is not set (used in config file)");
                return Err(ConfigError::new(name, "", reason));
            }
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses `NAME}` or `NAME:default}` at the start of `text` (just after `${`): the name,
/// the default and how many bytes the reference takes.
fn reference(text: &str) -> Option<(&str, Option<&str>, usize)> {
    let end = text.find('}')?;
    let inner = &text[..end];
    let (name, default) = match inner.split_once(':') {
        Some((name, default)) => (name, Some(default)),
        None => (inner, None),
    };
    is_variable_name(name).then_some((name, default, end + 1))
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

    fn lookup(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("rabbit".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn run(text: &str) -> String {
        match substitute(text, &lookup) {
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
        let err = substitute("a: ${NOPE}", &lookup).err();
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
