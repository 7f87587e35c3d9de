//! Settings of the RabbitMQ transport.

use std::fmt;
use std::path::{Path, PathBuf};
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
    /// PEM private key of `client_cert_file` (PKCS#8, PKCS#1 or SEC1, unencrypted).
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
fn read(path: &Path, what: &str) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path)
        .map_err(|e| TransportError::Tls(format!("cannot read {what} {}: {e}", path.display())))
}

/// The CA file's configuration key.
const CA_FILE: &str = "AMQP_SSL_CA_FILE";
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

/// What a TLS file must hold.
#[derive(Clone, Copy)]
enum Holds {
    Certificate,
    PrivateKey,
}

/// Why the PEM text `pem` of the file `path`, set by `key`, is of no use: it holds no item
/// of the kind `holds` (a CA file with the CA's key, a certificate and key swapped), or is
/// not PEM. Checked at load: the TLS stack would report no key or file (`no items found`),
/// or take a CA file without a certificate as no CA at all (`UnknownIssuer`).
#[cfg(feature = "tls")]
fn unusable(pem: &[u8], holds: Holds, key: &str, path: &Path) -> Option<String> {
    use rustls::pki_types::pem::{Error, PemObject};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (found, what) = match holds {
        Holds::Certificate => (CertificateDer::from_pem_slice(pem).map(drop), "certificate"),
        Holds::PrivateKey => (PrivateKeyDer::from_pem_slice(pem).map(drop), "private key"),
    };
    let error = found.err()?;
    let why = match error {
        _ if matches!(holds, Holds::PrivateKey) && encrypted(pem) => format!(
            "holds an encrypted private key, and no passphrase is read: decrypt it \
             (openssl pkey -in {0} -out {0}.plain)",
            path.display()
        ),
        Error::NoItemsFound => format!("holds no {what} (PEM)"),
        other => format!("is not a PEM {what} ({other})"),
    };
    Some(format!("{key} {} {why}", path.display()))
}

/// Whether the PEM text `pem` holds an encrypted key: PKCS#8's `ENCRYPTED PRIVATE KEY`, or a
/// PKCS#1 or SEC1 key with OpenSSL's `Proc-Type: 4,ENCRYPTED` header. The TLS stack skips
/// the first as an unknown item and fails to decode the second: both read as "no key".
#[cfg(feature = "tls")]
fn encrypted(pem: &[u8]) -> bool {
    let text = String::from_utf8_lossy(pem);
    text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
}

/// Reads the TLS file `path` (set by `key`), refusing one that holds no `holds`.
fn read_pem(path: &Path, what: &str, holds: Holds, key: &str) -> Result<Vec<u8>, TransportError> {
    let pem = read(path, what)?;
    #[cfg(feature = "tls")]
    if let Some(why) = unusable(&pem, holds, key, path) {
        return Err(TransportError::Tls(why));
    }
    #[cfg(not(feature = "tls"))]
    let _ = (holds, key); // amqps:// is refused without TLS: the files are never used
    Ok(pem)
}

impl TlsOptions {
    /// Load the files into lapin's TLS configuration.
    pub(crate) fn load(&self) -> Result<OwnedTLSConfig, TransportError> {
        let cert_chain = match &self.ca_file {
            Some(path) => Some(
                String::from_utf8(read_pem(path, "CA file", Holds::Certificate, CA_FILE)?)
                    .map_err(|_| TransportError::Tls("CA file is not PEM text".into()))?,
            ),
            None => None,
        };
        let identity = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some(identity(cert, key)?),
            (None, None) => None,
            (Some(_), None) => return Err(unpaired(CLIENT_CERT, CLIENT_KEY)),
            (None, Some(_)) => return Err(unpaired(CLIENT_KEY, CLIENT_CERT)),
        };
        Ok(OwnedTLSConfig { identity, cert_chain })
    }
}

