//! Validation of `AMQP_URI`: one broker URI, or a comma-separated list of the nodes of one
//! RabbitMQ cluster (same vhost, same credentials).

use percent_encoding::percent_decode_str;
use url::Url;

use super::error::{mask_uri, ConfigError};
use super::uri_list::entries;

const KEY: &str = "AMQP_URI";

/// The URI schemes `AMQP_URI` may use (`memory` is the in-process test broker).
const SCHEMES: [&str; 3] = ["amqp", "amqps", "memory"];

const EXPECTED: &str = "expected an amqp://, amqps:// or memory:// URI";

/// The query options of an `amqp://` or `amqps://` URI that the RabbitMQ transport reads
/// (`transport::rabbitmq::uri`); any other is named at start-up.
pub(crate) const READ_OPTIONS: [&str; 4] =
    ["heartbeat", "frame_max", "channel_max", "connection_timeout"];

/// The query options of the `amqp://` and `amqps://` entries of `raw` that nothing reads
/// (kombu's `ssl`, a misspelt `heartbeet`), each once, in order.
pub(super) fn unused_options(raw: &str) -> Vec<String> {
    let mut unused: Vec<String> = Vec::new();
    for url in entries(raw).into_iter().filter_map(|entry| parse(entry).ok()) {
        if url.scheme() == "memory" {
            continue; // the in-process broker refuses its unknown options itself
        }
        for (key, _) in url.query_pairs() {
            if !READ_OPTIONS.contains(&key.as_ref()) && !unused.iter().any(|seen| *seen == key) {
                unused.push(key.into_owned());
            }
        }
    }
    unused
}

/// The RabbitMQ entries of `raw` (`amqp://`, `amqps://`), parsed.
fn broker_entries(raw: &str) -> Vec<Url> {
    let parsed = entries(raw).into_iter().filter_map(|entry| parse(entry).ok());
    parsed.filter(|url| url.scheme() != "memory").collect()
}

/// Whether an entry of `raw` asks for heartbeats off: `?heartbeat=0`, or no `heartbeat`
/// option where `AMQP_HEARTBEAT` (`key`) is 0.
pub(super) fn asks_heartbeats_off(raw: &str, key: u16) -> bool {
    broker_entries(raw).iter().any(|url| {
        let option = url.query_pairs().find(|(name, _)| name == "heartbeat");
        match option {
            Some((_, value)) => value.trim() == "0",
            None => key == 0,
        }
    })
}

/// Whether `raw` names a RabbitMQ node without TLS (`amqp://`).
pub(super) fn has_plain_entries(raw: &str) -> bool {
    broker_entries(raw).iter().any(|url| url.scheme() == "amqp")
}

/// Checks `raw`, the value of `AMQP_URI`. Errors name the offending entry by its number and
/// show it with its password masked.
pub(super) fn validate(raw: &str) -> Result<(), ConfigError> {
    if raw.trim().is_empty() {
        let reason = format!("is empty: {EXPECTED}, or a comma-separated list of them");
        return Err(ConfigError::new(KEY, raw, reason));
    }
    let entries = entries(raw);
    if entries.len() == 1 {
        parse(raw).map_err(|reason| ConfigError::new(KEY, raw, reason.text("")))?;
        return no_zero_connection_timeout(raw);
    }
    // Every entry is checked to be there and to look like a URI before any is shown: with
    // a comma in a password, the first piece would show the start of the password.
    for (index, entry) in entries.iter().enumerate() {
        let number = index + 1;
        if entry.is_empty() {
            return Err(ConfigError::new(KEY, raw, format!("entry {number} of {KEY} is empty")));
        }
        if !entry.contains("://") {
            let reason = format!(
                "entry {number} of {KEY} is not a URI ({EXPECTED}; commas separate the \
                 entries, so write a comma in a user name or password as %2C)"
            );
            return Err(ConfigError::new(KEY, raw, reason));
        }
    }
    let mut urls = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let url = parse(entry).map_err(|why| {
            let number = index + 1;
            let subject = match shown(entry) {
                Some(masked) => format!("entry {number} of {KEY} ({masked}) "),
                None => format!("entry {number} of {KEY} "),
            };
            ConfigError::new(KEY, raw, why.text(&subject))
        })?;
        urls.push(url);
    }
    same_cluster(&entries, &urls).map_err(|reason| ConfigError::new(KEY, raw, reason))?;
    no_zero_connection_timeout(raw)
}

/// Refuses `?connection_timeout=0`: every connection attempt would time out at once, the
/// broker up or not, and the service wait for it for ever.
fn no_zero_connection_timeout(raw: &str) -> Result<(), ConfigError> {
    for url in broker_entries(raw) {
        let timeout = url.query_pairs().find(|(name, _)| name == "connection_timeout");
        if timeout.is_some_and(|(_, value)| value.trim().parse::<u64>() == Ok(0)) {
            let reason = "connection_timeout=0: it must be at least 1 (milliseconds)";
            return Err(ConfigError::new(KEY, raw, reason));
        }
    }
    Ok(())
}

