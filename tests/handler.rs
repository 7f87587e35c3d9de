//! The handler model end to end: translators, dependencies and their life cycle around a
//! call, on the in-process broker.

use micro_framework::prelude::*;
use micro_framework::testing::{call_route, memory_test_config};
use micro_framework::{FailureKind, Message};
use serde_json::{json, Value};

fn echo(Payload(payload): Payload<Value>) -> Value {
    payload
}

#[tokio::test]
async fn a_panicking_translator_is_bad_input_not_a_lost_message() {
    let pick = |payload: Value| -> Result<Value, String> {
        // a translator written for one shape, handed another
        Ok(json!(payload["order"].as_object().expect("an order").len()))
    };
    let route = Route::new(echo).translator(pick);
    let message = Message::json(&json!({ "no_order": 1 })).unwrap();
    let outcome = call_route(route, memory_test_config("translate"), message).await;
    let failure = outcome.unwrap_err();
    assert_eq!(failure.kind, FailureKind::BadInput, "{failure}");
    assert!(failure.message.contains("translator #1 panicked: an order"), "{failure}");
}
