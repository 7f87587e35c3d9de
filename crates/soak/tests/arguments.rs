//! The soak binary's command line: every bad argument is refused with a message that says
//! what is wrong, before anything connects or starts.

use std::process::{Command, Output};

fn soak(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_soak"))
        .args(args)
        // nothing may be reached: a refused argument is refused before any connection
        .env("AMQP_URI", "amqp://guest:guest@127.0.0.1:1/")
        .output()
        .expect("the soak binary runs")
}

fn refused(args: &[&str]) -> String {
    let output = soak(args);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
    assert!(output.stdout.is_empty(), "{args:?}: {output:?}");
    String::from_utf8(output.stderr).expect("utf-8")
}

#[test]
fn a_value_that_is_not_a_number_is_refused_by_name() {
    for flag in ["--seconds", "--rate", "--interval", "--drain"] {
        let message = refused(&[flag, "soon"]);
        assert!(message.contains(&format!("{flag}: not a number: soon")), "{message}");
    }
}

#[test]
fn a_flag_without_its_value_is_refused() {
    let message = refused(&["--seconds"]);
    assert!(message.contains("--seconds needs a value"), "{message}");
}

#[test]
fn values_out_of_range_are_refused() {
    let message = refused(&["--rate", "1"]);
    assert!(message.contains("--rate must be between 3 and 10000"), "{message}");
    let message = refused(&["--rate", "NaN"]);
    assert!(message.contains("--rate must be between 3 and 10000"), "{message}");
    let message = refused(&["--interval", "2"]);
    assert!(message.contains("--interval must be at least 3 seconds"), "{message}");
}

#[test]
fn an_unknown_argument_is_refused_with_the_usage() {
    let message = refused(&["--secs", "5"]);
    assert!(message.contains("unknown argument --secs"), "{message}");
    assert!(message.contains("usage: soak"), "{message}");
}

#[test]
fn the_internal_service_arguments_go_together() {
    let message = refused(&["--role", "a"]);
    assert!(message.contains("--role, --run and --dir go together"), "{message}");
    let message = refused(&["--role", "c", "--run", "r", "--dir", "/tmp"]);
    assert!(message.contains("--role: a or b, not c"), "{message}");
}
