//! Fuzzing the plain-data decoders: media types, why a body is no JSON
//! ([`DecodeError::of_json`]), and the micro-framework profile's RPC frames (`ufw_wire`).

use bytes::Bytes;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{Map, Value};

use crate::data::fuzz_support::{self, config};
use crate::data::media_type::{essence, is_json};
use crate::data::ufw_wire::{
    parse_reply, reply_body, reply_frame, request_frame, RemoteError, Request,
};
use crate::data::{DecodeError, Message};

/// The essence of `text` as the WHATWG MIME Sniffing standard parses a MIME type (as browsers
/// do), or `None` where it is none: the reference for [`essence`].
fn whatwg_essence(text: &str) -> Option<String> {
    let http_space = |c: char| matches!(c, '\t' | '\n' | '\r' | ' ');
    let token = |part: &str| {
        !part.is_empty()
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
    };
    let (kind, rest) = text.trim_matches(http_space).split_once('/')?;
    let subtype = rest.split(';').next().unwrap_or_default().trim_end_matches(http_space);
    (token(kind) && token(subtype)).then(|| format!("{kind}/{subtype}").to_ascii_lowercase())
}

/// Whether a WHATWG essence is JSON: `application/json` or RFC 6839's `application/*+json`
/// (a name before the suffix).
fn whatwg_is_json(essence: &str) -> bool {
    match essence.split_once('/') {
        Some(("application", "json")) => true,
        Some(("application", subtype)) => subtype
            .rsplit_once('+')
            .is_some_and(|(name, suffix)| !name.is_empty() && suffix == "json"),
        _ => false,
    }
}

