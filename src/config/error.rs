//! [`ConfigError`] and the masking of secrets in what the configuration shows.

use serde_json::Value;
use url::Url;

use super::uri_list::entries;

/// What a masked secret is replaced with.
const MASK: &str = "***";

/// Key names containing one of these (case-insensitively) hold secrets.
const SECRET_MARKERS: [&str; 3] = ["PASSWORD", "SECRET", "TOKEN"];

/// An invalid configuration value, or a configuration source that cannot be read.
///
/// Displays as `invalid config KEY="VALUE": REASON`, for example
/// `invalid config WORKER_MODE="fibers": expected one of thread, greedy_thread, process,
/// greedy_process`.
///
/// * `key` is the key as the source spelled it (`METRICS_PORT` from the environment,
///   `METRICS.PORT` from a file), the name of an environment variable used in a file,
///   or, for errors about a whole file, its path (`<yaml>` / `<toml>` for text).
/// * `value` is the raw value, with secrets masked when built by [`ConfigError::new`]:
///   the password of `AMQP_URI` (and of any URI in it) becomes `***`, and the whole value
///   of a key whose name contains `PASSWORD`, `SECRET` or `TOKEN` becomes `***`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config {key}=\"{value}\": {reason}")]
pub struct ConfigError {
    /// The offending key (or file path, or environment variable name).
    pub key: String,
    /// The offending raw value, secrets masked; empty when there is none.
    pub value: String,
    /// What is wrong, or what was expected.
    pub reason: String,
}

impl ConfigError {
    /// Builds an error, masking secrets in `value` (see [`ConfigError`]) and passwords of
    /// URIs quoted in `reason`.
    pub fn new(
        key: impl Into<String>,
        value: impl AsRef<str>,
        reason: impl AsRef<str>,
    ) -> ConfigError {
        let key = key.into();
        let raw = value.as_ref();
        let reason = mask_text(reason.as_ref());
        if is_secret_key(&key) {
            let value = if raw.is_empty() { String::new() } else { MASK.to_string() };
            let reason = mask_quoted(&reason, raw);
            return ConfigError { key, value, reason };
        }
        let value = if key == "AMQP_URI" { mask_uri(raw) } else { mask_text(raw) };
        ConfigError { key, value, reason }
    }
}

/// `reason` with what it quotes (a deserializer's `string "..."` or `` integer `...` ``) and
/// every occurrence of the secret `raw` masked: the reason of a secret's error must not show it.
fn mask_quoted(reason: &str, raw: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut chars = reason.chars();
    while let Some(c) = chars.next() {
        if !matches!(c, '"' | '`') {
            out.push(c);
            continue;
        }
        let mut escaped = false;
        for inner in chars.by_ref() {
            if inner == c && !escaped {
                break;
            }
            escaped = c == '"' && inner == '\\' && !escaped;
        }
        out.push_str(MASK);
    }
    // shorter values would mask pieces of words; only a quote could show them
    if raw.trim().len() < 4 {
        out
    } else {
        out.replace(raw.trim(), MASK)
    }
}

/// Replaces the password of a URI such as `amqp://user:password@host:5672/vhost` with `***`
/// (`amqp://user:***@host:5672/vhost`), and of every URI of a comma-separated list such as
/// `AMQP_URI` may hold; returns anything else unchanged.
///
/// The password is everything between the first `:` after `scheme://` (or the first `//`)
/// and the last `@`, so passwords that contain unescaped `@`, `/` or `:` are masked whole.
/// A URI without `user:password@` is returned as is. A list with an entry that is not a
/// whole URI (one that does not parse, such as `amqp://u:pa` cut from `amqp://u:pa,ss@h/`)
/// is masked as one URI: its entries may be pieces of a password that holds a comma.
///
/// ```
/// use micro_framework::config::mask_uri;
///
/// assert_eq!(mask_uri("amqps://svc:s3cr3t@mq:5671/prod"), "amqps://svc:***@mq:5671/prod");
/// assert_eq!(mask_uri("amqp://localhost"), "amqp://localhost");
/// assert_eq!(mask_uri("amqp://u:pw@a/, amqp://u:pw@b/"), "amqp://u:***@a/,amqp://u:***@b/");
/// ```
pub fn mask_uri(uri: &str) -> String {
    let entries = entries(uri);
    let not_a_uri =
        |entry: &&str| !entry.is_empty() && (!entry.contains("://") || Url::parse(entry).is_err());
    if entries.len() == 1 || entries.iter().any(not_a_uri) {
        return mask_one(uri);
    }
    entries.into_iter().map(mask_one).collect::<Vec<_>>().join(",")
}

/// [`mask_uri`] of a single URI.
fn mask_one(uri: &str) -> String {
    // `//` rather than `://`: a scheme-relative `//user:password@host` (a piece of a value
    // cut before its `:`) holds a password too.
    let Some(authority) = uri.find("//") else {
        return uri.to_string();
    };
    let start = authority + 2;
    let rest = &uri[start..];
    let Some(at) = rest.rfind('@') else {
        return uri.to_string();
    };
    let Some(colon) = rest[..at].find(':') else {
        return uri.to_string();
    };
    format!("{}{MASK}{}", &uri[..start + colon + 1], &rest[at..])
}

