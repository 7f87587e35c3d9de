//! Exchanges, their bindings and how they match routing keys and headers.

use std::collections::HashSet;

use crate::transport::{ExchangeKind, ExchangeSpec, HeaderValue, Headers, TransportError};

/// A declared exchange and its queue bindings.
#[derive(Debug)]
pub(super) struct Exchange {
    /// The declaration (with a normalised kind).
    pub spec: ExchangeSpec,
    /// Queue bindings, in declaration order.
    pub bindings: Vec<Binding>,
    /// The queue and key of each binding: a binding is looked for among those of its queue
    /// and key only, where a scan of all of them made declaring thousands of routes on one
    /// exchange take time quadratic in their number.
    pairs: HashSet<(String, String)>,
    /// Whether it ever had a binding (auto-delete only fires after the first one).
    pub had_binding: bool,
    /// For an `x-delayed-message` exchange, the kind it routes like (its `x-delayed-type`).
    pub delayed: Option<ExchangeKind>,
}

/// One queue binding of an exchange.
#[derive(Debug)]
pub(super) struct Binding {
    /// The bound queue.
    pub queue: String,
    /// Routing key or topic pattern.
    pub key: String,
    /// The topic pattern split into words, with runs of `#` collapsed.
    pub words: Vec<String>,
    /// Binding arguments (headers exchanges).
    pub arguments: Headers,
}

impl Binding {
    /// A binding of `queue` with `key`.
    pub fn new(queue: &str, key: &str, arguments: Headers) -> Self {
        let mut words: Vec<String> = Vec::new();
        for word in split_key(key) {
            if !(word == "#" && words.last().is_some_and(|last| last == "#")) {
                words.push(word.to_owned());
            }
        }
        Binding { queue: queue.to_owned(), key: key.to_owned(), words, arguments }
    }
}

/// Maps a declared kind onto the built-in kinds when a `Custom` name is one of them.
pub(super) fn normalize_kind(kind: &ExchangeKind) -> Result<ExchangeKind, TransportError> {
    match kind.as_str() {
        "direct" => Ok(ExchangeKind::Direct),
        "fanout" => Ok(ExchangeKind::Fanout),
        "topic" => Ok(ExchangeKind::Topic),
        "headers" => Ok(ExchangeKind::Headers),
        other => Err(TransportError::Broker {
            code: 503,
            text: format!("COMMAND_INVALID - unknown exchange type '{other}'"),
        }),
    }
}

