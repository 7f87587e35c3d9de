//! [`Journaled`]: a dependency that writes its set-up and teardown into a journal shared with
//! the test, and fails where told, for tests of a service's start and stop.

use std::sync::{Arc, Mutex};

use micro_framework::dependencies::{Dependency, SetupContext};
use micro_framework::{BoxError, WorkerContext};

/// The entries written so far: `setup NAME`, `teardown NAME`.
pub type Journal = Arc<Mutex<Vec<String>>>;

/// Where a [`Journaled`] fails (after writing its entry).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    None,
    SetupFails,
    SetupPanics,
    TeardownPanics,
}

/// Journals its set-up and teardown and gives each call a clone of `output` (a route keeps
/// one dependency per output type: give each of a route's another type).
pub struct Journaled<T> {
    pub name: &'static str,
    pub journal: Journal,
    pub fault: Fault,
    pub output: T,
}

impl<T> Journaled<T> {
    /// One that does not fail.
    pub fn new(name: &'static str, journal: &Journal, output: T) -> Self {
        Journaled { name, journal: journal.clone(), fault: Fault::None, output }
    }

    /// The same, failing at `fault`.
    pub fn failing(self, fault: Fault) -> Self {
        Journaled { fault, ..self }
    }

    fn write(&self, entry: &str) {
        self.journal.lock().unwrap().push(format!("{entry} {}", self.name));
    }
}

#[micro_framework::async_trait]
impl<T: Clone + Send + Sync + 'static> Dependency for Journaled<T> {
    type Output = T;

    async fn setup(&self, _setup: &SetupContext) -> Result<(), BoxError> {
        self.write("setup");
        match self.fault {
            Fault::SetupFails => Err(format!("{} cannot start", self.name).into()),
            Fault::SetupPanics => panic!("{} cannot set up", self.name),
            Fault::None | Fault::TeardownPanics => Ok(()),
        }
    }

    async fn get(&self, _call: &WorkerContext) -> Result<T, BoxError> {
        Ok(self.output.clone())
    }

    async fn teardown(&self) {
        self.write("teardown");
        assert_ne!(self.fault, Fault::TeardownPanics, "{} cannot tear down", self.name);
    }
}

/// A database session's stand-in: each call's `after_call` writes `commit` when the call
/// succeeded, `roll back` when it failed.
pub struct Sessions(pub Journal);

/// What a target of a route with [`Sessions`] takes.
#[derive(Clone, Debug)]
pub struct Session;

#[micro_framework::async_trait]
impl Dependency for Sessions {
    type Output = Session;

    async fn get(&self, _call: &WorkerContext) -> Result<Session, BoxError> {
        Ok(Session)
    }

    async fn after_call(&self, _session: &Session, outcome: &micro_framework::Outcome) {
        let verdict = if outcome.is_ok() { "commit" } else { "roll back" };
        self.0.lock().unwrap().push(verdict.to_owned());
    }
}
