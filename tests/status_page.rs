//! The status page in a real browser: headless Chromium (Debian's `chromium`) loads the page of
//! the `retry_demo` example serving RabbitMQ under a steady load of events, and the test reads
//! what it shows. Fails under `CI=true` when Chromium or RabbitMQ is missing; skipped loudly
//! otherwise.
#![cfg(feature = "metrics")]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use micro_framework::amqp::dependencies::Producer;
use micro_framework::amqp::naming::event_exchange;
use micro_framework::Config;
use serde_json::{json, Value};

fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists());
    if found.is_none() {
        assert!(
            !common::peer::is_ci(),
            "Chromium is missing and CI=true: apt-get install chromium"
        );
        eprintln!("SKIPPED: Chromium (Debian's chromium package) is not installed");
    }
    found
}

/// The page as Chromium rendered it (its DOM, serialized).
fn rendered(chromium: &Path, url: &str) -> String {
    let output = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url])
        .stderr(Stdio::null())
        .output()
        .expect("chromium runs");
    assert!(output.status.success(), "chromium --dump-dom {url}: {:?}", output.status);
    String::from_utf8(output.stdout).expect("a UTF-8 page")
}

/// The number in cell `column` of `route`'s row (2: calls, 3: failures, 4: retries, 5:
/// dead-lettered; 1 is the chart), as the page shows it.
fn shown(page: &str, route: &str, column: usize) -> u64 {
    let row = page.split(&format!("<b>{route}</b>")).nth(1).expect("the route's row");
    let cell = row.split("<td").nth(column).expect("the cell");
    let text = cell.split_once('>').map_or(cell, |(_, text)| text);
    text.split("</td>").next().and_then(|n| n.trim().parse().ok()).expect("a number")
}

struct Example(Child);

impl Drop for Example {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_sees_routes_counts_moving_and_failures_on_the_status_page() {
    let (Some(uri), Some(chromium)) = (common::rabbitmq_uri(), chromium()) else { return };
    let service = common::unique("status_demo");
    let address: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let exe = std::env::current_exe().unwrap();
    let examples = exe.parent().and_then(Path::parent).unwrap().join("examples");
    let _example = Example(
        Command::new(examples.join("retry_demo"))
            .env("AMQP_URI", &uri)
            .env("SERVICE_NAME", &service)
            .env("DEMO_EVENTS", "0")
            .env("ENABLE_METRICS", "true")
            .env("METRICS_HOST", "127.0.0.1")
            .env("METRICS_PORT", address.port().to_string())
            .env("STATUS_SHOW_FAILURES", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("example built by cargo test"),
    );
    common::wait_until_async(|| async move {
        let json = tokio::task::spawn_blocking(move || common::http_get(address, "/status.json"));
        let (code, body) = json.await.unwrap();
        code == 200
            && serde_json::from_str::<Value>(&body)
                .is_ok_and(|status| status["routes"].as_array().is_some_and(|r| r.len() == 2))
    })
    .await;

    // A steady load: a job every 20 ms (each fails twice before it succeeds), one doomed.
    let config = Config::new("retry_src").with_amqp_uri(uri.clone());
    let transport = micro_framework::transport::connect(&config).await.unwrap();
    let producer = Producer::new(transport.clone(), &config);
    producer.dispatch("doom", &json!({ "i": "doomed" })).await.unwrap();
    let load = tokio::spawn(async move {
        for i in 0.. {
            if producer.dispatch("job", &json!({ "i": i })).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let url = format!("http://{address}/");
    let first = tokio::task::spawn_blocking({
        let (chromium, url) = (chromium.clone(), url.clone());
        move || rendered(&chromium, &url)
    });
    let first = first.await.unwrap();
    assert!(first.contains(&format!("<h1>{service}</h1>")), "{first}");
    assert!(first.contains("EventListener(retry_src.job)") && first.contains("<b>doomed</b>"));
    assert!(first.contains("id=\"broker\">connected</b>"), "{first}");
    let mut moved = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let page = tokio::task::spawn_blocking({
            let (chromium, url) = (chromium.clone(), url.clone());
            move || rendered(&chromium, &url)
        });
        let page = page.await.unwrap();
        if shown(&page, "flaky", 2) > shown(&first, "flaky", 2) && shown(&page, "doomed", 5) == 1 {
            moved = Some(page);
            break;
        }
    }
    let page = moved.expect("the calls count moves and the doomed message is dead-lettered");
    assert_eq!((shown(&page, "doomed", 2), shown(&page, "doomed", 3)), (3, 3), "{page}");
    assert!(page.contains("Recent failures") && page.contains(" of job "), "{page}");
    assert!(page.contains("<rect"), "the chart draws bars");

    let screenshot = std::env::temp_dir().join(format!("{service}.png"));
    let shot = Command::new(&chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .arg("--window-size=1100,700")
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(&url)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(shot.success());
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a screenshot of the page");
    std::fs::remove_file(&screenshot).unwrap();

    load.abort();
    transport.close().await;
    drop(_example);
    // The example's source (`retry_src`) has a fixed name: only this test uses its exchange,
    // which goes with the service's queues.
    let source_exchange = event_exchange(&config, "retry_src").name;
    common::cleanup(&uri, &[service, source_exchange]).await;
}