/// Whether values of `key` are secrets that are never shown.
pub(super) fn is_secret_key(key: &str) -> bool {
    let upper = key.to_ascii_uppercase();
    SECRET_MARKERS.iter().any(|marker| upper.contains(marker))
}

/// Masks the password of every URI in `text` (an error's reason, a value of free text).
///
/// A URI begins at a scheme that begins a word (`amqp://`, after a space, a quote, `=` or
/// the like) and runs to the next such URI: a password may hold quotes, spaces, `@` or `//`,
/// so nothing in it but the last `@` before the host can end it. A piece with no `@` is
/// joined to the next, which may hold the rest of its password. A URI whose first word is
/// whole and has no password (`amqp://mq:5672/`, a port of digits, then a path) ends at that
/// word, so the prose after it is left as it is; a text that has such a URI without a path
/// and then an `@` (`amqp://mq:5672 is down, mail ops@corp`) is masked a little too much,
/// never too little.
pub(super) fn mask_text(text: &str) -> String {
    let starts: Vec<usize> =
        text.match_indices("//").map(|(index, _)| index).filter(|&i| starts_uri(text, i)).collect();
    let Some(&first) = starts.first() else {
        return text.to_string();
    };
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..first]);
    let mut piece_start = first;
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(text.len());
        if end < text.len() && !text[start..end].contains('@') {
            continue;
        }
        out.push_str(&mask_piece(&text[piece_start..end]));
        piece_start = end;
    }
    out.push_str(&mask_piece(&text[piece_start..]));
    out
}

/// [`mask_uri`] of a piece of text that begins with a URI's `//`, but for the prose after a
/// first word that is a whole URI without a password.
fn mask_piece(piece: &str) -> String {
    let word_end = piece
        .char_indices()
        .find(|&(_, c)| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
        .map_or(piece.len(), |(index, _)| index);
    let word = &piece[..word_end];
    let authority =
        word.get(2..).and_then(|rest| rest.split_once('/')).map(|(authority, _)| authority);
    let no_password = authority.is_some_and(|authority| {
        !authority.contains('@')
            && authority
                .rsplit_once(':')
                .is_none_or(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
    });
    if word_end < piece.len() && no_password && !word.contains('@') {
        piece.to_string()
    } else {
        mask_uri(piece)
    }
}

/// Whether the `//` at `index` of `text` begins a URI's authority: at the start of the text,
/// after a scheme (`amqp:`) that begins a word, or at the start of a word (`dsn=//u:p@h/`)
/// when a `user:...@` follows it in that word, or after any `:` when a `user:` word follows
/// it and an `@` comes later. Any other `//` may be inside a password.
fn starts_uri(text: &str, index: usize) -> bool {
    if index == 0 {
        return true;
    }
    let begins_word = |c: char| {
        c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '=' | '(' | '[' | '<' | ',' | ';')
    };
    // `//user:password@`: a password, masked whatever precedes it (a typo before a scheme,
    // `~amqp://`, `0amqp://`, makes it no URI, but the password is one)
    let word = text[index + 2..].split(char::is_whitespace).next().unwrap_or_default();
    if word.find('@').is_some_and(|at| word[..at].contains(':')) {
        return true;
    }
    let Some(before) = text[..index].strip_suffix(':') else {
        return false;
    };
    // `?://user:pass word@`: a first word without `@` with a `:` before any `/`, and an `@`
    // further on, may be a password holding a blank; masked whatever the scheme looks like (a
    // typo, `~amqp`, `0postgres`), as masking a little too much is better than showing a
    // password
    if !word.contains('@')
        && word.find(':').is_some_and(|colon| !word[..colon].contains('/'))
        && text[index + 2..].contains('@')
    {
        return true;
    }
    let scheme_start = before
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-')))
        .map_or(0, |index| index + 1);
    let scheme = &before[scheme_start..];
    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && before[..scheme_start].chars().next_back().is_none_or(begins_word)
}

/// A copy of `value` (found under `key`) with secrets masked: everything under a secret key
/// name, and URI passwords in strings.
pub(super) fn mask_json(key: &str, value: &Value) -> Value {
    match value {
        Value::Null => Value::Null,
        _ if is_secret_key(key) => Value::String(MASK.to_string()),
        // a broker's address given as a mapping may hold its password under any name
        Value::Object(_) if key == "AMQP_URI" => Value::String(MASK.to_string()),
        Value::String(text) => Value::String(mask_text(text)),
        Value::Array(items) => {
            Value::Array(items.iter().map(|item| mask_json(key, item)).collect())
        }
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), mask_json(k, v))).collect())
        }
        Value::Bool(_) | Value::Number(_) => value.clone(),
    }
}

/// The text of a raw value under `key` as an error shows it: strings as they are (the error
/// masks them), anything else as JSON with its secrets masked (see [`mask_json`]).
pub(super) fn raw_text(key: &str, value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => mask_json(key, other).to_string(),
    }
}
