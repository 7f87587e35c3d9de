//! AMQP URI parsing and password masking.

use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};

use crate::transport::TransportError;

use crate::config::amqp_uri::read_broker;
pub(crate) use crate::config::mask_uri;
use crate::config::uri_list::entries;

/// The `frame_max` proposed to the broker when the URI sets none (`?frame_max=N` proposes
/// another): RabbitMQ's default, so that on a broker left at its default the negotiated
/// value is the broker's, as it would be with no proposal. lapin sizes its two buffers per
/// connection (32 frames each) from the proposal: proposed, they are allocated once at 4 MiB
/// as zeroed pages the kernel maps on first write (so a quiet connection keeps most of them
/// out of memory); unproposed, they start at 32 frames of 4 KiB and are grown and
/// zero-filled once the broker's value is known, which made 7.5 MiB resident at once. A
/// broker configured with a bigger `frame_max` gets this one (the smaller value wins).
pub(crate) const DEFAULT_FRAME_MAX: u32 = 131_072;

/// Remove every occurrence of `password` from `text` (defence in depth for broker messages).
pub(crate) fn scrub(text: &str, password: &str) -> String {
    if password.len() < 3 {
        text.to_owned()
    } else {
        text.replace(password, "***")
    }
}

/// A parsed broker address (`Debug` shows the masked URI only).
#[derive(Clone)]
pub(crate) struct BrokerUri {
    /// What lapin connects to.
    pub(crate) amqp: AMQPUri,
    /// The URI with its password masked.
    pub(crate) masked: String,
    /// `host:port` of the node (`[host]:port` for an IPv6 address).
    pub(crate) node: String,
}

impl std::fmt::Debug for BrokerUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUri").field("uri", &self.masked).finish_non_exhaustive()
    }
}

fn invalid(masked: &str, why: impl std::fmt::Display) -> TransportError {
    TransportError::InvalidUri(format!("invalid broker URI '{masked}': {why}"))
}

/// Built without the `tls` feature, there is no TLS to speak `amqps://` with: refuse it
/// (a permanent error, like any invalid URI) rather than fail obscurely in the handshake.
#[cfg(not(feature = "tls"))]
pub(crate) fn refuse_tls(uri: &BrokerUri) -> Result<(), TransportError> {
    match uri.amqp.scheme {
        AMQPScheme::AMQPS => Err(invalid(
            &uri.masked,
            "amqps:// needs TLS, but micro-framework was built without the `tls` feature",
        )),
        AMQPScheme::AMQP => Ok(()),
    }
}

/// Parse one URI or a comma-separated list of them (the nodes of a cluster; see
/// [`crate::config::Config::amqp_uris`]), each as [`parse_uri`] does.
pub(crate) fn parse_uris(uris: &str, heartbeat: u16) -> Result<Vec<BrokerUri>, TransportError> {
    let entries = entries(uris);
    if entries.len() == 1 {
        return Ok(vec![parse_uri(uris, heartbeat)?]);
    }
    let masked = mask_uri(uris);
    // Every entry is checked before any is shown: with a comma in a password, the first
    // piece would show the start of the password.
    for (index, entry) in entries.iter().enumerate() {
        if entry.is_empty() {
            return Err(invalid(&masked, format!("entry {} of the list is empty", index + 1)));
        }
        if !entry.contains("://") {
            return Err(invalid(&masked, format!("entry {} of the list is not a URI", index + 1)));
        }
    }
    let parse = |(index, entry): (usize, &str)| {
        parse_uri(entry, heartbeat).map_err(|error| match error {
            TransportError::InvalidUri(why) => {
                TransportError::InvalidUri(format!("entry {} of the list: {why}", index + 1))
            }
            other => other,
        })
    };
    entries.into_iter().enumerate().map(parse).collect()
}

