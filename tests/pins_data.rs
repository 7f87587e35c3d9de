//! Pins from a mutation review of the data layer's errors: a parameter's `SetupError` made
//! from a `String`, and what a configuration error masks after a mistyped scheme.

use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::config::ConfigError;
use micro_framework::extract::TargetSetup;
use micro_framework::prelude::*;
use micro_framework::testing::{memory_test_config, TestService};
use micro_framework::{ExtractError, FromContext, SetupError, WorkerContext};

/// A parameter no route provides: its check says why, in a `String` it formats.
struct Ticket;

impl FromContext for Ticket {
    fn from_context(_ctx: &WorkerContext) -> Result<Self, ExtractError> {
        Err(ExtractError::Unavailable("no ticket office".into()))
    }

    fn check(setup: &TargetSetup) -> Result<(), SetupError> {
        Err(format!("route {} has no ticket office", setup.route).into())
    }
}

fn board(_ticket: Ticket) {}

/// A `SetupError` made from a `String` keeps it as its reason, and the start it stops says
/// it. Mutant: the `String` dropped, an empty reason.
#[tokio::test]
async fn a_setup_error_from_a_string_keeps_its_reason_and_the_start_says_it() {
    let error = SetupError::from("route x has no ticket office".to_owned());
    assert_eq!(error.reason(), "route x has no ticket office");
    assert_eq!(error.to_string(), "route x has no ticket office");
    let routes = vec![Route::new(board).entrypoint(EventListener::new("station", "boarding"))];
    let refused = TestService::start(routes, memory_test_config("pins_setup")).await.unwrap_err();
    assert!(refused.to_string().contains("route board has no ticket office"), "{refused}");
}

/// `SetupError::reason` is the reason it was made with. Mutant: an empty reason.
#[test]
fn a_setup_error_tells_its_reason() {
    assert_eq!(SetupError::new("no ticket office").reason(), "no ticket office");
    assert_eq!(SetupError::from("no ticket office").reason(), "no ticket office");
}

/// A `//` after a mistyped scheme (`~x:`) whose first word has its first `:` after a `/`
/// (`d/a:b`, a path) begins no URI: inside a password holding an `@`, a blank and `://`, it
/// does not end the URI before it, whose password is masked to its last `@`. Mutant: any `:`
/// of the first word taken for a `user:`, the URI cut there and the rest of its password shown.
#[test]
fn a_colon_after_a_slash_past_a_mistyped_scheme_does_not_cut_a_password() {
    let error = ConfigError::new("BROKER", "", "cannot reach amqp://u:p@q ~x://d/a:b r@mq/ now");
    assert_eq!(error.reason, "cannot reach amqp://u:***@mq/ now");
}
