//! RPC targets the tests share: `add(a, b)`, `echo(x)`, `fail()`.

use micro_framework::amqp::rpc::Args;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
pub struct AddArgs {
    pub a: i64,
    pub b: i64,
}

pub fn add(Args(AddArgs { a, b }): Args<AddArgs>) -> i64 {
    a + b
}

#[derive(Deserialize)]
pub struct EchoArgs {
    pub x: Value,
}

pub fn echo(Args(EchoArgs { x }): Args<EchoArgs>) -> Value {
    x
}

/// Fails with an `std::io::Error` "boom".
pub fn fail() -> Result<(), std::io::Error> {
    Err(std::io::Error::other("boom"))
}
