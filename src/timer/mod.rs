//! Timers: [`TimeEntrypoint`] calls its route on an interval or a cron schedule, on every
//! instance or once across the cluster.

mod entrypoint;
mod fired_at;
mod leadership;

pub use entrypoint::{Schedule, TimeEntrypoint};
pub(crate) use fired_at::{python_datetime, tick_message};
