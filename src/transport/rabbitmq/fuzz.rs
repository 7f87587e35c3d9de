//! Fuzzing what the RabbitMQ transport reads: broker URIs (the password must never leak
//! into an error), and field tables as lapin parses them off the wire.

use lapin::types::parsing::parse_field_table;
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use proptest::prelude::*;

use lapin::protocol::basic::gen_properties;

use super::convert::{
    from_amqp_value, from_field_table, to_amqp_value, to_basic_properties, to_field_table,
};
use super::uri::parse_uri;
use crate::data::fuzz_support::{config, headers};
use crate::data::{HeaderValue, Properties};
use crate::transport::limits::content_header_frame_len;

/// Any field value lapin can deliver, nested up to 4 levels.
fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        Just(AMQPValue::Void),
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        ".{0,12}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
        prop::collection::vec(any::<u8>(), 0..16)
            .prop_map(|bytes| AMQPValue::LongString(LongString::from(bytes))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        prop::collection::vec(any::<u8>(), 0..16)
            .prop_map(|bytes| AMQPValue::ByteArray(bytes.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6)
                .prop_map(|items| AMQPValue::FieldArray(FieldArray::from(items))),
            prop::collection::btree_map(".{0,8}", inner, 0..6).prop_map(|map| {
                let mut table = FieldTable::default();
                for (key, value) in map {
                    table.insert(ShortString::from(key), value);
                }
                AMQPValue::FieldTable(table)
            }),
        ]
    })
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn uris_parse_or_fail_without_the_password(
        scheme in prop::sample::select(vec!["amqp", "amqps", "http", "", "amqp:"]),
        user in "[a-z%@:]{0,6}",
        host in prop_oneof![Just("host".to_owned()), Just("[::1]".to_owned()), ".{0,8}"],
        port in prop_oneof![Just(String::new()), Just(":5672".to_owned()), ":.{0,6}"],
        rest in prop_oneof![Just("/".to_owned()), "/.{0,10}", "\\?.{0,12}"],
    ) {
        let password = "Pw-9f3kq1";
        let uri = format!("{scheme}://{user}:{password}@{host}{port}{rest}");
        match parse_uri(&uri, 60) {
            Ok(parsed) => prop_assert!(!parsed.masked.contains(password), "{}", parsed.masked),
            Err(error) => prop_assert!(!error.to_string().contains(password), "{error}"),
        }
    }

    #[test]
    fn arbitrary_uris_never_panic(uri in ".{0,40}", heartbeat in any::<u16>()) {
        let _ = parse_uri(&uri, heartbeat);
    }

    #[test]
    fn received_values_convert(value in amqp_value()) {
        let converted = from_amqp_value(&value);
        // what came in can go out again (keys and strings came from the wire)
        prop_assert!(to_amqp_value(&converted).is_ok());
    }

    #[test]
    fn sent_headers_convert_or_fail_cleanly(headers in headers()) {
        if let Ok(table) = to_field_table(&headers) {
            let _ = from_field_table(&table);
        }
    }

    #[test]
    fn the_header_size_check_counts_what_lapin_sends(
        headers in headers(),
        correlation_id in proptest::option::of(".{0,40}"),
        timestamp in proptest::option::of(any::<u64>()),
    ) {
        let properties = Properties { headers, correlation_id, timestamp, ..Properties::default() };
        if let Ok(basic) = to_basic_properties(&properties) {
            let encoded = gen_properties(&basic)(Vec::new().into())
                .map_err(|error| TestCaseError::fail(format!("{error:?}")))?;
            // frame (type, channel, size, end) + class, weight and body size + the properties
            let frame_len = 8 + 12 + usize::try_from(encoded.position).unwrap_or(usize::MAX);
            prop_assert_eq!(content_header_frame_len(&properties), frame_len);
        }
    }

    #[test]
    fn decimals_keep_their_sign_and_scale(scale in any::<u8>(), value in any::<i32>()) {
        let decimal = HeaderValue::Decimal { scale, value };
        let sent = to_amqp_value(&decimal).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(from_amqp_value(&sent), decimal);
    }

    #[test]
    fn wire_tables_parse_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok((_, table)) = parse_field_table(bytes.as_slice()) {
            let _ = from_field_table(&table);
        }
    }
}
