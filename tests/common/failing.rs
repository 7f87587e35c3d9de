//! An entrypoint that fails (or panics) once the service runs, as one whose queue was
//! deleted: for the tests of how a route stopping the service is reported.

use std::time::Duration;

use micro_framework::entrypoints::Entrypoint;
use micro_framework::transport::{ClosedPart, TransportError};
use micro_framework::{Error, RouteHandle};

/// Fails (or panics, with `panic`) 50 ms after the service started running it.
pub struct Failing {
    pub panic: bool,
}

#[micro_framework::async_trait]
impl Entrypoint for Failing {
    fn describe(&self) -> String {
        "Failing".into()
    }

    async fn run(self: Box<Self>, _route: RouteHandle) -> micro_framework::Result<()> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if self.panic {
            panic!("entrypoint gave up");
        }
        Err(Error::Transport(TransportError::Closed {
            what: ClosedPart::Consumer,
            reason: "the queue was deleted".into(),
        }))
    }
}
