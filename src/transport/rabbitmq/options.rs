//! Settings of the RabbitMQ transport.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};

use super::uri::mask_uri;
use crate::transport::TransportError;

/// TLS settings for `amqps://` URIs. Server certificates are checked against the bundled
/// web PKI roots plus `ca_file`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file of extra certificate authorities (e.g. a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS (needs `client_key_file`).
    pub client_cert_file: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

/// Settings of [`super::RabbitMqTransport`]. `Debug` masks the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitMqOptions {
    /// `amqp://user:password@host:port/vhost` or `amqps://...`; `?heartbeat=N` is honoured.
    /// Or the nodes of a cluster, as a comma-separated list of such URIs (a comma in a user
    /// name or password of a list is written `%2C`).
    pub uri: String,
    /// Heartbeat interval in seconds; the URI's `heartbeat` query wins. 0 takes the broker's
    /// (the AMQP client then follows it: heartbeats are off only where the broker's are).
    pub heartbeat: u16,
    /// Connection name shown by the management UI and `rabbitmqctl list_connections`.
    pub connection_name: Option<String>,
    /// TLS settings.
    pub tls: TlsOptions,
    /// First delay between reconnect attempts.
    pub reconnect_min: Duration,
    /// Longest delay between reconnect attempts (the delay doubles up to it).
    pub reconnect_max: Duration,
    /// How long a publish (or any other operation) waits for a connection and its confirm.
    pub publish_timeout: Duration,
    /// How long one connection attempt (TCP, TLS and AMQP handshake) may take.
    pub connect_timeout: Duration,
    /// Seed of the shuffle of a list of nodes; `None` (the default) takes one from the
    /// process id, the time and a count of transports, so instances spread over the nodes.
    pub node_order_seed: Option<u64>,
}

impl RabbitMqOptions {
    /// Options with defaults: heartbeat 60 s, reconnect 100 ms..5 s, publish timeout 30 s,
    /// connect timeout 10 s, no TLS extras.
    pub fn new(uri: impl Into<String>) -> Self {
        RabbitMqOptions {
            uri: uri.into(),
            heartbeat: 60,
            connection_name: None,
            tls: TlsOptions::default(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            node_order_seed: None,
        }
    }
}

impl fmt::Debug for RabbitMqOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqOptions")
            .field("uri", &mask_uri(&self.uri))
            .field("heartbeat", &self.heartbeat)
            .field("connection_name", &self.connection_name)
            .field("tls", &self.tls)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("publish_timeout", &self.publish_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("node_order_seed", &self.node_order_seed)
            .finish()
    }
}

/// Read a TLS file; a file that cannot be read is a [`TransportError::Tls`] error.
fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path)
        .map_err(|e| TransportError::Tls(format!("cannot read {what} {}: {e}", path.display())))
}

/// The client certificate's field and its configuration key.
const CLIENT_CERT: (&str, &str) = ("client_cert_file", "AMQP_SSL_CERT_FILE");
/// The client key's field and its configuration key.
const CLIENT_KEY: (&str, &str) = ("client_key_file", "AMQP_SSL_KEY_FILE");

/// The error for a client certificate without its key, or a key without its certificate:
/// `set` is given, `missing` is not.
fn unpaired(set: (&str, &str), missing: (&str, &str)) -> TransportError {
    TransportError::Tls(format!(
        "{} ({}) is set without {} ({}): set both or neither",
        set.0, set.1, missing.0, missing.1
    ))
}

impl TlsOptions {
    /// Load the files into lapin's TLS configuration.
    pub(crate) fn load(&self) -> Result<OwnedTLSConfig, TransportError> {
        let cert_chain = match &self.ca_file {
            Some(path) => Some(
                String::from_utf8(read(path, "CA file")?)
                    .map_err(|_| TransportError::Tls("CA file is not PEM text".into()))?,
            ),
            None => None,
        };
        let identity = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read(cert, "client certificate")?,
                key: read(key, "client key")?,
            }),
            (None, None) => None,
            (Some(_), None) => return Err(unpaired(CLIENT_CERT, CLIENT_KEY)),
            (None, Some(_)) => return Err(unpaired(CLIENT_KEY, CLIENT_CERT)),
        };
        Ok(OwnedTLSConfig { identity, cert_chain })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_are_loaded_or_reported() {
        assert_eq!(TlsOptions::default().load().unwrap(), OwnedTLSConfig::default());
        let missing =
            TlsOptions { ca_file: Some("/nonexistent/ca.pem".into()), ..TlsOptions::default() };
        assert!(matches!(missing.load(), Err(TransportError::Tls(_))));
        assert!(missing.load().unwrap_err().is_permanent());
        let dir = std::env::temp_dir().join(format!("tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n").unwrap();
        let with_ca = TlsOptions { ca_file: Some(pem.clone()), ..TlsOptions::default() };
        assert!(with_ca.load().unwrap().cert_chain.unwrap().contains("BEGIN CERTIFICATE"));
        let half = TlsOptions { client_cert_file: Some(pem.clone()), ..TlsOptions::default() };
        assert_eq!(
            half.load().unwrap_err().to_string(),
            TransportError::Tls(
                "client_cert_file (AMQP_SSL_CERT_FILE) is set without client_key_file \
                 (AMQP_SSL_KEY_FILE): set both or neither"
                    .into()
            )
            .to_string()
        );
        let pair = TlsOptions {
            client_cert_file: Some(pem.clone()),
            client_key_file: Some(pem),
            ..TlsOptions::default()
        };
        assert!(matches!(pair.load().unwrap().identity, Some(OwnedIdentity::PKCS8 { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn debug_masks_the_password() {
        let text = format!("{:?}", RabbitMqOptions::new("amqp://u:topsecret@h/"));
        assert!(!text.contains("topsecret") && text.contains("u:***@h"), "{text}");
    }
}
