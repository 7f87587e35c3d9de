//! The environment variable that puts the services of tests on RabbitMQ, read by
//! [`test_config`](crate::testing::test_config) and by the clean-up of test virtual hosts.

/// The environment variable that moves [`test_config`](crate::testing::test_config) to RabbitMQ, e.g.
/// `TEST_AMQP_URI=amqp://guest:guest@127.0.0.1:5672/`.
pub const TEST_AMQP_URI_ENV: &str = "TEST_AMQP_URI";
