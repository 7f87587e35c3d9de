//! The status page: one small HTML document, refreshed by the browser every few seconds, with
//! no script and nothing loaded from elsewhere. Every text in it is escaped.

use std::fmt::Write as _;

use html_escape::encode_text as esc;

use super::status::{Interval, RouteStatus, Status};

/// Seconds between two refreshes of the page.
const REFRESH_SECONDS: u32 = 5;

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:1rem;color:#1d2330;background:#f6f7f9}\
h1{font-size:1.3rem;margin:0 0 .2rem}h2{font-size:1rem;margin:1.2rem 0 .4rem}\
.meta{color:#5a6272;margin:0 0 .6rem}.ok{color:#18794e}.bad{color:#c4320a}\
.wrap{overflow-x:auto;background:#fff;border:1px solid #dde1e7;border-radius:6px}\
table{border-collapse:collapse;width:100%;white-space:nowrap}\
th,td{padding:.35rem .6rem;text-align:right;border-bottom:1px solid #eef0f3}\
th:first-child,td:first-child,.l{text-align:left}th{font-weight:600;background:#f0f2f5}\
.small{color:#5a6272;font-size:.85em}svg{display:block}\
@media (max-width:600px){body{padding:.5rem;font-size:13px}}";

/// The page for `status`.
pub(crate) fn render(status: &Status) -> String {
    let mut page = String::with_capacity(16 * 1024);
    let broker = &status.broker;
    let (state_class, state) =
        if broker.connected { ("ok", "connected") } else { ("bad", "not connected") };
    let since =
        broker.connected_since.as_deref().map(|at| format!(" since {at}")).unwrap_or_default();
    let node = broker.node.as_deref().map(|node| format!(" to node {node}")).unwrap_or_default();
    let _ = write!(
        page,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>{service} · status</title><style>{STYLE}</style></head><body>\
         <h1>{service}</h1>\
         <p class=\"meta\">micro-framework {version} · started {started} · up {uptime}</p>\
         <p class=\"meta\">broker {uri}: <b class=\"{state_class}\" id=\"broker\">{state}</b>{node}{since} · \
         {reconnects} reconnects</p>",
        service = esc(&status.service),
        version = esc(status.framework_version),
        started = esc(&status.started_at),
        uptime = duration_text(status.uptime_seconds),
        uri = esc(&broker.uri),
        node = esc(&node),
        since = esc(&since),
        reconnects = broker.reconnects,
    );
    page.push_str(
        "<h2>Workers</h2><div class=\"wrap\"><table><tr><th>context</th><th>mode</th>\
         <th>busy</th><th>free</th><th>size</th><th>processes</th></tr>",
    );
    for pool in &status.pools {
        // only the process modes have processes of their own
        let processes = pool.processes.map_or_else(|| "-".to_owned(), |count| count.to_string());
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{processes}</td></tr>",
            esc(&pool.context),
            esc(&pool.worker_mode),
            pool.busy,
            pool.free,
            pool.max_workers
        );
    }
    page.push_str(
        "</table></div><h2>Routes</h2><div class=\"wrap\"><table id=\"routes\"><tr>\
         <th>route</th><th class=\"l\">last 15 min</th><th>calls</th><th>failures</th>\
         <th>retries</th><th>dead-lettered</th><th>in DLQ</th><th>in flight</th>\
         <th>p50 / p95 / p99 (5 min)</th></tr>",
    );
    for route in &status.routes {
        route_row(&mut page, route);
    }
    page.push_str("</table></div>");
    if let Some(failures) = &status.recent_failures {
        page.push_str(
            "<h2>Recent failures</h2><div class=\"wrap\"><table id=\"failures\"><tr>\
             <th>route</th><th class=\"l\">at</th><th class=\"l\">kind</th>\
             <th class=\"l\">error</th></tr>",
        );
        for failure in failures {
            let _ = write!(
                page,
                "<tr><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td>\
                 <td class=\"l\">{}</td></tr>",
                esc(&failure.route),
                esc(&failure.at),
                esc(&failure.kind),
                esc(&crate::data::bounded(&failure.error, 300)),
            );
        }
        page.push_str("</table></div>");
    }
    page.push_str(
        "<p class=\"small\">The same as JSON: <a href=\"status.json\">status.json</a> · \
         Prometheus: <a href=\"metrics\">metrics</a> · chart: calls (blue) and failures (red) \
         per 10 s</p></body></html>",
    );
    page
}

fn route_row(page: &mut String, route: &RouteStatus) {
    let seconds = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), duration_ms);
    let waiting = route.dead_letters_waiting.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let queue = route
        .queue
        .as_deref()
        .map(|queue| format!("<br><span class=\"small\">{}</span>", esc(queue)))
        .unwrap_or_default();
    let failures_class = if route.failures > 0 { " class=\"bad\"" } else { "" };
    let _ = write!(
        page,
        "<tr><td><b>{name}</b><br><span class=\"small\">{entrypoint}</span>{queue}</td>\
         <td class=\"l\">{chart}</td><td>{calls}</td>\
         <td{failures_class}>{failures}</td><td>{retries}</td><td>{dead}</td><td>{waiting}</td>\
         <td>{in_flight}</td><td>{p50} / {p95} / {p99}</td></tr>",
        name = esc(&route.name),
        entrypoint = esc(&route.entrypoint),
        calls = route.calls,
        failures = route.failures,
        retries = route.retries,
        dead = route.dead_lettered,
        in_flight = route.in_flight,
        p50 = seconds(route.duration_p50),
        p95 = seconds(route.duration_p95),
        p99 = seconds(route.duration_p99),
        chart = chart(&route.history),
    );
}

/// Bars of calls (blue) with failures (red) over them, one per interval.
fn chart(history: &[Interval]) -> String {
    const WIDTH: usize = 180;
    const HEIGHT: u64 = 28;
    let peak = history.iter().map(|interval| interval.calls.max(interval.failures)).max();
    let mut svg = format!(
        "<svg width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" \
         aria-label=\"calls and failures over the last 15 minutes\">\
         <rect width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#eef1f6\"/>"
    );
    let peak = peak.unwrap_or(0).max(1);
    let bar = WIDTH / 90;
    let start = WIDTH.saturating_sub(history.len() * bar);
    for (i, interval) in history.iter().enumerate() {
        let x = start + i * bar;
        for (value, color) in [(interval.calls, "#3b74d8"), (interval.failures, "#d83b3b")] {
            if value > 0 {
                let height = (value * HEIGHT).div_ceil(peak);
                let _ = write!(
                    svg,
                    "<rect x=\"{x}\" y=\"{}\" width=\"{bar}\" height=\"{height}\" fill=\"{color}\"/>",
                    HEIGHT - height
                );
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

fn duration_ms(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.1} ms", seconds * 1000.0)
    } else {
        format!("{seconds:.2} s")
    }
}

fn duration_text(seconds: u64) -> String {
    match seconds {
        0..=59 => format!("{seconds} s"),
        60..=3599 => format!("{} min", seconds / 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::status::{BrokerStatus, PoolStatus, RecentFailure};

    fn hostile_status() -> Status {
        let evil = "<script>alert(1)</script>\"'&";
        Status {
            service: evil.into(),
            framework_version: "0.1.0",
            started_at: "2026-12-01T10:00:00Z".into(),
            uptime_seconds: 3700,
            broker: BrokerStatus {
                uri: "amqp://guest:***@127.0.0.1:5672/".into(),
                node: Some(evil.into()),
                connected: true,
                connected_since: Some("2026-12-01T10:00:00Z".into()),
                reconnects: 2,
            },
            pools: vec![PoolStatus {
                context: evil.into(),
                worker_mode: "thread".into(),
                max_workers: 3,
                busy: 1,
                free: 2,
                processes: None,
            }],
            routes: vec![RouteStatus {
                name: evil.into(),
                context: "default".into(),
                entrypoint: evil.into(),
                queue: Some(evil.into()),
                dead_letters_waiting: Some(4),
                calls: 10,
                failures: 2,
                retries: 1,
                dead_lettered: 1,
                in_flight: 0,
                duration_p50: Some(0.0042),
                duration_p95: None,
                duration_p99: Some(1.5),
                history: vec![
                    Interval { calls: 3, failures: 1 },
                    Interval { calls: 0, failures: 0 },
                ],
            }],
            recent_failures: Some(vec![RecentFailure {
                route: evil.into(),
                at: "2026-12-01T10:01:00Z".into(),
                kind: "error".into(),
                error: evil.into(),
            }]),
        }
    }

    #[test]
    fn every_text_is_escaped() {
        let page = render(&hostile_status());
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("4.2 ms / - / 1.50 s"));
        assert!(page.contains("<rect"), "the chart has bars");
        assert!(page.contains("1 h 1 min"));
    }
}
