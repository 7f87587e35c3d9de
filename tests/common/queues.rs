//! Queues in tests: names at the broker's limits, a message handed back as by a crash.

/// An event of `shop` whose queue for the route `route` of the service `service`
/// (`evt-{shop}-{event}--{service}.{route}`) is 250 bytes long: its dead-letter queue
/// (`{queue}.dlq`) fits in an AMQP short string of 255 bytes, its delay queues
/// (`{queue}.delay-{ms}`) do not. Returns the event and the queue.
pub fn event_with_a_250_byte_queue(shop: &str, service: &str, route: &str) -> (String, String) {
    let short = format!("evt-{shop}---{service}.{route}").len();
    let event = "e".repeat(250 - short);
    let queue = format!("evt-{shop}-{event}--{service}.{route}");
    (event, queue)
}

/// Take the first message of `queue` (waiting for it) and hand it back unsettled: the broker
/// delivers it again marked redelivered, as after a consumer that crashed while it ran.
pub async fn put_back_redelivered(
    transport: &micro_framework::transport::SharedTransport,
    queue: &str,
) {
    for _ in 0..500 {
        if let Some(delivery) = transport.get(queue).await.unwrap() {
            return delivery.acker.nack(true).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no message came to {queue}");
}
