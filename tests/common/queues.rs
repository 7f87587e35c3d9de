//! Queue names at the broker's limits.

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
