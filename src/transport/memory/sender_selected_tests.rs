//! Behaviour tests of sender-selected distribution (`CC` and `BCC`), each checked against
//! RabbitMQ 3.10 first.

use super::tests::{binding, declare, exchange, get, message, ready};
use super::{MemoryBroker, MemoryTransport};
use crate::transport::{
    ExchangeKind, HeaderValue, OutgoingMessage, PublishOptions, QueueSpec, Transport,
    TransportError,
};

fn connect(name: &str) -> MemoryTransport {
    MemoryBroker::new(name).connect()
}

fn keys(names: &[&str]) -> HeaderValue {
    HeaderValue::Array(names.iter().map(|name| HeaderValue::from(*name)).collect())
}

fn copied(cc: Option<HeaderValue>, bcc: Option<HeaderValue>) -> OutgoingMessage {
    let mut message = message("job");
    for (name, value) in [("CC", cc), ("BCC", bcc)] {
        if let Some(value) = value {
            message.properties.headers.insert(name.into(), value);
        }
    }
    message
}

async fn lengths(t: &MemoryTransport, queues: &[&str]) -> Vec<u32> {
    let mut lengths = Vec::new();
    for queue in queues {
        lengths.push(ready(t, queue).await);
    }
    lengths
}

#[tokio::test]
async fn cc_and_bcc_route_a_message_to_each_of_their_keys_and_bcc_is_not_delivered() {
    let t = connect("cc-default");
    for queue in ["a", "b", "c"] {
        declare(&t, queue).await;
    }
    let message = copied(Some(keys(&["b"])), Some(keys(&["c"])));
    t.publish("", "a", message, PublishOptions::default()).await.unwrap();
    assert_eq!(lengths(&t, &["a", "b", "c"]).await, [1, 1, 1]);
    for queue in ["a", "b", "c"] {
        let delivery = get(&t, queue).await;
        let headers = &delivery.properties.headers;
        assert_eq!(headers.get("CC"), Some(&keys(&["b"])), "{queue}");
        assert!(!headers.contains_key("BCC"), "{queue}: {headers:?}");
        assert_eq!(delivery.routing_key, "a", "{queue}");
    }
}

#[tokio::test]
async fn a_queue_matched_by_several_keys_gets_the_message_once() {
    let t = connect("cc-once");
    t.declare_exchange(&exchange("events", ExchangeKind::Topic)).await.unwrap();
    for queue in ["all", "paid"] {
        declare(&t, queue).await;
    }
    t.bind_queue(&binding("all", "events", "order.*")).await.unwrap();
    t.bind_queue(&binding("paid", "events", "order.paid")).await.unwrap();
    let message = copied(Some(keys(&["order.paid", "order.paid"])), Some(keys(&["order.sent"])));
    t.publish("events", "order.made", message, PublishOptions::default()).await.unwrap();
    assert_eq!(lengths(&t, &["all", "paid"]).await, [1, 1]);
    // on the default exchange too, the routing key itself repeated in CC
    let message = copied(Some(keys(&["all", "all"])), None);
    t.publish("", "all", message, PublishOptions::default()).await.unwrap();
    assert_eq!(lengths(&t, &["all", "paid"]).await, [2, 1]);
}

#[tokio::test]
async fn a_cc_key_makes_a_mandatory_publish_routable() {
    let t = connect("cc-mandatory");
    declare(&t, "b").await;
    let message = copied(Some(keys(&["b"])), None);
    t.publish("", "nowhere", message, PublishOptions { mandatory: true }).await.unwrap();
    assert_eq!(ready(&t, "b").await, 1);
}

#[tokio::test]
async fn cc_elements_that_are_not_strings_are_skipped() {
    let t = connect("cc-elements");
    for queue in ["a", "b", "c"] {
        declare(&t, queue).await;
    }
    let cc = HeaderValue::Array(vec![
        HeaderValue::Int(5),
        HeaderValue::Bytes(b"c".to_vec()),
        HeaderValue::Array(vec![HeaderValue::from("c")]),
        HeaderValue::from("b"),
    ]);
    t.publish("", "a", copied(Some(cc.clone()), None), PublishOptions::default()).await.unwrap();
    assert_eq!(lengths(&t, &["a", "b", "c"]).await, [1, 1, 0]);
    assert_eq!(get(&t, "b").await.properties.headers.get("CC"), Some(&cc));
}

#[tokio::test]
async fn a_cc_or_bcc_that_is_not_an_array_fails_the_publish_as_on_rabbitmq() {
    let t = connect("cc-refused");
    declare(&t, "a").await;
    let refused = [
        (Some(HeaderValue::from("a")), None, "{unacceptable_type_in_header,\"CC\",longstr}"),
        (None, Some(HeaderValue::Int(5)), "{unacceptable_type_in_header,\"BCC\",long}"),
    ];
    for (cc, bcc, expected) in refused {
        let error = t.publish("", "a", copied(cc, bcc), PublishOptions::default()).await;
        assert!(
            matches!(&error, Err(TransportError::PreconditionFailed(text)) if text.contains(expected)),
            "{error:?}"
        );
    }
    assert_eq!(ready(&t, "a").await, 0);
}

#[tokio::test]
async fn a_dead_letter_keeps_its_cc_and_bcc_keys_unless_a_dead_letter_routing_key_replaces_them() {
    let t = connect("cc-dead-letters");
    for queue in ["b", "c", "d"] {
        declare(&t, queue).await;
    }
    let expiring = |name: &str, routing_key: Option<&str>| {
        let mut spec = QueueSpec::durable(name);
        spec.arguments.insert("x-message-ttl".into(), HeaderValue::Int(0));
        spec.arguments.insert("x-dead-letter-exchange".into(), "".into());
        if let Some(key) = routing_key {
            spec.arguments.insert("x-dead-letter-routing-key".into(), key.into());
        }
        spec
    };
    t.declare_queue(&expiring("to_d", Some("d"))).await.unwrap();
    t.declare_queue(&expiring("back", None)).await.unwrap();

    let message = copied(Some(keys(&["b"])), Some(keys(&["c"])));
    t.publish("", "to_d", message, PublishOptions::default()).await.unwrap();
    assert_eq!(lengths(&t, &["b", "c", "d"]).await, [1, 1, 1]);
    let dead = get(&t, "d").await;
    assert!(!dead.properties.headers.contains_key("CC"), "{:?}", dead.properties.headers);
    let Some(HeaderValue::Array(deaths)) = dead.properties.headers.get("x-death") else {
        panic!("no x-death: {:?}", dead.properties.headers)
    };
    let Some(HeaderValue::Table(death)) = deaths.first() else { panic!("{deaths:?}") };
    assert_eq!(death.get("routing-keys"), Some(&keys(&["to_d", "b"])));

    // without a dead-letter routing key, routed again with every key, BCC's included (the
    // expired queue itself left out: a cycle)
    let message = copied(Some(keys(&["b"])), Some(keys(&["c"])));
    t.publish("", "back", message, PublishOptions::default()).await.unwrap();
    assert_eq!(lengths(&t, &["b", "c", "d", "back"]).await, [3, 3, 0, 0]);
    let _first = get(&t, "c").await;
    let _second = get(&t, "c").await;
    let again = get(&t, "c").await;
    assert_eq!(again.properties.headers.get("CC"), Some(&keys(&["b"])));
    assert!(!again.properties.headers.contains_key("BCC"));
    assert!(again.properties.headers.contains_key("x-death"));
}