/// `entry`, masked, when showing it cannot show a piece of a password. An entry that does
/// not parse may be the start of a URI whose password holds a comma (`amqp://u:pa` of
/// `amqp://u:pa,ss@h/`): unless its password is masked, or it has no `:` after `://` to
/// start one, it is not shown.
fn shown(entry: &str) -> Option<String> {
    let masked = mask_uri(entry);
    let may_hold_a_password = entry.split_once("://").is_some_and(|(_, rest)| rest.contains(':'));
    (masked != entry || !may_hold_a_password).then_some(masked)
}

/// Why a URI is refused.
enum Refused {
    /// It does not parse, for this reason; and whether a `/`, `?` or `#` comes before its
    /// last `@`, which makes the likely cause an unencoded delimiter in the password.
    Invalid(url::ParseError, bool),
    /// Its scheme is none of [`SCHEMES`], or it has no `//`.
    Scheme,
}

impl Refused {
    /// The reason, after `subject` (empty, or the entry named with a trailing space).
    fn text(&self, subject: &str) -> String {
        match self {
            Refused::Invalid(err, false) => {
                format!("{subject}is not a valid URI ({err}): {EXPECTED}")
            }
            Refused::Invalid(err, true) => format!(
                "{subject}is not a valid URI ({err}): {EXPECTED} (a `/`, `?` or `#` in the user \
                 name or password is written %2F, %3F or %23)"
            ),
            Refused::Scheme if subject.is_empty() => EXPECTED.to_string(),
            Refused::Scheme => format!("{subject}has another scheme: {EXPECTED}"),
        }
    }
}

/// Parses one URI of an accepted scheme.
fn parse(uri: &str) -> Result<Url, Refused> {
    let url = Url::parse(uri).map_err(|err| Refused::Invalid(err, delimiter_in_userinfo(uri)))?;
    if url.cannot_be_a_base() || !SCHEMES.contains(&url.scheme()) {
        return Err(Refused::Scheme);
    }
    Ok(url)
}

/// Whether a `/`, `?` or `#` comes before the last `@` after `://`: the URI parser ends the
/// user name and password there, and reads what comes before as host and port.
fn delimiter_in_userinfo(uri: &str) -> bool {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    rest.rfind('@').is_some_and(|at| rest[..at].contains(['/', '?', '#']))
}

/// Checks that the entries of a list can be nodes of one cluster: all RabbitMQ, with the
/// first one's vhost (queues live in one vhost) and credentials (users are cluster-wide).
fn same_cluster(entries: &[&str], urls: &[Url]) -> Result<(), String> {
    let in_memory = urls.iter().filter(|url| url.scheme() == "memory").count();
    if in_memory > 1 {
        return Err(format!(
            "{KEY} lists {in_memory} memory:// brokers: a service uses one in-process broker"
        ));
    }
    if in_memory == 1 {
        return Err(format!(
            "{KEY} mixes memory:// with amqp:// or amqps:// nodes: the in-process broker cannot \
             be listed with RabbitMQ nodes"
        ));
    }
    let (first, others) = urls.split_first().ok_or_else(|| format!("{KEY} is empty"))?;
    for (index, url) in others.iter().enumerate() {
        let number = index + 2;
        let masked = mask_uri(entries[index + 1]);
        if vhost(url) != vhost(first) {
            return Err(format!(
                "entry {number} of {KEY} ({masked}) has vhost {:?}, entry 1 has {:?}: queues live \
                 in one vhost, so every entry names the same one",
                vhost(url),
                vhost(first)
            ));
        }
        if credentials(url) != credentials(first) {
            return Err(format!(
                "entry {number} of {KEY} ({masked}) has other credentials than entry 1: users \
                 are cluster-wide, so every entry has the same user name and password"
            ));
        }
    }
    Ok(())
}

/// The vhost a URI names, as the broker sees it (decoded; an empty path is `/`).
fn vhost(url: &Url) -> String {
    let path = url.path().strip_prefix('/').unwrap_or(url.path());
    if path.is_empty() {
        "/".to_string()
    } else {
        decode(path)
    }
}

/// The user name and password a URI logs in with (`guest` for each when absent).
fn credentials(url: &Url) -> (String, String) {
    let user = match url.username() {
        "" => "guest".to_string(),
        name => decode(name),
    };
    (user, url.password().map_or_else(|| "guest".to_string(), decode))
}

fn decode(part: &str) -> String {
    percent_decode_str(part).decode_utf8_lossy().into_owned()
}
