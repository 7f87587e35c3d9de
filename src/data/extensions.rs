//! [`Extensions`]: what an entrypoint attaches to a message beyond AMQP, as named JSON values.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Named values an entrypoint attaches to a [`Message`](super::Message) (the HTTP entrypoint
/// stores its request under `"http"`). They are JSON so that a message stays plain data and
/// can be handed to a worker process.
///
/// ```
/// use micro_framework::Extensions;
/// let mut extensions = Extensions::default();
/// extensions.insert("origin", &"timer").unwrap();
/// assert_eq!(extensions.get::<String>("origin").unwrap().as_deref(), Some("timer"));
/// assert!(extensions.get::<String>("missing").unwrap().is_none());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Extensions(BTreeMap<String, Value>);

impl Extensions {
    /// Attach `value` under `name`, replacing what was there.
    pub fn insert<T: Serialize + ?Sized>(
        &mut self,
        name: &str,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        self.0.insert(name.to_owned(), serde_json::to_value(value)?);
        Ok(())
    }

    /// The value under `name`, deserialized; `Ok(None)` when there is none.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, serde_json::Error> {
        self.0.get(name).map(|value| T::deserialize(value)).transpose()
    }

    /// True when nothing is attached.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
