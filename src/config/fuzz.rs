//! Fuzzing the configuration's parsing of values: origins (`WEBSOCKET_ALLOWED_ORIGINS`)
//! against the `url` crate's serialization, which is the one browsers write in `Origin`, and
//! every key's string value, from each source.

use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use url::Url;

use super::origins::serialize;
use super::{Config, ConfigError};
use crate::data::fuzz_support::config;

/// A host as written in a URL: a name in any case (international names in Unicode or
/// punycode), an IPv4 address (dotted or as one number) or an IPv6 address in any spelling.
pub(crate) fn host() -> impl Strategy<Value = String> {
    let label = prop_oneof![
        3 => "[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?",
        1 => prop::sample::select(vec![
            "Bücher", "bücher", "xn--bcher-kva", "XN--BCHER-KVA", "faß", "日本", "ÉCOLE", "localhost",
        ])
        .prop_map(str::to_owned),
    ];
    let name = (prop::collection::vec(label, 1..4), any::<bool>())
        .prop_map(|(labels, dot)| format!("{}{}", labels.join("."), if dot { "." } else { "" }));
    let ipv4 = (any::<u32>(), any::<bool>()).prop_map(|(address, as_number)| {
        if as_number {
            address.to_string()
        } else {
            Ipv4Addr::from(address).to_string()
        }
    });
    let ipv6 = (any::<[u16; 8]>(), 0..4usize).prop_map(|(groups, spelling)| {
        let address = Ipv6Addr::from(groups);
        let written = match spelling {
            0 => address.to_string(),
            1 => address.to_string().to_uppercase(),
            2 => groups.map(|group| format!("{group:04X}")).join(":"),
            _ => format!(
                "::ffff:{}",
                Ipv4Addr::from(u32::from(groups[6]) << 16 | u32::from(groups[7]))
            ),
        };
        format!("[{written}]")
    });
    prop_oneof![3 => name, 1 => ipv4, 1 => ipv6]
}

/// A web origin as a person writes it in the configuration: scheme and host in any case, a
/// port or none (the scheme's default, leading zeros).
pub(crate) fn origin_text() -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec!["http", "https", "HTTP", "Https"]);
    let port = prop_oneof![
        Just(String::new()),
        Just(":80".to_owned()),
        Just(":443".to_owned()),
        Just(":0443".to_owned()),
        Just(":".to_owned()),
        any::<u16>().prop_map(|port| format!(":{port}")),
    ];
    (scheme, host(), port).prop_map(|(scheme, host, port)| format!("{scheme}://{host}{port}"))
}

/// An AMQP URI as operators write them: a user and password (which may hold any character
/// but the list separator, percent-encoded or not), a host, a port, a virtual host, options.
fn amqp_uri() -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec!["amqp", "amqps", "AMQP"]);
    let user =
        prop::option::of(("[a-z]{0,4}", prop::option::of("[a-zA-Z0-9~!$&'()*+;=%:.-]{0,8}")));
    let port = prop::option::of(any::<u16>());
    let vhost = prop::option::of("[a-z%/2F]{0,6}");
    let query = prop::option::of("[a-z_]{1,8}=[0-9]{1,3}");
    (scheme, user, host(), port, vhost, query).prop_map(
        |(scheme, user, host, port, vhost, query)| {
            let user = match user {
                None => String::new(),
                Some((name, None)) => format!("{name}@"),
                Some((name, Some(password))) => format!("{name}:{password}@"),
            };
            let port = port.map(|port| format!(":{port}")).unwrap_or_default();
            let vhost = vhost.map(|vhost| format!("/{vhost}")).unwrap_or_default();
            let query = query.map(|query| format!("?{query}")).unwrap_or_default();
            format!("{scheme}://{user}{host}{port}{vhost}{query}")
        },
    )
}

/// The origin of `text` as browsers serialize it (the reference), if it is a URL.
fn reference(text: &str) -> Option<String> {
    Url::parse(text).ok().map(|url| url.origin().ascii_serialization())
}

/// Every configuration key as the environment spells it.
fn keys() -> Vec<String> {
    let mut keys: Vec<String> =
        Config::default().to_masked_map().into_keys().filter(|key| key != "METRICS").collect();
    keys.extend(["METRICS_HOST".to_owned(), "METRICS_PORT".to_owned()]);
    keys
}