/// Content types as publishers and browsers write them, in any case, spacing and parameters,
/// and arbitrary text.
fn content_type() -> impl Strategy<Value = String> {
    let space = prop::sample::select(vec!["", "", " ", "\t", "  ", "\u{a0}", "\u{b}", "\n"]);
    let kind = prop::sample::select(vec![
        "application",
        "Application",
        "APPLICATION",
        "text",
        "multipart",
        "",
        "applications",
    ]);
    let subtype = prop_oneof![
        prop::sample::select(vec![
            "json",
            "JSON",
            "Json",
            "vnd.api+json",
            "problem+JSON",
            "+json",
            "jsonp",
            "json-seq",
            "plain",
            "x-www-form-urlencoded",
            "form-data",
            "vnd.api+json5",
            "a+b+json",
            "json+xml",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z0-9.+ -]{0,8}(\\+[jJ][sS][oO][nN])?",
    ];
    let parameters = "(;[ \t]?[a-zA-Z]{0,7}(=[a-zA-Z0-9/+\"=;-]{0,12})?){0,3}";
    let built = (space.clone(), kind, subtype, space, parameters).prop_map(
        |(before, kind, subtype, after, parameters)| {
            format!("{before}{kind}/{subtype}{after}{parameters}")
        },
    );
    prop_oneof![4 => built, 1 => ".{0,24}"]
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    fuzz_support::json_value(".{0,6}".boxed())
}

/// A string standing where a token is put into a document's text.
const MARK: &str = "\u{0}mark\u{0}";

/// A JSON document holding [`MARK`] once, somewhere among other values, and its text:
/// compact or pretty-printed (newlines before the mark), as publishers write JSON.
fn document_with_mark() -> impl Strategy<Value = String> {
    let levels = vec((any::<bool>(), ".{0,4}", json_value()), 0..4);
    (json_value(), json_value(), levels, any::<bool>()).prop_map(
        |(before, after, levels, pretty)| {
            let mut document = Value::Array(vec![before, Value::from(MARK), after]);
            for (in_object, key, sibling) in levels {
                document = if in_object {
                    let mut object = Map::new();
                    object.insert(key, document);
                    object.insert("~sibling".into(), sibling);
                    Value::Object(object)
                } else {
                    Value::Array(vec![sibling, document])
                };
            }
            let text = if pretty {
                serde_json::to_string_pretty(&document)
            } else {
                serde_json::to_string(&document)
            };
            text.unwrap_or_default()
        },
    )
}

/// `document` with its mark (a JSON string) replaced by `token`.
fn put(document: &str, token: &str) -> Vec<u8> {
    let mark = serde_json::to_string(MARK).unwrap_or_default();
    document.replacen(&mark, token, 1).into_bytes()
}

/// A body decoded as a JSON message.
fn decode(body: Vec<u8>) -> Result<Value, DecodeError> {
    Message { body: Bytes::from(body), ..Message::default() }.decode()
}

/// A lone UTF-16 surrogate escaped as Python's json writes it, in either case of hex, inside a
/// string with some text or another escape after it.
fn lone_surrogate() -> impl Strategy<Value = String> {
    let after = prop::sample::select(vec!["", "x", "\\n", "\\\\", "\\u0041", "\\ud800", "é"]);
    (0xd800u32..=0xdfff, any::<bool>(), "[a-z]{0,3}", after).prop_map(
        |(unit, upper, before, after)| {
            let hex = if upper { format!("{unit:04X}") } else { format!("{unit:04x}") };
            format!("\"{before}\\u{hex}{after}\"")
        },
    )
}

/// A decimal number as JSON writes it, near and beyond a 64-bit float's range.
fn number() -> impl Strategy<Value = String> {
    let digits = prop_oneof!["[1-9][0-9]{0,20}", "[1-9][0-9]{300,320}", Just("0".to_owned())];
    let fraction = prop_oneof![Just(String::new()), "\\.[0-9]{1,20}"];
    let exponent = prop_oneof![
        Just(String::new()),
        (
            prop::sample::select(vec!["e", "E", "e+", "e-"]),
            // exponents beyond any integer type, and with leading zeros
            prop_oneof![(0u32..400).prop_map(|n| n.to_string()), "0{0,3}[0-9]{1,24}"],
        )
            .prop_map(|(e, n)| format!("{e}{n}")),
    ];
    let edge = prop::sample::select(vec![
        "1.7976931348623157e308", "1.7976931348623158e308", "1.7976931348623159e308",
        "179769313486231580793728971405303415079934132710037826936173778980444968292764750946649017977587207096330286416692887910946555547851940402630657488671505820681908902000708383676273854845817711531764475730270069855571366959622842914819860834936475292719074168444365510704342711559699508093042880177904174497791",
        "5e-324", "2.4e-324", "1e-400",
    ])
    .prop_map(str::to_owned);
    prop_oneof![
        4 => (any::<bool>(), digits, fraction, exponent)
            .prop_map(|(minus, digits, fraction, exponent)| {
                format!("{}{digits}{fraction}{exponent}", if minus { "-" } else { "" })
            }),
        1 => edge,
    ]
}

/// Any RPC error as a reply carries it.
fn remote_error() -> impl Strategy<Value = RemoteError> {
    (
        ".{0,12}",
        ".{0,12}",
        vec(json_value(), 0..3),
        btree_map(".{0,4}", json_value(), 0..3),
        prop::option::of(".{0,12}"),
    )
        .prop_map(|(exception, message, args, kwargs, module)| RemoteError {
            exception,
            message,
            args,
            kwargs: kwargs.into_iter().collect(),
            module,
        })
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn content_types_are_read_as_browsers_parse_them(declared in content_type()) {
        let read = essence(&declared);
        if let Some(reference) = whatwg_essence(&declared) {
            prop_assert_eq!(&read, &reference, "essence of {:?}", declared);
            prop_assert_eq!(is_json(&read), whatwg_is_json(&reference), "{:?}", declared);
        }
    }

    #[test]
    fn floats_that_are_no_number_are_named_wherever_they_stand(
        document in document_with_mark(),
        token in prop::sample::select(vec!["NaN", "Infinity", "-Infinity"]),
    ) {
        let error = decode(put(&document, token)).expect_err("no JSON");
        prop_assert!(error.to_string().contains("NaN and Infinity, which Python's json writes"),
            "{} in {}: {}", token, document, error);
    }

    #[test]
    fn lone_surrogates_are_named_wherever_they_stand(
        document in document_with_mark(),
        surrogate in lone_surrogate(),
    ) {
        let body = put(&document, &surrogate);
        let error = decode(body.clone()).expect_err("a lone surrogate");
        prop_assert!(error.to_string().contains("lone UTF-16 surrogate"),
            "{}: {}", String::from_utf8_lossy(&body), error);
    }

    #[test]
    fn numbers_are_read_where_a_float_holds_them_and_named_beyond(
        document in document_with_mark(),
        number in number(),
    ) {
        let read = decode(put(&document, &number));
        let reference: f64 = number.parse().expect("a decimal number");
        match read {
            Ok(_) => prop_assert!(reference.is_finite(), "{} read as a number", number),
            Err(DecodeError::NumberBeyondAFloat(_)) => {
                prop_assert!(reference.is_infinite(), "{} is {}", number, reference)
            }
            Err(other) => prop_assert!(false, "{}: {}", number, other),
        }
    }

    #[test]
    fn non_json_bodies_say_why(body in prop_oneof![
        vec(any::<u8>(), 0..64),
        document_with_mark().prop_map(|document| put(&document, "'x'")),
        document_with_mark().prop_map(|document| put(&document, "True")),
    ]) {
        if let Err(error) = decode(body) {
            let DecodeError::NotJson { error: reason, .. } = &error else {
                return Err(TestCaseError::fail(format!("{error:?}")));
            };
            prop_assert!(!reason.is_empty() && error.to_string().contains(reason.as_str()));
        }
    }

    #[test]
    fn request_frames_read_back_once_or_twice_encoded(
        command in ".{0,12}",
        args in vec(json_value(), 0..4),
        kwargs in btree_map(".{0,6}", json_value(), 0..4),
        twice in any::<bool>(),
    ) {
        let kwargs: Map<String, Value> = kwargs.into_iter().collect();
        let mut frame = request_frame(&command, args.clone(), kwargs.clone());
        if twice {
            frame = Value::String(frame).to_string();
        }
        let request = Request::parse(frame.as_bytes()).map_err(|m| TestCaseError::fail(m.error.message))?;
        prop_assert_eq!(request, Request { id: None, command, args, kwargs });
    }

    #[test]
    fn requests_of_any_shape_are_read_or_refused_saying_why(frame in prop_oneof![
        vec(any::<u8>(), 0..64),
        json_value().prop_map(|value| value.to_string().into_bytes()),
        json_value().prop_map(|value| Value::String(value.to_string()).to_string().into_bytes()),
        (json_value(), json_value(), json_value(), json_value()).prop_map(|(id, command, args, kwargs)| {
            let frame = serde_json::json!({"id": id, "command": command, "command_args": args, "command_kwargs": kwargs});
            frame.to_string().into_bytes()
        }),
    ]) {
        if let Err(malformed) = Request::parse(&frame) {
            prop_assert!(malformed.error.is_framework("RPCMalformedMessage"));
            prop_assert!(malformed.error.message.starts_with("malformed message ("), "{}", malformed.error.message);
            prop_assert!(malformed.error.message.len() < 1200, "{}", malformed.error.message);
        }
    }

    #[test]
    fn replies_read_back_from_either_encoding(
        outcome in prop_oneof![json_value().prop_map(Ok), remote_error().prop_map(Err)],
        id in prop::option::of(json_value()),
    ) {
        prop_assert_eq!(parse_reply(&reply_body(&outcome)), Ok(outcome.clone()));
        prop_assert_eq!(parse_reply(reply_frame(id.as_ref(), &outcome).as_bytes()), Ok(outcome));
    }

    #[test]
    fn replies_of_any_shape_are_outcomes_or_unreadable(frame in prop_oneof![
        vec(any::<u8>(), 0..64),
        json_value().prop_map(|value| value.to_string().into_bytes()),
        (json_value(), json_value()).prop_map(|(data, exception)| {
            serde_json::json!({"data": data, "exception": exception}).to_string().into_bytes()
        }),
    ]) {
        if let Err(reason) = parse_reply(&frame) {
            prop_assert!(reason.starts_with("unreadable reply ("), "{}", reason);
        }
    }
}