/// The client certificate and key. When neither holds what it should, both are named: they
/// are most likely swapped.
fn identity(cert: &Path, key: &Path) -> Result<OwnedIdentity, TransportError> {
    let pem = read_pem(cert, "client certificate", Holds::Certificate, CLIENT_CERT.1);
    let key = read_pem(key, "client key", Holds::PrivateKey, CLIENT_KEY.1);
    match (pem, key) {
        (Ok(pem), Ok(key)) => Ok(OwnedIdentity::PKCS8 { pem, key }),
        (Err(TransportError::Tls(cert)), Err(TransportError::Tls(key))) => {
            Err(TransportError::Tls(format!("{cert}; {key}: are the two files swapped?")))
        }
        (Err(error), _) | (_, Err(error)) => Err(error),
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
        let files = Files::new();
        let with_ca = TlsOptions { ca_file: Some(files.cert.clone()), ..TlsOptions::default() };
        assert!(with_ca.load().unwrap().cert_chain.unwrap().contains("BEGIN CERTIFICATE"));
        let half =
            TlsOptions { client_cert_file: Some(files.cert.clone()), ..TlsOptions::default() };
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
            client_cert_file: Some(files.cert.clone()),
            client_key_file: Some(files.key.clone()),
            ..TlsOptions::default()
        };
        assert!(matches!(pair.load().unwrap().identity, Some(OwnedIdentity::PKCS8 { .. })));
    }

    /// A self-signed certificate and its key, PEM, in a directory removed on drop.
    struct Files {
        cert: PathBuf,
        key: PathBuf,
    }

    impl Files {
        fn new() -> Files {
            let dir = std::env::temp_dir().join(format!("tls-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            std::fs::write(&cert, made.cert.pem()).unwrap();
            std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
            Files { cert, key }
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            if let Some(dir) = self.cert.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn a_ca_file_without_a_certificate_is_refused_naming_key_and_path() {
        let files = Files::new();
        let options = TlsOptions { ca_file: Some(files.key.clone()), ..TlsOptions::default() };
        let error = options.load().unwrap_err();
        let expected =
            format!("AMQP_SSL_CA_FILE {} holds no certificate (PEM)", files.key.display());
        assert_eq!(error.to_string(), TransportError::Tls(expected).to_string());
        assert!(error.is_permanent());
    }

    #[cfg(feature = "tls")]
    #[test]
    fn a_client_certificate_and_key_swapped_or_wrong_are_refused_naming_keys_and_paths() {
        let files = Files::new();
        let (cert, key) = (files.cert.display(), files.key.display());
        let swapped = TlsOptions {
            client_cert_file: Some(files.key.clone()),
            client_key_file: Some(files.cert.clone()),
            ..TlsOptions::default()
        };
        let expected = format!(
            "AMQP_SSL_CERT_FILE {key} holds no certificate (PEM); AMQP_SSL_KEY_FILE {cert} holds \
             no private key (PEM): are the two files swapped?"
        );
        let error = swapped.load().unwrap_err();
        assert_eq!(error.to_string(), TransportError::Tls(expected).to_string());
        assert!(error.is_permanent());
        // one file wrong: that one named
        let two_certs = TlsOptions { client_key_file: Some(files.cert.clone()), ..swapped };
        let two_certs = TlsOptions { client_cert_file: Some(files.cert.clone()), ..two_certs };
        let expected = format!("AMQP_SSL_KEY_FILE {cert} holds no private key (PEM)");
        assert_eq!(
            two_certs.load().unwrap_err().to_string(),
            TransportError::Tls(expected).to_string()
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn an_encrypted_client_key_is_refused_saying_so() {
        let files = Files::new();
        let dir = files.key.parent().unwrap().to_owned();
        // as `openssl genpkey -aes256` and `openssl ec -aes256` write them (the bytes are
        // not read past the labels and headers)
        let pkcs8 = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqG\n\
                     -----END ENCRYPTED PRIVATE KEY-----\n";
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                    DEK-Info: AES-256-CBC,94FDF2B1B27BB5CC416645B11749CA50\n\n\
                    MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqG\n-----END EC PRIVATE KEY-----\n";
        for (name, text) in [("pkcs8.key", pkcs8), ("sec1.key", sec1)] {
            let key = dir.join(name);
            std::fs::write(&key, text).unwrap();
            let options = TlsOptions {
                client_cert_file: Some(files.cert.clone()),
                client_key_file: Some(key.clone()),
                ..TlsOptions::default()
            };
            let expected = format!(
                "AMQP_SSL_KEY_FILE {0} holds an encrypted private key, and no passphrase is \
                 read: decrypt it (openssl pkey -in {0} -out {0}.plain)",
                key.display()
            );
            let error = options.load().unwrap_err();
            assert_eq!(error.to_string(), TransportError::Tls(expected).to_string());
            assert!(error.is_permanent());
            // given for a certificate, it is refused as no certificate, not as a key
            let options = TlsOptions { ca_file: Some(key.clone()), ..TlsOptions::default() };
            let error = options.load().unwrap_err().to_string();
            let named = format!("AMQP_SSL_CA_FILE {} ", key.display());
            assert!(error.contains(&named) && error.contains("certificate"), "{error}");
            assert!(!error.contains("encrypted private key"), "{error}");
        }
    }

    #[test]
    fn debug_masks_the_password() {
        let text = format!("{:?}", RabbitMqOptions::new("amqp://u:topsecret@h/"));
        assert!(!text.contains("topsecret") && text.contains("u:***@h"), "{text}");
    }
}
