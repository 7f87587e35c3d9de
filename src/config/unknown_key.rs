//! [`UnknownKey`]: what a config key the framework does not read may be.

use std::fmt;

/// What a key of [`Config::extra`](crate::Config::extra) may be, so that the start-up warning
/// says something useful about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownKey {
    /// A key of Nameko or of the Python micro-framework that means nothing here; why, and
    /// what to use instead.
    PythonOnly(&'static str),
    /// A misspelling of this framework key.
    Resembles(&'static str),
    /// Nothing known: an application key, read with [`Config::get`](crate::Config::get).
    Application,
}

/// The Python originals' keys without a meaning here (matched case-insensitively).
const PYTHON_ONLY: &[(&str, &str)] = &[
    (
        "PROCESS_WORKER_TIMEOUT",
        "micro-framework's idle timeout of worker processes: worker processes here live until \
         MAX_TASKS_PER_CHILD calls or the stop; TASK_TIME_LIMIT bounds a call",
    ),
    (
        "AMPQ_URI",
        "the misspelt default of the Python micro-framework, never read there: use AMQP_URI",
    ),
    ("SERIALIZER", "Nameko's serializer: bodies here are always JSON"),
    ("SERIALIZERS", "Nameko's serializer registry: bodies here are always JSON"),
    ("ACCEPT", "Nameko's accepted content types: bodies here are always JSON"),
    ("HEARTBEAT", "Nameko's name for AMQP_HEARTBEAT"),
    (
        "AMQP_SSL",
        "Nameko's TLS options: use an amqps:// AMQP_URI with AMQP_SSL_CA_FILE, \
         AMQP_SSL_CERT_FILE and AMQP_SSL_KEY_FILE",
    ),
    ("TRANSPORT_OPTIONS", "kombu's transport options: publisher confirms are always on here"),
    ("LOGIN_METHOD", "kombu's login method: the credentials come from AMQP_URI"),
    ("LOGGING", "Nameko's logging configuration: use RUST_LOG and LOG_FORMAT"),
];

impl UnknownKey {
    /// What `key` may be; `closest` finds the framework key a misspelling resembles.
    pub(super) fn of(key: &str, closest: impl FnOnce(&str) -> Option<&'static str>) -> Self {
        let python = PYTHON_ONLY.iter().find(|(name, _)| name.eq_ignore_ascii_case(key));
        match (python, closest(key)) {
            (Some((_, meaning)), _) => UnknownKey::PythonOnly(meaning),
            (None, Some(known)) => UnknownKey::Resembles(known),
            (None, None) => UnknownKey::Application,
        }
    }
}

impl fmt::Display for UnknownKey {
    /// The end of the start-up warning about such a key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnknownKey::PythonOnly(meaning) => {
                write!(f, "a key of the Python originals with no meaning here ({meaning})")
            }
            UnknownKey::Resembles(known) => write!(
                f,
                "not a micro-framework key (did you mean {known}?); it is kept for Config::get"
            ),
            UnknownKey::Application => {
                f.write_str("not a micro-framework key; it is kept for Config::get")
            }
        }
    }
}
