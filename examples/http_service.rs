//! The `http_demo` service: `GET /hello/{name}` answers `{"hello": name}` and `POST /sum`
//! takes `{"a": int, "b": int}` and answers `{"sum": a + b}`.
//!
//! Config comes from the environment (`WEB_SERVER_ADDRESS`, default `0.0.0.0:8000`; with
//! `AMQP_URI` unset the service runs on the in-process broker). Try it:
//!
//! ```text
//! cargo run --example http_service
//! curl http://127.0.0.1:8000/hello/ada
//! curl -X POST http://127.0.0.1:8000/sum -H 'content-type: application/json' -d '{"a": 2, "b": 3}'
//! ```

use micro_framework::http::{HttpEntrypoint, Path};
use micro_framework::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

/// The body of `POST /sum`.
#[derive(Deserialize)]
struct Terms {
    a: i64,
    b: i64,
}

/// `GET /hello/{name}`.
fn hello(Path(name): Path<String>) -> Value {
    json!({ "hello": name })
}

/// `POST /sum`: a body without two integers is answered 400; an overflow 500.
fn sum(Payload(Terms { a, b }): Payload<Terms>) -> Result<Value, String> {
    let sum = a.checked_add(b).ok_or_else(|| format!("{a} + {b} overflows a 64-bit integer"))?;
    Ok(json!({ "sum": sum }))
}

fn main() -> micro_framework::Result<()> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if std::env::var("AMQP_URI").is_err() {
        eprintln!("AMQP_URI is not set: using the in-process broker (memory://)");
        vars.push(("AMQP_URI".into(), "memory://".into()));
    }
    vars.push(("SERVICE_NAME".into(), "http_demo".into()));
    let config = Config::from_vars(vars)?;
    eprintln!("http_demo on http://{}: press Ctrl-C to stop", config.web_server_address);
    let routes = vec![
        Route::new(hello).entrypoint(HttpEntrypoint::get("/hello/{name}")),
        Route::new(sum).entrypoint(HttpEntrypoint::post("/sum")),
    ];
    Runner::new(routes, config).start()
}
