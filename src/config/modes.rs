//! The enumerated settings: [`WorkerMode`], [`Protocol`] and [`QueueType`].

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserialize, Deserializer, Unexpected};
use serde::{Serialize, Serializer};

use super::ConfigError;

/// Defines a fieldless enum spelled in configuration as snake_case words, with `as_str`,
/// `ALL`, `Display`, `FromStr` (ASCII case-insensitive, surrounding whitespace ignored; the
/// error names the key and lists the accepted words) and serde support.
macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        $name:ident for $key:literal {
            $( $(#[$variant_meta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            $( $(#[$variant_meta])* $variant, )+
        }

        impl $name {
            #[doc = concat!("Every value, in the order `", $key, "` lists them.")]
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            #[doc = concat!("The spelling in configuration (the value of `", $key, "`).")]
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ConfigError;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                let wanted = text.trim();
                $name::ALL
                    .iter()
                    .copied()
                    .find(|candidate| candidate.as_str().eq_ignore_ascii_case(wanted))
                    .ok_or_else(|| {
                        ConfigError::new($key, text, format!("expected {}", one_of($name::ALL)))
                    })
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(|_: ConfigError| {
                    let expected = one_of($name::ALL);
                    de::Error::invalid_value(Unexpected::Str(&text), &expected.as_str())
                })
            }
        }
    };
}

/// `one of a, b, c` for the values of an enum.
fn one_of<T: fmt::Display>(values: &[T]) -> String {
    let words: Vec<String> = values.iter().map(ToString::to_string).collect();
    format!("one of {}", words.join(", "))
}

config_enum! {
    /// How a service runs its workers (`WORKER_MODE`).
    WorkerMode for "WORKER_MODE" {
        /// `thread`: a pool of `MAX_WORKERS` threads (the default).
        #[default]
        Thread => "thread",
        /// `greedy_thread`: threads that take messages as fast as they can.
        GreedyThread => "greedy_thread",
        /// `process`: a pool of `MAX_WORKERS` processes.
        Process => "process",
        /// `greedy_process`: processes that take messages as fast as they can.
        GreedyProcess => "greedy_process",
    }
}

config_enum! {
    /// The message protocol spoken on the broker (`PROTOCOL`).
    Protocol for "PROTOCOL" {
        /// `nameko`: compatible with Nameko services (the default).
        #[default]
        Nameko => "nameko",
        /// `micro_framework`: the Python micro-framework's own protocol.
        MicroFramework => "micro_framework",
    }
}

config_enum! {
    /// The RabbitMQ queue type declared for the service's queues (`QUEUE_TYPE`).
    QueueType for "QUEUE_TYPE" {
        /// `classic`: classic queues (the default).
        #[default]
        Classic => "classic",
        /// `quorum`: replicated quorum queues.
        Quorum => "quorum",
    }
}

config_enum! {
    /// How `AsyncBackOff` delays a retry on the broker (`RETRY_DELAY`).
    RetryDelay for "RETRY_DELAY" {
        /// `delay_queues`: per-delay queues with a per-queue TTL that dead-letter back to the
        /// route's queue; works on stock RabbitMQ (the default).
        #[default]
        DelayQueues => "delay_queues",
        /// `delayed_message_plugin`: the `x-delayed-message` exchange of the
        /// `rabbitmq_delayed_message_exchange` plugin, as the Python original uses it.
        DelayedMessagePlugin => "delayed_message_plugin",
    }
}

config_enum! {
    /// How `Runner::start` writes logs (`LOG_FORMAT`).
    LogFormat for "LOG_FORMAT" {
        /// `text`: readable lines (the default).
        #[default]
        Text => "text",
        /// `json`: one JSON object per line, for log collectors.
        Json => "json",
    }
}

impl WorkerMode {
    /// True for the greedy modes, which finish every message already received on shutdown.
    pub fn is_greedy(self) -> bool {
        matches!(self, WorkerMode::GreedyThread | WorkerMode::GreedyProcess)
    }

    /// True for the modes that run each call in a child process.
    pub fn is_process(self) -> bool {
        matches!(self, WorkerMode::Process | WorkerMode::GreedyProcess)
    }
}