/// Splits a routing key into dot-separated words; the empty key has no words.
pub(super) fn split_key(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

impl Exchange {
    /// A new exchange without bindings, declared as `spec` (its kind normalised), routing
    /// like `delayed` when it is an `x-delayed-message` exchange.
    pub fn new(spec: ExchangeSpec, delayed: Option<ExchangeKind>) -> Self {
        Exchange { spec, bindings: Vec::new(), pairs: HashSet::new(), had_binding: false, delayed }
    }

    /// Bind `queue` with `key` and `arguments`, unless it is bound so already.
    pub fn bind(&mut self, queue: &str, key: &str, arguments: &Headers) {
        let pair = (queue.to_owned(), key.to_owned());
        // the same queue and key again (or bound with other arguments, on a headers
        // exchange): rare, so the scan
        let same = |existing: &Binding| {
            existing.queue == queue && existing.key == key && existing.arguments == *arguments
        };
        if self.pairs.contains(&pair) && self.bindings.iter().any(same) {
            return;
        }
        self.pairs.insert(pair);
        self.bindings.push(Binding::new(queue, key, arguments.clone()));
        self.had_binding = true;
    }

    /// Drop the bindings of `queue`; true if it had any.
    pub fn unbind_queue(&mut self, queue: &str) -> bool {
        let before = self.bindings.len();
        self.bindings.retain(|binding| binding.queue != queue);
        self.pairs.retain(|(bound, _)| bound != queue);
        self.bindings.len() != before
    }

    /// The kind its bindings match like.
    pub fn routes_like(&self) -> &ExchangeKind {
        self.delayed.as_ref().unwrap_or(&self.spec.kind)
    }

    /// Appends the queues this exchange routes a message to (possibly with duplicates).
    pub fn route(&self, key: &str, headers: &Headers, out: &mut Vec<String>) {
        let kind = self.routes_like();
        let key_words = if *kind == ExchangeKind::Topic { split_key(key) } else { Vec::new() };
        for binding in &self.bindings {
            let matched = match kind {
                ExchangeKind::Direct => binding.key == key,
                ExchangeKind::Fanout => true,
                ExchangeKind::Topic => topic_matches(&binding.words, &key_words),
                ExchangeKind::Headers => headers_match(&binding.arguments, headers),
                ExchangeKind::Custom(_) => false,
            };
            if matched {
                out.push(binding.queue.clone());
            }
        }
    }
}

/// Whether a topic pattern (split into words) matches a routing key (split into words), in
/// time bounded by their product: a backtracking match took time exponential in the `#`s of
/// a pattern, for a key any publisher chooses, under the broker's lock.
pub(super) fn topic_matches<P: AsRef<str>>(pattern: &[P], key: &[&str]) -> bool {
    // matched[j]: the pattern's words so far match the key's first j words
    let mut matched = vec![false; key.len() + 1];
    matched[0] = true;
    for word in pattern {
        let word = word.as_ref();
        let mut next = vec![false; key.len() + 1];
        if word == "#" {
            // zero or more words
            let mut reached = false;
            for (next, matched) in next.iter_mut().zip(&matched) {
                reached |= *matched;
                *next = reached;
            }
        } else {
            for (j, key_word) in key.iter().enumerate() {
                next[j + 1] = matched[j] && (word == "*" || *key_word == word);
            }
        }
        matched = next;
    }
    matched[key.len()]
}

/// Validates the `x-match` argument of a headers-exchange binding.
pub(super) fn check_x_match(arguments: &Headers) -> Result<(), TransportError> {
    match arguments.get("x-match") {
        None => Ok(()),
        Some(HeaderValue::String(mode))
            if matches!(mode.as_str(), "all" | "any" | "all-with-x" | "any-with-x") =>
        {
            Ok(())
        }
        Some(other) => Err(TransportError::PreconditionFailed(format!(
            "Invalid x-match field value {other:?}; expected all, any, all-with-x, or any-with-x"
        ))),
    }
}

/// Whether a headers-exchange binding matches the message headers (RabbitMQ semantics:
/// `x-match` is `all` (default), `any`, `all-with-x` or `any-with-x`; `x-` keys of the
/// binding are ignored unless `-with-x`; a void binding value only requires presence).
pub(super) fn headers_match(binding: &Headers, headers: &Headers) -> bool {
    let mode = binding.get("x-match").and_then(HeaderValue::as_str).unwrap_or("all");
    let with_x = mode.ends_with("-with-x");
    let any = mode.starts_with("any");
    let mut criteria = binding
        .iter()
        .filter(|(key, _)| key.as_str() != "x-match" && (with_x || !key.starts_with("x-")))
        .map(|(key, expected)| match (expected, headers.get(key)) {
            (_, None) => false,
            (HeaderValue::Void, Some(_)) => true,
            (expected, Some(actual)) => expected == actual,
        });
    if any {
        criteria.any(|matched| matched)
    } else {
        criteria.all(|matched| matched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, key: &str) -> bool {
        topic_matches(&Binding::new("q", pattern, Headers::new()).words, &split_key(key))
    }

    #[test]
    fn topic_wildcards() {
        assert!(matches("a.#", "a"));
        assert!(matches("a.#", "a.b"));
        assert!(matches("a.#", "a.b.c"));
        assert!(!matches("a.#", "b.a"));
        assert!(matches("#.c", "c"));
        assert!(matches("#.c", "a.b.c"));
        assert!(!matches("#.c", "c.a"));
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*.c", "a.c"));
        assert!(!matches("a.*.c", "a.b.b.c"));
        assert!(matches("*", "a"));
        assert!(!matches("*", ""));
        assert!(!matches("*", "a.b"));
        assert!(matches("#", ""));
        assert!(matches("#", "a.b.c"));
        assert!(matches("", ""));
        assert!(!matches("", "a"));
        assert!(matches("a.#.#.c", "a.c"));
        assert!(matches("#.b.#", "a.b.c"));
        assert!(matches("*.#", "a"));
        assert!(!matches("*.*", "a"));
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.bb"));
    }

    #[test]
    fn a_pattern_of_many_hashes_is_matched_without_backtracking() {
        // `#.a` ten times and a word the key lacks, against 60 words: a backtracking match
        // did not end (any publisher chooses the key, and routing holds the broker's lock)
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pattern = format!("{}#.z", "#.a.".repeat(10));
            let key = vec!["a"; 60].join(".");
            let _ = done.send((matches(&pattern, &key), matches(&pattern, &format!("{key}.z"))));
        });
        let limit = std::time::Duration::from_secs(60);
        let outcome = finished.recv_timeout(limit).expect("the match ended");
        assert_eq!(outcome, (false, true));
    }

    #[test]
    fn headers_matching() {
        let mut headers = Headers::new();
        headers.insert("format".into(), "pdf".into());
        headers.insert("type".into(), "report".into());
        let mut all = Headers::new();
        all.insert("format".into(), "pdf".into());
        all.insert("type".into(), "report".into());
        assert!(headers_match(&all, &headers));
        all.insert("type".into(), "log".into());
        assert!(!headers_match(&all, &headers));
        all.insert("x-match".into(), "any".into());
        assert!(headers_match(&all, &headers));
        let mut presence = Headers::new();
        presence.insert("format".into(), HeaderValue::Void);
        assert!(headers_match(&presence, &headers));
        assert!(!headers_match(&presence, &Headers::new()));
    }
}
