//! Validation of `AMQP_URI`: one broker URI, or a comma-separated list of the nodes of one
//! RabbitMQ cluster (same vhost, same credentials).

use std::num::{IntErrorKind, ParseIntError};
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use url::Url;

use super::error::{mask_uri, ConfigError};
use super::uri_list::entries;

const KEY: &str = "AMQP_URI";

/// The URI schemes `AMQP_URI` may use (`memory` is the in-process test broker).
const SCHEMES: [&str; 3] = ["amqp", "amqps", "memory"];

/// The start of an in-process broker's URI.
const MEMORY: &str = "memory://";

const EXPECTED: &str = "expected an amqp://, amqps:// or memory:// URI";

/// The query options of an `amqp://` or `amqps://` URI that the RabbitMQ transport reads
/// ([`read_broker`]); any other is named at start-up.
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
        return readable_by_the_transport(raw);
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
    readable_by_the_transport(raw)
}

/// Refuses what the RabbitMQ transport would refuse at connect ([`read_broker`]: no host,
/// port 0, a bad option), so that the start and `show-config` name `AMQP_URI` at once.
fn readable_by_the_transport(raw: &str) -> Result<(), ConfigError> {
    let entries = entries(raw);
    for (index, entry) in entries.iter().enumerate() {
        if memory_uri(entry).is_some() {
            continue;
        }
        if let Err(why) = read_broker(entry) {
            let reason = match entries.len() {
                1 => why,
                _ => format!("entry {} of {KEY}: {why}", index + 1),
            };
            return Err(ConfigError::new(KEY, raw, reason));
        }
    }
    Ok(())
}

/// `uri` as `memory://...` when its scheme is `memory` in any case, blanks around it
/// removed: the in-process broker's URI as validation reads it.
pub(crate) fn memory_uri(uri: &str) -> Option<String> {
    let uri = uri.trim();
    let (scheme, rest) = (uri.get(..MEMORY.len())?, uri.get(MEMORY.len()..)?);
    scheme.eq_ignore_ascii_case(MEMORY).then(|| format!("{MEMORY}{rest}"))
}

/// An `amqp://` or `amqps://` URI as the RabbitMQ transport connects to it.
pub(crate) struct Broker {
    /// `amqps://`.
    pub(crate) tls: bool,
    /// The host, without the brackets of an IPv6 address.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Decoded; `guest` when absent.
    pub(crate) username: String,
    /// Decoded; `guest` when absent.
    pub(crate) password: String,
    /// Decoded; `/` for an empty path.
    pub(crate) vhost: String,
    pub(crate) heartbeat: Option<u16>,
    pub(crate) frame_max: Option<u32>,
    pub(crate) channel_max: Option<u16>,
    /// Milliseconds, at least 1.
    pub(crate) connection_timeout: Option<u64>,
}

/// AMQP's smallest `frame_max` (0-9-1, 4.2.3): a broker refuses a connection proposing less.
const MIN_FRAME_MAX: u32 = 4096;

/// Reads one `amqp://` or `amqps://` URI; the reason it cannot be connected to otherwise.
/// Validation and the transport both read it here, so neither accepts what the other
/// refuses.
pub(crate) fn read_broker(uri: &str) -> Result<Broker, String> {
    let url = Url::parse(uri).map_err(|err| err.to_string())?;
    let tls = match url.scheme() {
        "amqp" => false,
        "amqps" => true,
        other => return Err(format!("unsupported scheme '{other}'")),
    };
    let host = match url.host_str() {
        Some(host) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']'),
        _ => return Err("has no host: write the broker's, e.g. amqp://localhost/".to_owned()),
    };
    let port = url.port().unwrap_or(if tls { 5671 } else { 5672 });
    if port == 0 {
        return Err("port 0: expected a port from 1 to 65535".to_owned());
    }
    let path = url.path().strip_prefix('/').unwrap_or(url.path());
    let vhost = if path.is_empty() { "/".to_owned() } else { decode(path) };
    if vhost.len() > 255 {
        // AMQP sends it as a short string; lapin would panic on a longer one.
        return Err(format!("vhost of {} bytes (AMQP allows at most 255 bytes)", vhost.len()));
    }
    let (username, password) = credentials(&url);
    let mut broker = Broker {
        tls,
        host: host.to_owned(),
        port,
        username,
        password,
        vhost,
        heartbeat: None,
        frame_max: None,
        channel_max: None,
        connection_timeout: None,
    };
    read_options(&url, &mut broker)?;
    Ok(broker)
}

/// Reads the options of [`READ_OPTIONS`] from the query of `url` into `broker`.
fn read_options(url: &Url, broker: &mut Broker) -> Result<(), String> {
    for (key, value) in url.query_pairs() {
        let value = value.as_ref();
        match key.as_ref() {
            "heartbeat" => broker.heartbeat = Some(number("heartbeat", value)?),
            "frame_max" => {
                let frame_max = number("frame_max", value)?;
                if (1..MIN_FRAME_MAX).contains(&frame_max) {
                    return Err(format!(
                        "frame_max {frame_max} is below AMQP's minimum of {MIN_FRAME_MAX}"
                    ));
                }
                broker.frame_max = Some(frame_max);
            }
            "channel_max" => broker.channel_max = Some(number("channel_max", value)?),
            "connection_timeout" => {
                let timeout = number("connection_timeout", value)?;
                if timeout == 0 {
                    // every attempt would time out at once, the broker up or not
                    return Err("connection_timeout=0: it must be at least 1 (milliseconds)".into());
                }
                broker.connection_timeout = Some(timeout);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The number `value` of the query option `what`. Too large for its field is an error: 0
/// means "off" (heartbeat) or "no limit" (frame_max, channel_max) in AMQP, so it must not
/// stand in for a number too big to send.
fn number<T: FromStr<Err = ParseIntError>>(what: &str, value: &str) -> Result<T, String> {
    value.parse::<T>().map_err(|error| match error.kind() {
        IntErrorKind::PosOverflow => format!("{what} {value} is too large for AMQP ({error})"),
        _ => format!("bad {what} '{value}'"),
    })
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
