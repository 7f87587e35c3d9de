//! Lost links: why each was lost, for the log, and the pause before reconnecting when links
//! keep dying young. A broker that drops every new connection at once (one message the AMQP
//! client cannot read, first in a queue, is delivered again on each) would otherwise be
//! reconnected to as fast as it answers, tens of times a second.

use std::time::Duration;

use super::options::RabbitMqOptions;

/// A link that dies sooner than this after it was made died young.
const YOUNG: Duration = Duration::from_secs(2);

/// The links lost in a row, each soon after it was made.
#[derive(Default)]
pub(super) struct YoungLosses {
    in_a_row: u32,
}

impl YoungLosses {
    /// Record the loss of a link that lived `lived`; the pause before the next reconnect. The
    /// first young loss reconnects at once (a broker restarted, a connection closed by
    /// hand); from the second in a row the pause doubles from `reconnect_min` up to
    /// `reconnect_max`.
    pub(super) fn pause_after(&mut self, lived: Duration, options: &RabbitMqOptions) -> Duration {
        if lived >= YOUNG {
            self.in_a_row = 0;
            return Duration::ZERO;
        }
        self.in_a_row = self.in_a_row.saturating_add(1);
        match self.in_a_row {
            1 => Duration::ZERO,
            n => options
                .reconnect_min
                .saturating_mul(1 << (n - 2).min(16))
                .min(options.reconnect_max),
        }
    }
}

/// Log the loss of the link to `uri`, with the connection's last error when it reported one.
pub(super) fn log_loss(uri: &str, error: Option<&lapin::Error>) {
    match error {
        Some(error) if matches!(error.kind(), lapin::ErrorKind::ParsingError(_)) => {
            tracing::error!(
                %uri,
                %error,
                "connection to the broker lost: the AMQP client cannot read a frame the broker \
                 sent ({error}), most likely a message with a property, header name or routing \
                 key that is not UTF-8; RabbitMQ delivers it again on the next connection (see \
                 micro-framework's README, Limits, for how to remove it); reconnecting"
            );
        }
        Some(error) => {
            tracing::warn!(%uri, %error, "connection to the broker lost ({error}); reconnecting")
        }
        None => tracing::warn!(%uri, "connection to the broker lost; reconnecting"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> RabbitMqOptions {
        RabbitMqOptions {
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(1),
            ..RabbitMqOptions::new("amqp://localhost")
        }
    }

    #[test]
    fn links_dying_young_in_a_row_wait_longer_and_longer_before_the_next() {
        let mut losses = YoungLosses::default();
        let young = Duration::from_millis(10);
        let pauses: Vec<u64> =
            (0..6).map(|_| losses.pause_after(young, &options()).as_millis() as u64).collect();
        assert_eq!(pauses, [0, 100, 200, 400, 800, 1000]);
    }

    #[test]
    fn a_link_that_lived_resets_the_pause() {
        let mut losses = YoungLosses::default();
        let young = Duration::from_millis(10);
        losses.pause_after(young, &options());
        losses.pause_after(young, &options());
        assert_eq!(losses.pause_after(Duration::from_secs(60), &options()), Duration::ZERO);
        assert_eq!(losses.pause_after(young, &options()), Duration::ZERO);
        assert_eq!(losses.pause_after(young, &options()), Duration::from_millis(100));
    }

    #[test]
    fn many_losses_in_a_row_do_not_overflow() {
        let mut losses = YoungLosses { in_a_row: u32::MAX - 1 };
        let young = Duration::from_millis(10);
        assert_eq!(losses.pause_after(young, &options()), Duration::from_secs(1));
        assert_eq!(losses.pause_after(young, &options()), Duration::from_secs(1));
    }
}
