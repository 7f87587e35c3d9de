//! HTTP benchmark: `cargo run --release -p micro-framework-bench --bin bench_http [-- REQUESTS]`.
//!
//! In one run, the same endpoint `GET /hello/{name}` answering `{"hello": name}`: a bare axum
//! server, and a micro-framework service with `HttpEntrypoint` (in-process broker,
//! `MAX_WORKERS` from the environment, default 3). For each: sequential latency (p50, p99) over
//! REQUESTS requests (default 2000) and throughput with 16 concurrent clients (reqwest,
//! keep-alive, same process).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::Path as AxumPath;
use axum::http::header;
use axum::routing::get;
use micro_framework::http::{HttpEntrypoint, Path};
use micro_framework::prelude::*;
use micro_framework::Error;
use serde_json::{json, Value};

const CONCURRENT: usize = 16;

fn hello(Path(name): Path<String>) -> Value {
    json!({ "hello": name })
}

async fn bare_hello(AxumPath(name): AxumPath<String>) -> impl axum::response::IntoResponse {
    let body = serde_json::to_vec(&json!({ "hello": name })).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

fn main() -> micro_framework::Result<()> {
    let requests: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse().map_err(|e| Error::Startup(format!("REQUESTS: {e}")))?,
        None => 2000,
    };
    tokio::runtime::Runtime::new()?.block_on(bench(requests))
}

/// Sequential latencies (sorted) and concurrent throughput against `base`.
async fn measure(base: &str, requests: usize) -> micro_framework::Result<(Vec<Duration>, f64)> {
    let client = reqwest::Client::new();
    let get = |client: reqwest::Client, url: String| async move {
        let response = client.get(url).send().await.map_err(|e| Error::Startup(e.to_string()))?;
        let body: Value = response.json().await.map_err(|e| Error::Startup(e.to_string()))?;
        if body["hello"].is_null() {
            return Err(Error::Startup(format!("unexpected answer {body}")));
        }
        Ok::<_, Error>(())
    };
    let mut latencies = Vec::with_capacity(requests);
    for i in 0..requests {
        let started = Instant::now();
        get(client.clone(), format!("{base}/hello/n{i}")).await?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for caller in 0..CONCURRENT {
        let (client, base) = (client.clone(), base.to_owned());
        clients.spawn(async move {
            for i in (caller..requests).step_by(CONCURRENT) {
                get(client.clone(), format!("{base}/hello/n{i}")).await?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(done) = clients.join_next().await {
        done.map_err(|e| Error::Startup(e.to_string()))??;
    }
    Ok((latencies, requests as f64 / started.elapsed().as_secs_f64()))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn report(name: &str, (latencies, throughput): &(Vec<Duration>, f64)) {
    println!(
        "{name:>16}: p50 {:.3} ms, p99 {:.3} ms, {throughput:.0} requests/s with {CONCURRENT} clients",
        percentile(latencies, 0.5),
        percentile(latencies, 0.99)
    );
}

async fn bench(requests: usize) -> micro_framework::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bare_address: SocketAddr = listener.local_addr()?;
    let app = axum::Router::new().route("/hello/{name}", get(bare_hello));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.push(("SERVICE_NAME".into(), "bench_http".into()));
    vars.push(("AMQP_URI".into(), "memory://bench-http".into()));
    vars.push(("WEB_SERVER_ADDRESS".into(), "127.0.0.1:0".into()));
    let config = Config::from_vars(vars)?;
    let max_workers = config.max_workers;
    let routes = vec![Route::new(hello).entrypoint(HttpEntrypoint::get("/hello/{name}"))];
    let service = Runner::new(routes, config).spawn().await?;
    let address = service.web_address().ok_or_else(|| Error::Startup("no HTTP address".into()))?;
    println!("bench_http: {requests} requests, {CONCURRENT} concurrent clients, MAX_WORKERS {max_workers}");

    let bare = measure(&format!("http://{bare_address}"), requests).await?;
    let framework = measure(&format!("http://{address}"), requests).await?;
    report("bare axum", &bare);
    report("micro-framework", &framework);
    println!("throughput ratio framework / bare axum: {:.2}", framework.1 / bare.1);
    service.stop().await
}
