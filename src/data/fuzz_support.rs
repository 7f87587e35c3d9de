//! Shared pieces of the crate's fuzz tests (`cargo test --lib fuzz`).

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::Config;

use crate::data::{HeaderValue, Headers};

/// Cases from `PROPTEST_CASES` (default 256), divided by `cost` for slow properties. No
/// regression files: fixed cases are kept as plain tests.
pub(crate) fn config(cost: u32) -> Config {
    let base = Config::default();
    Config { cases: (base.cases / cost).max(1), failure_persistence: None, ..base }
}

/// Header and table keys, biased to the ones the framework reads.
pub(crate) fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "nameko.call_id_stack",
            "x-death",
            "x-mf-retry-count",
            "x-mf-last-retry",
            "x-mf-retry-queue",
            "x-mf-retry-route",
            "x-delivery-count",
            "queue",
            "count",
            "reason",
        ])
        .prop_map(str::to_owned),
        ".{0,12}",
    ]
}

/// Any header value, nested up to 4 levels, with extreme numbers.
pub(crate) fn header_value() -> impl Strategy<Value = HeaderValue> {
    let int = prop_oneof![any::<i64>(), Just(i64::MAX), Just(i64::MIN), -2i64..20];
    let leaf = prop_oneof![
        Just(HeaderValue::Void),
        any::<bool>().prop_map(HeaderValue::Bool),
        int.prop_map(HeaderValue::Int),
        any::<f64>().prop_map(HeaderValue::Float),
        (any::<u8>(), any::<i32>())
            .prop_map(|(scale, value)| HeaderValue::Decimal { scale, value }),
        ".{0,16}".prop_map(HeaderValue::String),
        vec(any::<u8>(), 0..16).prop_map(HeaderValue::Bytes),
        prop_oneof![any::<u64>(), Just(u64::MAX)].prop_map(HeaderValue::Timestamp),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(HeaderValue::Array),
            btree_map(key(), inner, 0..6).prop_map(HeaderValue::Table),
        ]
    })
}

/// Any headers.
pub(crate) fn headers() -> impl Strategy<Value = Headers> {
    btree_map(key(), header_value(), 0..6)
}

/// Any JSON value, nested a few levels, its strings any text (escapes and non-ASCII too), the
/// keys of its objects from `keys`.
pub(crate) fn json_value(keys: BoxedStrategy<String>) -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 5, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            btree_map(keys.clone(), inner, 0..5)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}
