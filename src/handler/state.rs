//! [`ServiceState`]: values shared by every call of one service instance.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

type Values = HashMap<TypeId, Arc<dyn Any + Send + Sync>>;

/// Values shared by every route and call of one service instance, one per type, made on
/// first use and dropped when the service stops. Extractors that need state across calls (a
/// cache of declared exchanges, a shared reply queue) keep it here rather than in a static,
/// so two services in one process never see each other's.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use micro_framework::handler::ServiceState;
///
/// #[derive(Default)]
/// struct Calls(AtomicU64);
///
/// let state = ServiceState::default();
/// state.get_or_default::<Calls>().0.fetch_add(1, Ordering::Relaxed);
/// assert_eq!(state.get_or_default::<Calls>().0.load(Ordering::Relaxed), 1);
/// ```
#[derive(Clone, Default)]
pub struct ServiceState {
    values: Arc<Mutex<Values>>,
}

impl ServiceState {
    fn values(&self) -> MutexGuard<'_, Values> {
        // A panic while the lock was held cannot leave the map half-written.
        self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The value of type `T`, made by `make` if there is none yet.
    pub fn get_or_insert_with<T: Send + Sync + 'static>(&self, make: impl FnOnce() -> T) -> Arc<T> {
        let mut values = self.values();
        let found = values.get(&TypeId::of::<T>()).and_then(|value| value.clone().downcast().ok());
        found.unwrap_or_else(|| {
            let value = Arc::new(make());
            values.insert(TypeId::of::<T>(), value.clone());
            value
        })
    }

    /// The value of type `T`, made with `T::default()` if there is none yet.
    pub fn get_or_default<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        self.get_or_insert_with(T::default)
    }

    /// Drop every value: the service stopped (values may hold routes, which hold this state).
    pub(crate) fn clear(&self) {
        let values = std::mem::take(&mut *self.values());
        drop(values);
    }

    /// The value of type `T`, if one was made.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        let value = self.values().get(&TypeId::of::<T>()).cloned()?;
        value.downcast::<T>().ok()
    }
}

impl fmt::Debug for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceState").field("values", &self.values().len()).finish()
    }
}
