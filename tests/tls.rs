//! TLS to RabbitMQ with a private CA. The test makes the CA and the certificates (rcgen),
//! starts TLS listeners on the running node (`rabbit_networking:start_ssl_listener` through
//! `rabbitmqctl eval`) on free loopback ports, and stops them at the end. Needs RabbitMQ
//! (under `CI=true` an unreachable broker fails the test), `rabbitmqctl`, and `openssl` for
//! the client keys in PKCS#1 and SEC1.
#![cfg(feature = "tls")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{cleanup, rabbitmq_uri, unique};
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::transport::TransportError;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::{json, Value};

/// The certificates of one test, in a directory the rabbitmq user can read.
struct Pki {
    dir: PathBuf,
    /// The CA that signed the server's and the client's certificates.
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a
    /// second CA that signed nothing.
    fn new() -> Pki {
        // not $TMPDIR: RabbitMQ's OS user must be able to reach the files
        let dir = Path::new("/tmp").join(format!("mf-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pki = Pki { dir, ca: certificate_authority("micro-framework test CA") };
        pki.write("ca.pem", &pki.ca.pem());
        let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        let (server, server_key) = signed(names, "localhost", &pki.ca);
        pki.write("server.pem", &server);
        pki.write("server.key", &server_key);
        let (client, client_key) = signed(vec![], "guest", &pki.ca);
        pki.write("client.pem", &client);
        pki.write("client.key", &client_key);
        pki.write("other-ca.pem", &certificate_authority("unrelated CA").pem());
        pki
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn write(&self, name: &str, text: &str) {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        // RabbitMQ runs as its own OS user and reads these files
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate (PEM) and its PKCS#8 key (PEM) signed by `ca`.
fn signed(
    names: Vec<String>,
    common_name: &str,
    ca: &CertifiedIssuer<'_, KeyPair>,
) -> (String, String) {
    let mut params = CertificateParams::new(names).unwrap();
    params.distinguished_name.push(DnType::CommonName, common_name);
    let key = KeyPair::generate().unwrap();
    let certificate = params.signed_by(&key, ca).unwrap();
    (certificate.pem(), key.serialize_pem())
}

/// `rabbitmqctl eval EXPRESSION`, which must print `ok`.
fn eval(expression: &str) {
    if let Err(printed) = try_eval(expression) {
        panic!("rabbitmqctl eval {expression}: {printed}");
    }
}

/// `rabbitmqctl eval EXPRESSION`: what it printed, unless it printed `ok`.
fn try_eval(expression: &str) -> Result<(), String> {
    let output = Command::new("rabbitmqctl").args(["eval", expression]).output().unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    match output.status.success() && printed.trim() == "ok" {
        true => Ok(()),
        false => Err(format!("{printed} {}", String::from_utf8_lossy(&output.stderr))),
    }
}

/// A TLS listener on the running node, stopped when dropped.
struct Listener {
    port: u16,
}

impl Listener {
    /// Listen on a free loopback port with the server certificate; `mutual` asks for and
    /// requires a client certificate signed by the CA.
    ///
    /// The port is free when asked for but may be taken before the node listens on it (by
    /// another test's listener or an outgoing connection's local port): then another one.
    fn start(pki: &Pki, mutual: bool) -> Listener {
        let (verify, require) = if mutual { ("verify_peer", true) } else { ("verify_none", false) };
        let mut attempts = 0;
        loop {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let started = try_eval(&format!(
                "rabbit_networking:start_ssl_listener({{\"127.0.0.1\", {port}}}, [{{cacertfile, \"{}\"}}, \
                 {{certfile, \"{}\"}}, {{keyfile, \"{}\"}}, {{verify, {verify}}}, \
                 {{fail_if_no_peer_cert, {require}}}], 1).",
                pki.path("ca.pem"),
                pki.path("server.pem"),
                pki.path("server.key"),
            ));
            match started {
                Ok(()) => return Listener { port },
                Err(printed) if printed.contains("eaddrinuse") && attempts < 5 => attempts += 1,
                Err(printed) => panic!("cannot start a TLS listener on port {port}: {printed}"),
            }
        }
    }

    fn uri(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/", self.port)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        eval(&format!("rabbit_networking:stop_tcp_listener({{\"127.0.0.1\", {}}}).", self.port));
    }
}

fn tls_config(listener: &Listener, service: &str, ca: Option<String>) -> Config {
    Config::new(unique(service)).with_amqp_uri(listener.uri()).with_amqp_ssl_ca_file(ca)
}

fn record(Payload(payload): Payload<Value>) -> Value {
    payload
}

/// Start a service on `config`, send it an event through its own connection, wait for it.
async fn event_round_trip(config: Config) {
    let source = unique("tls_src");
    let route = Route::new(record).entrypoint(EventListener::new(&source, "ping"));
    let service = TestService::start(vec![route], config.clone()).await.unwrap();
    service.dispatch(&source, "ping", &json!({"over": "tls"})).await.unwrap();
    service.wait_for_route("record", 1).await.unwrap();
    assert!(uses_tls(&config.service_name), "the connection is not TLS");
    service.stop().await.unwrap();
    if let Some(uri) = rabbitmq_uri() {
        cleanup(&uri, &[source, config.service_name]).await;
    }
}

/// Whether RabbitMQ lists a TLS connection named `name` (the service name).
fn uses_tls(name: &str) -> bool {
    let output = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "--no-table-headers", "client_properties", "ssl"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.contains(&format!("\"{name}\"")) && line.trim_end().ends_with("true"))
}

/// Connect with `config`, expecting a refusal within 15 s; returns the error.
async fn refused(config: &Config) -> TransportError {
    let started = Instant::now();
    let result =
        tokio::time::timeout(Duration::from_secs(15), micro_framework::transport::connect(config))
            .await
            .expect("a refused TLS connection must fail, not hang");
    let error = result.expect_err("the connection must be refused");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(!error.to_string().contains("guest:guest"), "{error}");
    error
}

/// [`refused`], expecting a permanent TLS error (the client refused the certificate, or a TLS
/// file); returns the error's text.
async fn refused_tls(config: &Config) -> String {
    let error = refused(config).await;
    assert!(matches!(error, TransportError::Tls(_)), "{error:?}");
    assert!(error.is_permanent());
    error.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_travel_over_tls_with_a_private_ca() {
    if rabbitmq_uri().is_none() {
        return;
    }
    let pki = Pki::new();
    let listener = Listener::start(&pki, false);
    event_round_trip(tls_config(&listener, "tls_svc", Some(pki.path("ca.pem")))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_or_missing_ca_is_refused_clearly() {
    if rabbitmq_uri().is_none() {
        return;
    }
    let pki = Pki::new();
    let listener = Listener::start(&pki, false);

    let wrong = tls_config(&listener, "tls_wrong", Some(pki.path("other-ca.pem")));
    let error = refused_tls(&wrong).await;
    assert!(error.contains("certificate"), "{error}");

    let no_ca = tls_config(&listener, "tls_none", None);
    let error = refused_tls(&no_ca).await;
    assert!(error.contains("certificate"), "{error}");

    let missing = tls_config(&listener, "tls_missing", Some(pki.path("nope.pem")));
    let error = refused_tls(&missing).await;
    assert!(error.contains("cannot read CA file"), "{error}");

    // a service started with a wrong CA stops with the error instead of retrying for ever
    let runner =
        Runner::new(vec![Route::new(record).entrypoint(EventListener::new("s", "e"))], wrong);
    let stop = tokio::time::sleep(Duration::from_secs(60));
    let outcome = tokio::time::timeout(Duration::from_secs(20), runner.run_until(stop)).await;
    let error = outcome.expect("start-up must fail, not retry").expect_err("refused");
    assert!(
        matches!(error, micro_framework::Error::Transport(TransportError::Tls(_))),
        "{error:?}"
    );
    assert!(error.to_string().contains("certificate"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_needs_the_client_certificate() {
    if rabbitmq_uri().is_none() {
        return;
    }
    let pki = Pki::new();
    let listener = Listener::start(&pki, true);

    // the broker's refusal comes as a TLS alert (Tls) or, with TLS 1.3, often as a reset of
    // the connection, which cannot be told from a broker going away (Unreachable)
    let anonymous = tls_config(&listener, "tls_anon", Some(pki.path("ca.pem")));
    let error = refused(&anonymous).await;
    assert!(matches!(error, TransportError::Tls(_) | TransportError::Unreachable(_)), "{error:?}");
    let error = error.to_string();
    assert!(error.contains("cannot connect to amqps://guest:***@127.0.0.1"), "{error}");

    let mutual = tls_config(&listener, "tls_mutual", Some(pki.path("ca.pem")))
        .with_amqp_ssl_cert_file(Some(pki.path("client.pem")))
        .with_amqp_ssl_key_file(Some(pki.path("client.key")));
    event_round_trip(mutual).await;
}

/// `openssl ARGS` in `dir`, which must succeed.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command runs (this test makes its client keys with it)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "openssl {}: {stderr}", args.join(" "));
}

/// A client key written by `openssl` as `{name}.key` in the form a user's tooling leaves it
/// (the commands `make` write it, and `{name}.p8`, its PKCS#8 form, for rcgen), and a client
/// certificate `{name}.pem` for it signed by the test's CA.
fn openssl_client(pki: &Pki, name: &str, make: &[&[&str]]) {
    for args in make {
        openssl(&pki.dir, args);
    }
    let pkcs8 = std::fs::read_to_string(pki.dir.join(format!("{name}.p8"))).unwrap();
    let key = KeyPair::from_pem(&pkcs8).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "guest");
    pki.write(&format!("{name}.pem"), &params.signed_by(&key, &pki.ca).unwrap().pem());
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_takes_pkcs1_and_sec1_keys_as_openssl_writes_them() {
    if rabbitmq_uri().is_none() {
        return;
    }
    let pki = Pki::new();
    let listener = Listener::start(&pki, true);

    // (file name, how openssl makes it, the PEM label it must carry)
    let rsa: &[&[&str]] = &[
        &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "rsa.p8"],
        &["rsa", "-in", "rsa.p8", "-traditional", "-out", "rsa.key"],
    ];
    // `openssl ecparam -genkey` writes an EC PARAMETERS block before the key
    let ec_with_parameters: &[&[&str]] = &[
        &["ecparam", "-name", "prime256v1", "-genkey", "-out", "ecparam.key"],
        &["pkey", "-in", "ecparam.key", "-out", "ecparam.p8"],
    ];
    let ec: &[&[&str]] = &[
        &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", "ec.p8"],
        &["ec", "-in", "ec.p8", "-out", "ec.key"],
    ];
    let cases = [
        ("rsa", rsa, "-----BEGIN RSA PRIVATE KEY-----"),
        ("ecparam", ec_with_parameters, "-----BEGIN EC PARAMETERS-----"),
        ("ec", ec, "-----BEGIN EC PRIVATE KEY-----"),
    ];
    for (name, make, label) in cases {
        openssl_client(&pki, name, make);
        let key = std::fs::read_to_string(pki.dir.join(format!("{name}.key"))).unwrap();
        assert!(key.starts_with(label), "{name}.key is not in the form tested: {key:.40}");
        let config = tls_config(&listener, &format!("tls_{name}"), Some(pki.path("ca.pem")))
            .with_amqp_ssl_cert_file(Some(pki.path(&format!("{name}.pem"))))
            .with_amqp_ssl_key_file(Some(pki.path(&format!("{name}.key"))));
        event_round_trip(config).await;
    }
}

#[test]
fn certificate_files_are_readable_by_other_users() {
    let pki = Pki::new();
    for name in ["", "ca.pem", "server.pem", "server.key"] {
        let mode = std::fs::metadata(Path::new(&pki.path(name))).unwrap().permissions().mode();
        assert_eq!(mode & 0o004, 0o004, "{name} must be world-readable for the rabbitmq user");
    }
}