/// Values as people write them for any key: numbers, durations, words, lists, addresses.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -#%-~]{0,10}",
        "[ \t]?-?[0-9]{0,22}(\\.[0-9]{0,12})?([eE]-?[0-9]{1,3})?[ \t]?",
        prop::sample::select(vec![
            "",
            " ",
            "0",
            "1",
            "yes",
            "Off",
            "TRUE",
            "nan",
            "inf",
            "-0",
            "1e400",
            "1e-10",
            "0.0000000001",
            "18446744073709551616",
            "4294967296",
            "65536",
            "thread",
            "process",
            "Process",
            "nameko",
            "ufw",
            "classic",
            "quorum",
            "json",
            "fixed",
            "*",
            "https://app.example.com, HTTP://[::1]:80",
            "0.0.0.0:8000",
            "[::1]:80",
            "::1:80",
            ":80",
            "localhost:",
            "amqp://guest:guest@localhost/",
            "amqp://a,amqp://b",
        ])
        .prop_map(str::to_owned),
    ]
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    let escaped: String = text
        .chars()
        .map(|c| match c {
            '"' => "\\\"".to_owned(),
            '\\' => "\\\\".to_owned(),
            c if c.is_control() => format!("\\u{:04X}", u32::from(c)),
            c => c.to_string(),
        })
        .collect();
    format!("\"{escaped}\"")
}

/// What a source made of a value: the effective configuration, or the error's key and reason.
fn outcome(result: Result<Config, ConfigError>) -> Result<String, (String, String)> {
    result
        .map(|config| format!("{:?}", config.to_masked_map()))
        .map_err(|error| (error.key, error.reason))
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn origins_are_serialized_as_browsers_send_them(given in origin_text()) {
        match (serialize(&given), reference(&given)) {
            (Ok(serialized), Some(browser)) => {
                prop_assert_eq!(&serialized, &browser, "{}", given);
                // what a browser sends is that origin, as it is
                prop_assert_eq!(serialize(&browser), Ok(browser));
            }
            (Err(reason), None) => prop_assert!(!reason.is_empty()),
            (ours, browser) => prop_assert!(false, "{}: {:?}, url: {:?}", given, ours, browser),
        }
    }

    #[test]
    fn any_text_is_an_origin_as_browsers_send_it_or_refused_saying_why(
        given in prop_oneof![
            ".{0,24}",
            (origin_text(), "[/?#\\\\@* :\t%.a-zA-Z0-9]{0,6}").prop_map(|(origin, rest)| origin + &rest),
        ],
    ) {
        match serialize(&given) {
            Ok(serialized) => {
                prop_assert_eq!(Some(serialized.clone()), reference(&given), "{}", given);
                prop_assert_eq!(serialize(&serialized), Ok(serialized.clone()));
                prop_assert!(!serialized.chars().any(|c| c.is_uppercase()), "{}", serialized);
            }
            Err(reason) => prop_assert!(!reason.is_empty(), "{}", given),
        }
    }

    #[test]
    fn a_list_of_broker_uris_reads_back_as_written(
        uris in prop::collection::vec(amqp_uri(), 1..4),
        password in "[a-z]{0,3},[a-z,]{0,3}",
    ) {
        let config = Config::new("svc").with_amqp_uris(uris.clone());
        prop_assert_eq!(config.amqp_uris(), uris.iter().map(String::as_str).collect::<Vec<_>>());
        // one URI alone may keep a comma in its password
        let one = format!("amqp://user:{password}@localhost/");
        let alone = Config::new("svc").with_amqp_uri(one.clone());
        prop_assert_eq!(alone.amqp_uris(), vec![one.as_str()]);
    }

    #[test]
    fn every_key_takes_any_value_or_names_itself(
        key in prop::sample::select(keys()),
        value in value(),
    ) {
        let vars = [("SERVICE_NAME".to_owned(), "svc".to_owned()), (key.clone(), value.clone())];
        match Config::from_vars(vars) {
            Ok(config) => prop_assert!(config.validate().is_ok()),
            Err(error) => {
                prop_assert!(!error.reason.is_empty(), "{}={:?}", key, value);
                prop_assert!(error.to_string().contains(&key), "{}={:?}: {}", key, value, error);
            }
        }
    }

    #[test]
    fn a_value_reads_the_same_from_the_environment_yaml_and_toml(
        key in prop::sample::select(keys()),
        value in value(),
    ) {
        prop_assume!(key != "SERVICE_NAME");
        let vars = [("SERVICE_NAME".to_owned(), "svc".to_owned()), (key.clone(), value.clone())];
        let from_env = outcome(Config::from_vars(vars));
        let quoted = serde_json::to_string(&value).unwrap_or_default();
        let yaml = format!("SERVICE_NAME: svc\n{key}: {quoted}\n");
        let from_yaml = outcome(Config::from_yaml_str(&yaml, &|_| None));
        prop_assert_eq!(&from_yaml, &from_env, "YAML {}", yaml);
        let toml = format!("SERVICE_NAME = \"svc\"\n{key} = {}\n", toml_string(&value));
        let from_toml = outcome(Config::from_toml_str(&toml, &|_| None));
        prop_assert_eq!(&from_toml, &from_env, "TOML {}", toml);
    }
}
