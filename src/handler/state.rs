//! [`ServiceState`]: values shared by every call of one service instance.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// One cell per type, an `OnceLock<Arc<T>>` under `T`'s type id: a value is made in its own
/// cell, outside the map's lock, so a maker may use the state itself (a value built from
/// another) without a deadlock, and runs once.
type Values = HashMap<TypeId, Arc<dyn Any + Send + Sync>>;

/// Values shared by every route and call of one service instance, one per type, made on
/// first use and dropped when the service stops. Extractors that need state across calls (a
/// cache of declared exchanges, a shared reply queue) keep it here rather than in a static,
/// so two services in one process never see each other's.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use micro_framework::ServiceState;
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

    /// The value of type `T`, made by `make` if there is none yet. Calls that come while it
    /// is being made wait for it: `make` runs once. It may use this state for values of other
    /// types (one of its own type would wait for itself).
    pub fn get_or_insert_with<T: Send + Sync + 'static>(&self, make: impl FnOnce() -> T) -> Arc<T> {
        self.cell::<T>().get_or_init(|| Arc::new(make())).clone()
    }

    /// The cell of type `T`, made empty if there is none yet.
    fn cell<T: Send + Sync + 'static>(&self) -> Arc<OnceLock<Arc<T>>> {
        let mut values = self.values();
        let cell = values
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(OnceLock::<Arc<T>>::new()))
            .clone();
        // `T`'s type id only ever holds a cell of `T`
        cell.downcast().unwrap_or_default()
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
        let cell = self.values().get(&TypeId::of::<T>()).cloned()?;
        cell.downcast::<OnceLock<Arc<T>>>().ok()?.get().cloned()
    }
}

impl fmt::Debug for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceState").field("values", &self.values().len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Settings(u32);
    struct Client(u32);

    #[test]
    fn a_value_can_be_made_from_another_of_the_same_state() {
        let state = ServiceState::default();
        let (done, finished) = std::sync::mpsc::channel();
        let made = state.clone();
        // on a thread of its own: with the old map-wide lock, this deadlocked
        std::thread::spawn(move || {
            let client =
                made.get_or_insert_with(|| Client(made.get_or_insert_with(|| Settings(7)).0));
            let _ = done.send(client.0);
        });
        let made = finished.recv_timeout(std::time::Duration::from_secs(5));
        assert_eq!(made.ok(), Some(7), "the maker used the state for another value");
        assert_eq!(state.get::<Settings>().map(|settings| settings.0), Some(7));
        assert!(state.get::<u64>().is_none());
    }

    #[test]
    fn concurrent_first_uses_make_the_value_once() {
        let state = ServiceState::default();
        let makes = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (state, makes) = (state.clone(), makes.clone());
                std::thread::spawn(move || {
                    state.get_or_insert_with(|| {
                        makes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        Settings(1)
                    })
                })
            })
            .collect();
        for thread in threads {
            assert_eq!(thread.join().unwrap().0, 1);
        }
        assert_eq!(makes.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
