//! The AMQP channels a service's consumers take, checked at start against how many its
//! connection may open: a service with more queue routes than the broker's `channel_max`
//! (RabbitMQ's default is 2047) would otherwise start, report itself ready, and stop a moment
//! later, one route after another failing to open its consumer's channel.

use super::plan::RoutePlan;
use crate::config::{Config, Protocol};
use crate::error::{Error, Result};
use crate::pipeline::entrypoint_kind::Kind;
use crate::transport::Transport;

/// The consumers the started routes of `plans` open at least, each on a channel of its own:
/// one per event or queue listener, one per micro-framework RPC target and one for its
/// built-in commands, one for all the Nameko RPC methods. (Timers, retry queues of the
/// delayed-message plugin and RPC reply queues may take a few more.)
fn consumers_at_least(plans: &[RoutePlan], config: &Config) -> usize {
    let (mut listeners, mut targets, mut nameko) = (0, 0, false);
    let kinds = plans
        .iter()
        .filter(|plan| plan.started)
        .filter_map(|plan| plan.route.entrypoint_info.as_ref().map(|info| &info.kind));
    for kind in kinds {
        match kind {
            Kind::Event { .. } | Kind::Queue => listeners += 1,
            Kind::Rpc { protocol, .. } => match protocol.unwrap_or(config.protocol) {
                Protocol::Nameko => nameko = true,
                Protocol::MicroFramework => targets += 1,
            },
            _ => {}
        }
    }
    let commands = usize::from(targets > 0);
    listeners + targets + commands + usize::from(nameko)
}

/// Refuse the start when the routes of `plans` need more channels than `transport`'s
/// connection allows: their consumers, one channel for declarations and one for publishing
/// (replies, retries and dead letters: a route that cannot publish cannot settle a failure).
pub(super) fn check_channel_limit(
    plans: &[RoutePlan],
    config: &Config,
    transport: &dyn Transport,
) -> Result<()> {
    let Some(limit) = transport.channel_limit() else { return Ok(()) };
    let consumers = consumers_at_least(plans, config);
    let needed = consumers + 2;
    if needed <= limit {
        return Ok(());
    }
    Err(Error::Startup(format!(
        "the routes need at least {needed} AMQP channels on the service's connection (one per \
         consumer: {consumers}, one per event or queue listener and per micro-framework RPC \
         target, one for the Nameko RPC methods; one for declarations and one for publishing), and the \
         connection allows {limit} (channel_max, the lower of the broker's, 2047 by default on \
         RabbitMQ, and AMQP_URI's ?channel_max=): raise RabbitMQ's channel_max (rabbitmq.conf) \
         and AMQP_URI's if set, or split the routes among services"
    )))
}