/// Parse `amqp://user:pass@host:port/vhost?heartbeat=N` as validation reads it
/// ([`read_broker`]). `heartbeat` from the query wins over `heartbeat`; `frame_max` from the
/// query over [`DEFAULT_FRAME_MAX`].
pub(crate) fn parse_uri(uri: &str, heartbeat: u16) -> Result<BrokerUri, TransportError> {
    let masked = mask_uri(uri);
    let broker = read_broker(uri).map_err(|why| invalid(&masked, why))?;
    let query = AMQPQueryString {
        heartbeat: Some(broker.heartbeat.unwrap_or(heartbeat)),
        frame_max: Some(broker.frame_max.unwrap_or(DEFAULT_FRAME_MAX)),
        channel_max: broker.channel_max,
        connection_timeout: broker.connection_timeout,
        ..AMQPQueryString::default()
    };
    let node = match broker.host.contains(':') {
        true => format!("[{}]:{}", broker.host, broker.port),
        false => format!("{}:{}", broker.host, broker.port),
    };
    let amqp = AMQPUri {
        scheme: if broker.tls { AMQPScheme::AMQPS } else { AMQPScheme::AMQP },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo { username: broker.username, password: broker.password },
            host: broker.host,
            port: broker.port,
        },
        vhost: broker.vhost,
        query,
    };
    Ok(BrokerUri { amqp, masked, node })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_password() {
        assert_eq!(mask_uri("amqp://bob:s3cr3t@host:5672/%2f"), "amqp://bob:***@host:5672/%2f");
        assert_eq!(mask_uri("amqps://bob:p@ss@host/"), "amqps://bob:***@host/");
        assert_eq!(mask_uri("amqp://host:5672/"), "amqp://host:5672/");
        assert_eq!(mask_uri("amqp://bob@host/"), "amqp://bob@host/");
    }

    #[test]
    fn parses_full_uri() {
        let parsed = parse_uri("amqps://u%40x:p%2Fw@rabbit:5999/%2fprod?heartbeat=7", 60).unwrap();
        assert_eq!(parsed.amqp.scheme, AMQPScheme::AMQPS);
        assert_eq!(parsed.amqp.authority.userinfo.username, "u@x");
        assert_eq!(parsed.amqp.authority.userinfo.password, "p/w");
        assert_eq!(parsed.amqp.authority.host, "rabbit");
        assert_eq!(parsed.amqp.authority.port, 5999);
        assert_eq!(parsed.amqp.vhost, "/prod");
        assert_eq!(parsed.amqp.query.heartbeat, Some(7));
        assert!(!parsed.masked.contains("p%2Fw"));
    }

    #[test]
    fn parses_lists_and_names_nodes() {
        let list = parse_uris("amqp://u:pw@a:5681/, amqps://u:pw@[::1]/", 60).unwrap();
        let nodes: Vec<&str> = list.iter().map(|uri| uri.node.as_str()).collect();
        assert_eq!(nodes, ["a:5681", "[::1]:5671"]);
        assert_eq!(list[1].masked, "amqps://u:***@[::1]/");
        let empty = parse_uris("amqp://u:pw@a/,", 60).unwrap_err().to_string();
        assert!(empty.contains("entry 2 of the list is empty") && !empty.contains("pw"), "{empty}");
        let bad = parse_uris("amqp://a/,http://u:hunter2@b/", 60).unwrap_err().to_string();
        assert!(bad.contains("entry 2 of the list: invalid broker URI 'http://u:***@b/'"), "{bad}");
        let piece = parse_uris("amqp://u:hun,ter2@a/,amqp://u:hun,ter2@b/", 60).unwrap_err();
        assert!(
            !piece.to_string().contains("hun") && !piece.to_string().contains("ter2"),
            "{piece}"
        );
        assert_eq!(
            parse_uris("amqp://u:p,w@a/", 60).unwrap()[0].amqp.authority.userinfo.password,
            "p,w"
        );
    }

    #[test]
    fn defaults() {
        let parsed = parse_uri("amqp://localhost", 30).unwrap();
        assert_eq!(parsed.amqp.vhost, "/");
        assert_eq!(parsed.amqp.authority.port, 5672);
        assert_eq!(parsed.amqp.authority.userinfo.username, "guest");
        assert_eq!(parsed.amqp.query.heartbeat, Some(30));
        assert_eq!(parsed.amqp.query.frame_max, Some(DEFAULT_FRAME_MAX));
        let small = parse_uri("amqp://localhost/?frame_max=16384", 30).unwrap();
        assert_eq!(small.amqp.query.frame_max, Some(16384));
        assert_eq!(parse_uri("amqp://h/", 1).unwrap().amqp.vhost, "/");
        assert_eq!(parse_uri("amqps://h/", 1).unwrap().amqp.authority.port, 5671);
        assert_eq!(parse_uri("amqp://h/staging", 1).unwrap().amqp.vhost, "staging");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn amqps_is_refused_without_the_tls_feature() {
        let parsed = parse_uri("amqps://u:pw@h/", 60).unwrap();
        let err = refuse_tls(&parsed).unwrap_err().to_string();
        assert!(err.contains("invalid broker URI") && err.contains("`tls` feature"), "{err}");
        assert!(refuse_tls(&parse_uri("amqp://h/", 60).unwrap()).is_ok());
    }

    #[test]
    fn query_numbers_out_of_range_are_errors_not_zero() {
        // zero means "off" (heartbeat) or "no limit" (frame_max, channel_max) in AMQP: an
        // out-of-range number must not silently become one
        for (query, what) in [
            ("heartbeat=65536", "heartbeat"),
            ("frame_max=4294967296", "frame_max"),
            ("channel_max=70000", "channel_max"),
        ] {
            let error = parse_uri(&format!("amqp://u:pw@h/?{query}"), 60).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(what) && text.contains("too large"), "{text}");
        }
        assert_eq!(
            parse_uri("amqp://h/?heartbeat=65535", 60).unwrap().amqp.query.heartbeat,
            Some(65535)
        );
        assert_eq!(parse_uri("amqp://h/?heartbeat=0", 60).unwrap().amqp.query.heartbeat, Some(0));
    }

    #[test]
    fn every_option_named_as_read_is_read() {
        // the start-up warning about unused options relies on this list
        for option in crate::config::amqp_uri::READ_OPTIONS {
            let error = parse_uri(&format!("amqp://h/?{option}=x"), 60).unwrap_err();
            assert!(error.to_string().contains(&format!("bad {option} 'x'")), "{error}");
        }
    }

    #[test]
    fn rejects_bad_uris_without_leaking() {
        let err = parse_uri("http://u:hunter22@h/", 60).unwrap_err();
        assert!(!err.to_string().contains("hunter22"), "{err}");
        assert!(parse_uri("amqp://u:pw@h/?heartbeat=x", 60).is_err());
        let long_vhost = parse_uri(&format!("amqp://h/{}", "v".repeat(256)), 60).unwrap_err();
        assert!(long_vhost.to_string().contains("vhost of 256 bytes"), "{long_vhost}");
        assert!(parse_uri(&format!("amqp://h/{}", "v".repeat(255)), 60).is_ok());
    }
}
