//! The alert rules (`deploy/prometheus/alerts.yml`) and the Grafana dashboard
//! (`deploy/grafana/micro-framework.json`) shipped with the service: every metric their PromQL
//! names is one a running service exports, the dashboard shows every metric the service
//! exports, the rules pass their `promtool` unit tests (`alerts_test.yml`), and the panel of
//! refused requests shows the refusals that name no context or route.
#![cfg(feature = "metrics")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{config, http_get, unique, MetricsOnAnyPort};
use micro_framework::amqp::dependencies::RpcProxy;
use micro_framework::amqp::entrypoints::{EventListener, RPCListener};
use micro_framework::amqp::rpc::Args;
use micro_framework::config::Protocol;
use micro_framework::prelude::*;
use micro_framework::retry::AsyncBackOff;
use micro_framework::testing::TestService;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yml";
const DASHBOARD: &str = "deploy/grafana/micro-framework.json";

/// Every alert of `alerts.yml`; the README lists them.
const ALERT_NAMES: [&str; 8] = [
    "MicroFrameworkServiceDown",
    "MicroFrameworkNotReady",
    "MicroFrameworkHighFailureRatio",
    "MicroFrameworkRetriesPilingUp",
    "MicroFrameworkDeadLetters",
    "MicroFrameworkWorkersSaturated",
    "MicroFrameworkBrokerReconnectStorm",
    "MicroFrameworkWorkerProcessesDying",
];

/// The gauge being added with the broker-readiness change. Named here so that, until it is
/// exported, this test fails saying so rather than with a bare "not exported" line.
const BROKER_CONNECTED: &str = "broker_connected";

/// Metrics the scrape below cannot show, each only after an event it does not cause: other
/// tests see them (`tests/operations.rs`, `tests/http.rs`, `tests/process_replacement.rs`).
const SHOWN_LATER: [(&str, &str); 4] = [
    ("broker_node", "on RabbitMQ"),
    ("requests_refused_total", "after an HTTP or WebSocket refusal"),
    ("worker_processes", "in a process mode"),
    ("worker_processes_replaced_total", "in a process mode"),
];

/// Every metric the service can export: the table in `src/metrics/mod.rs`'s documentation.
fn documented_metrics() -> BTreeSet<String> {
    let lines = read("src/metrics/mod.rs");
    let rows = lines.lines().filter_map(|line| line.strip_prefix("//! | `"));
    rows.filter_map(|row| row.split_once('`')).map(|(name, _)| name.to_owned()).collect()
}

/// Suffixes of a histogram's series: `name_bucket`, `name_sum`, `name_count`.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

// PromQL words that are not metric names: aggregations, set and comparison modifiers,
// `offset`, and the literals `Inf` / `NaN`. (Functions are recognised by the `(` after them.)
const KEYWORDS: [&str; 26] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names (not an expression).
const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];

/// Index just past the string literal opening at `start` (PromQL strings: `"`, `'`, `` ` ``;
/// backslash escapes in the first two).
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// Index just past the group closed by `close`, from just after its opening bracket, skipping
/// string literals (a label value may contain `}` or `)`).
fn skip_group(chars: &[char], mut i: usize, close: char) -> usize {
    while i < chars.len() && chars[i] != close {
        if matches!(chars[i], '"' | '\'' | '`') {
            i = skip_string(chars, i);
        } else {
            i += 1;
        }
    }
    i + 1
}

/// The metric names a PromQL expression selects. A small scanner rather than a PromQL parser:
/// it skips strings, label matchers `{...}`, ranges `[...]`, label lists after `by`, `on`,
/// `group_left`, ..., numbers and durations, Grafana variables (`$job`, `${x}`), keywords,
/// and function names (a word followed by `(`). What is left is a metric name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut label_list_next = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '(' && label_list_next {
            label_list_next = false;
            i = skip_group(&chars, i + 1, ')');
            continue;
        }
        label_list_next = false;
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => i = skip_group(&chars, i + 1, '}'),
            '[' => i = skip_group(&chars, i + 1, ']'),
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_group(&chars, i + 1, '}');
                } else {
                    while i < chars.len() && word_char(chars[i]) {
                        i += 1;
                    }
                }
            }
            // numbers (0.95, 1e3, 0x1f) and durations (10m)
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (word_char(chars[i]) || chars[i] == '.') {
                    i += 1;
                }
            }
            c if word_char(c) => {
                let start = i;
                while i < chars.len() && word_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                let lower = word.to_ascii_lowercase();
                if LABEL_LISTS.contains(&lower.as_str()) {
                    label_list_next = true;
                } else if next != Some(&'(') && !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The PromQL of a Grafana query variable: `label_values(<selector>, <label>)` gives the
/// selector; `label_values(<label>)` selects no metric.
fn variable_query_expr(query: &str) -> Option<String> {
    let inner = query.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    inner.rsplit_once(',').map(|(selector, _label)| selector.to_owned())
}

/// Every PromQL expression of the dashboard: each panel target's `expr` (rows' nested panels
/// included) and each query variable's selector. Each comes with where it was found.
fn dashboard_exprs(dashboard: &Json) -> Vec<(String, String)> {
    fn walk(value: &Json, found: &mut Vec<(String, String)>) {
        match value {
            Json::Object(object) => {
                if let (Some(Json::String(expr)), Some(Json::String(ref_id))) =
                    (object.get("expr"), object.get("refId"))
                {
                    found.push((format!("target {ref_id}"), expr.clone()));
                }
                for (key, nested) in object {
                    if key == "panels" {
                        for panel in nested.as_array().into_iter().flatten() {
                            let title = panel["title"].as_str().unwrap_or("?").to_owned();
                            let mut inner = Vec::new();
                            walk(panel, &mut inner);
                            found.extend(
                                inner
                                    .into_iter()
                                    .map(|(at, expr)| (format!("panel '{title}' {at}"), expr)),
                            );
                        }
                    } else if key != "templating" {
                        walk(nested, found);
                    }
                }
            }
            Json::Array(items) => items.iter().for_each(|item| walk(item, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(dashboard, &mut found);
    for variable in dashboard["templating"]["list"].as_array().expect("templating.list") {
        if variable["type"] != "query" {
            continue;
        }
        // Grafana stores the query as a string, or (newer) as {"query": "..."}.
        let query = variable["query"]["query"].as_str().or(variable["query"].as_str());
        let name = variable["name"].as_str().unwrap_or("?");
        let query = query.unwrap_or_else(|| panic!("variable {name} has no query"));
        if let Some(expr) = variable_query_expr(query) {
            found.push((format!("variable ${name}"), expr));
        }
    }
    found
}

/// Every alert of the rules file: (alert name, PromQL).
fn alert_exprs(rules: &Yaml) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).expect("rule name");
            let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{name}: no expr"));
            found.push((name.to_owned(), expr.to_owned()));
        }
    }
    found
}

/// The scraped exposition: sample names (`name_bucket` etc. for histograms) and each family's
/// `# TYPE`.
fn exported(text: &str) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let mut samples = BTreeSet::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                types.insert(name.to_owned(), kind.to_owned());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_owned());
        }
    }
    (samples, types)
}

/// The family a used name belongs to: itself, or a histogram's name without its suffix.
fn family<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    HISTOGRAM_SUFFIXES
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find(|base| types.get(*base).is_some_and(|kind| kind == "histogram"))
        .unwrap_or(name)
}

#[test]
fn the_metric_name_scanner_finds_metrics_and_nothing_else() {
    let expr = r#"sum by (job, route) (rate(foo_total{a="b}", c=~"$x"}[$__rate_interval]))
        / on (job) group_left (max_workers) bar offset 10m > bool 0.5
        and histogram_quantile(0.9, sum without(le)(baz_bucket)) or up == 1e3
        unless label_replace(qux, "a", "$1", "b", "(.*)") and ${x} > Inf
        or group by (job) (max_over_time(ns:rule[1d]))"#;
    let expected = ["bar", "baz_bucket", "foo_total", "ns:rule", "qux", "up"];
    let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    assert_eq!(metric_names(expr), expected);
    assert_eq!(
        variable_query_expr(r#"label_values(service_info{job=~"$job"}, instance)"#).as_deref(),
        Some(r#"service_info{job=~"$job"}"#)
    );
    assert_eq!(variable_query_expr("label_values(job)"), None);
}

#[test]
fn the_alert_rules_are_complete_and_described() {
    let rules: Yaml = serde_yaml_ng::from_str(&read(ALERTS)).expect("alerts.yml is YAML");
    let mut names = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("only alerting rules").to_owned();
            let severity = rule["labels"]["severity"].as_str();
            assert!(matches!(severity, Some("critical" | "warning")), "{name}: severity");
            for annotation in ["summary", "description"] {
                let text = rule["annotations"][annotation].as_str().unwrap_or_default();
                assert!(!text.trim().is_empty(), "{name}: no {annotation}");
            }
            names.push(name);
        }
    }
    assert_eq!(names, ALERT_NAMES, "the alerts (the README lists them)");
}

#[test]
fn the_dashboard_has_its_variables_and_one_datasource() {
    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    let variables: BTreeMap<&str, &str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["type"].as_str().unwrap()))
        .collect();
    let expected = [
        ("context", "query"),
        ("datasource", "datasource"),
        ("instance", "query"),
        ("job", "query"),
        ("route", "query"),
    ];
    assert_eq!(variables, expected.into_iter().collect::<BTreeMap<_, _>>());
    // Every panel and query uses the `datasource` variable, so the dashboard imports into
    // any Grafana whatever its Prometheus data source is called.
    fn check(value: &Json, at: &str) {
        match value {
            Json::Object(object) => {
                if let Some(datasource) = object.get("datasource") {
                    if datasource["type"] == "prometheus" || object.contains_key("expr") {
                        assert_eq!(datasource["uid"], "${datasource}", "{at}");
                    }
                }
                for (key, nested) in object {
                    check(nested, &format!("{at}.{key}"));
                }
            }
            Json::Array(items) => {
                items.iter().enumerate().for_each(|(i, item)| check(item, &format!("{at}[{i}]")))
            }
            _ => {}
        }
    }
    check(&dashboard["panels"], "panels");
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().map(Vec::len).unwrap_or(0);
        assert!(targets > 0, "panel '{}' has no query", panel["title"]);
    }
}

#[derive(serde::Deserialize)]
struct Number {
    n: i64,
}

fn double(Args(Number { n }): Args<Number>) -> i64 {
    n * 2
}

/// Calls `double` on its own service (an RPC call made: `rpc_calls_total`), then fails: with
/// one retry allowed, one message gives a retry and a dead letter.
async fn caller(Payload(service): Payload<String>, rpc: RpcProxy) -> Result<(), String> {
    let doubled: i64 =
        rpc.service(service).call("double", [21], ()).await.map_err(|e| e.to_string())?;
    Err(format!("fails on purpose after the RPC call ({doubled})"))
}

#[tokio::test]
async fn the_alerts_and_the_dashboard_use_only_metrics_the_service_exports() {
    let rules: Yaml = serde_yaml_ng::from_str(&read(ALERTS)).expect("alerts.yml is YAML");
    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (at, expr) in alert_exprs(&rules) {
        for name in metric_names(&expr) {
            used.entry(name).or_default().push(format!("{ALERTS} {at}"));
        }
    }
    let mut on_dashboard = BTreeSet::new();
    for (at, expr) in dashboard_exprs(&dashboard) {
        for name in metric_names(&expr) {
            on_dashboard.insert(name.clone());
            used.entry(name).or_default().push(format!("{DASHBOARD} {at}"));
        }
    }
    // guards the scanner: if it found nothing, the assertions below would hold vacuously
    for name in ["tasks_number_total", "task_duration_seconds_bucket", BROKER_CONNECTED, "up"] {
        assert!(used.contains_key(name), "{name} not found in the rules or the dashboard");
    }

    // A service on the in-process broker, with one message through a route that makes an
    // RPC call, fails, is retried once and is dead-lettered: every labelled series exists.
    let shop = unique("shop");
    let config = config(&format!("memory://{}", unique("monitoring")), "monitoring")
        .with_metrics_on_any_port();
    let service_name = config.service_name.clone();
    let routes = vec![
        Route::new(double).entrypoint(RPCListener::new()),
        Route::new(caller)
            .entrypoint(EventListener::new(&shop, "go"))
            .backoff(AsyncBackOff::new(1, Duration::from_millis(10))),
    ];
    let service = TestService::start(routes, config).await.unwrap();
    let address = service.service().metrics_address().unwrap();
    service.dispatch(&shop, "go", &service_name).await.unwrap();
    service.wait_for_route("caller", 2).await.unwrap();
    // The dead letter is counted as the second attempt settles: scrape until it shows.
    let mut text = String::new();
    for _ in 0..100 {
        let (status, body) =
            tokio::task::spawn_blocking(move || http_get(address, "/metrics")).await.unwrap();
        assert_eq!(status, 200);
        text = body;
        // exported at 0 from the start: wait for the count
        if text.lines().any(|line| line.starts_with("dead_lettered_total{") && line.ends_with(" 1"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    service.stop().await.unwrap();

    let (samples, types) = exported(&text);
    let documented = documented_metrics();
    let shown_later = |name: &str| SHOWN_LATER.iter().any(|(later, _)| *later == name);
    let mut problems = Vec::new();
    for (name, places) in &used {
        // `up` is Prometheus's own: 1 when the scrape succeeded.
        if name == "up" || samples.contains(name) || shown_later(name) {
            continue;
        }
        let why = if types.get(name).is_some_and(|kind| kind == "histogram") {
            "is a histogram: select its _bucket, _sum or _count series".to_owned()
        } else if name == BROKER_CONNECTED {
            "is not exported yet (the readiness gauge: 1 while connected to the broker and not \
             stopping)"
                .to_owned()
        } else {
            "is not exported by the service".to_owned()
        };
        problems.push(format!("{name} {why}; used in {}", places.join(", ")));
    }
    // And the other way: the dashboard shows every metric the service exports, those it
    // exports only after some event too (the table of all is checked against the scrape).
    let shown: BTreeSet<&str> = on_dashboard.iter().map(|name| family(name, &types)).collect();
    for family in types.keys().filter(|family| !documented.contains(family.as_str())) {
        problems.push(format!("{family} is exported but not in src/metrics/mod.rs's table"));
    }
    for (name, when) in SHOWN_LATER {
        if !documented.contains(name) || types.contains_key(name) {
            problems.push(format!("{name}, exported {when}, is not one: update SHOWN_LATER"));
        }
    }
    for name in documented.iter().filter(|name| !shown.contains(name.as_str())) {
        problems.push(format!("{name} (src/metrics/mod.rs's table) is not on the dashboard"));
    }
    assert!(problems.is_empty(), "{}\n\nscraped /metrics:\n{text}", problems.join("\n"));
}

/// A rule file holding the dashboard's expressions as recording rules, for `promtool check
/// rules` to parse them (Grafana's `$__rate_interval` and `$__range` replaced by durations).
/// Removed when dropped.
struct DashboardRules(PathBuf);

impl DashboardRules {
    fn write(dashboard: &Json) -> Self {
        let rules: Vec<Yaml> = dashboard_exprs(dashboard)
            .into_iter()
            .enumerate()
            .map(|(i, (_, expr))| {
                let expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h");
                let mut rule = serde_yaml_ng::Mapping::new();
                rule.insert("record".into(), format!("dashboard:expr{i}").into());
                rule.insert("expr".into(), expr.into());
                Yaml::Mapping(rule)
            })
            .collect();
        let mut group = serde_yaml_ng::Mapping::new();
        group.insert("name".into(), "dashboard".into());
        group.insert("rules".into(), Yaml::Sequence(rules));
        let mut file = serde_yaml_ng::Mapping::new();
        file.insert("groups".into(), Yaml::Sequence(vec![Yaml::Mapping(group)]));
        let path = std::env::temp_dir().join(format!("{}.yml", unique("mf_dashboard_rules")));
        std::fs::write(&path, serde_yaml_ng::to_string(&file).unwrap()).unwrap();
        DashboardRules(path)
    }
}

impl Drop for DashboardRules {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `promtool`, or `None` after a loud `SKIPPED:` line when it is not installed; under
/// `CI=true` a missing promtool fails the test (CI installs Debian's `prometheus` package).
fn promtool() -> Option<&'static str> {
    match Command::new("promtool").arg("--version").output() {
        Ok(output) if output.status.success() => Some("promtool"),
        result => {
            if common::peer::is_ci() {
                panic!(
                    "promtool is not usable and CI=true ({result:?}): apt-get install prometheus"
                );
            }
            eprintln!(
                "SKIPPED: promtool is not on PATH (apt-get install prometheus): the alert rules' \
                 unit tests and the dashboard's PromQL syntax check did not run"
            );
            None
        }
    }
}

fn run_promtool(promtool: &str, args: &[&str], file: &std::path::Path) -> String {
    let output = Command::new(promtool).args(args).arg(file).output().expect("promtool runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} {} failed:\n{printed}", file.display());
    printed
}

#[test]
fn the_alert_rules_pass_their_promtool_tests_and_the_dashboard_queries_parse() {
    let Some(promtool) = promtool() else { return };
    let checked = run_promtool(promtool, &["check", "rules"], &repo_file(ALERTS));
    assert!(checked.contains(&format!("SUCCESS: {} rules found", ALERT_NAMES.len())), "{checked}");
    let tested = run_promtool(promtool, &["test", "rules"], &repo_file(ALERTS_TEST));
    assert!(tested.contains("SUCCESS"), "{tested}");

    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    let queries = dashboard_exprs(&dashboard).len();
    let rules = DashboardRules::write(&dashboard);
    let parsed = run_promtool(promtool, &["check", "rules"], &rules.0);
    assert!(parsed.contains(&format!("SUCCESS: {queries} rules found")), "{parsed}");
}

// ---------------------------------------------------------------------------------------------
// The `context` and `route` labels

fn noop(Payload(_): Payload<Json>) {}

fn noop_failed(Payload(_): Payload<Json>, _failure: Failure) {}

/// The (context, route) label pairs of a metric's series in a scrape, e.g. of
/// `tasks_number_total{context="default",route="plain"} 1`.
fn label_pairs(text: &str, metric: &str) -> BTreeSet<(String, String)> {
    let label = |labels: &str, name: &str| {
        let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
        let end = start + labels[start..].find('"')?;
        Some(labels[start..end].to_owned())
    };
    text.lines()
        .filter_map(|line| line.strip_prefix(metric)?.strip_prefix('{'))
        .filter_map(|rest| {
            let labels = &rest[..rest.find('}')?];
            Some((label(labels, "context")?, label(labels, "route")?))
        })
        .collect()
}

/// The `context` labels of `available_workers`.
fn context_labels(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("available_workers{context=\""))
        .filter_map(|rest| Some(rest[..rest.find('"')?].to_owned()))
        .collect()
}

/// Runs one event through four routes in three contexts under `protocol` and returns the
/// scraped `/metrics`: `plain` (default label), `labelled` (`custom_route`), the callback
/// route `called_back`, in the first context; `slow` in the context `slow_context`; `other`
/// in a context without a label (the fifth route: `context_4`).
async fn scrape_labels(protocol: Protocol) -> String {
    let shop = unique("labels");
    let config = config(&format!("memory://{}", unique("labels")), "labels")
        .with_protocol(protocol)
        .with_metrics_on_any_port();
    let on = |route: Route| route.entrypoint(EventListener::new(&shop, "go"));
    let runner = Runner::new(
        vec![
            on(Route::new(noop).name("plain")),
            on(Route::new(noop).name("labelled").metric_label("custom_route")),
            on(CallbackRoute::new(noop, noop_failed).name("called_back")),
        ],
        config.clone(),
    )
    .context(
        RunnerContext::new(vec![on(Route::new(noop).name("slow"))]).metric_label("slow_context"),
    )
    .context(RunnerContext::new(vec![on(Route::new(noop).name("other"))]));
    let service = TestService::start_runner(runner).await.unwrap();
    let address = service.service().metrics_address().unwrap();
    service.dispatch(&shop, "go", &1).await.unwrap();
    for route in ["plain", "labelled", "called_back", "slow", "other"] {
        service.wait_for_route(route, 1).await.unwrap();
    }
    let (status, text) =
        tokio::task::spawn_blocking(move || http_get(address, "/metrics")).await.unwrap();
    service.stop().await.unwrap();
    assert_eq!(status, 200);
    text
}

fn pairs(expected: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    expected.iter().map(|(context, route)| (context.to_string(), route.to_string())).collect()
}

#[tokio::test]
async fn metric_labels_are_the_route_names_under_the_nameko_profile() {
    let text = scrape_labels(Protocol::Nameko).await;
    let expected = pairs(&[
        ("default", "plain"),
        ("default", "custom_route"),
        ("default", "called_back"),
        ("slow_context", "slow"),
        ("context_4", "other"),
    ]);
    for metric in ["tasks_number_total", "messages_received_total", "task_duration_seconds_count"] {
        assert_eq!(label_pairs(&text, metric), expected, "{metric} in:\n{text}");
    }
    let contexts = ["context_4", "default", "slow_context"].map(String::from);
    assert_eq!(context_labels(&text), BTreeSet::from(contexts), "{text}");
}

#[tokio::test]
async fn metric_labels_follow_the_python_original_under_the_micro_framework_profile() {
    let text = scrape_labels(Protocol::MicroFramework).await;
    let expected = pairs(&[
        ("default", "Route__plain"),
        ("default", "custom_route"),
        ("default", "CallbackRoute__called_back"),
        ("slow_context", "Route__slow"),
        ("context_4", "Route__other"),
    ]);
    for metric in ["tasks_number_total", "messages_received_total", "task_duration_seconds_count"] {
        assert_eq!(label_pairs(&text, metric), expected, "{metric} in:\n{text}");
    }
    // the Python original's context label is a memory address: ours are kept
    let contexts = ["context_4", "default", "slow_context"].map(String::from);
    assert_eq!(context_labels(&text), BTreeSet::from(contexts), "{text}");
}

#[tokio::test]
async fn empty_and_shared_metric_labels_stop_the_start() {
    let uri = format!("memory://{}", unique("bad_labels"));
    let on = |route: Route| route.entrypoint(EventListener::new("shop", "go"));
    let refusal = |runner: Runner| async move {
        match TestService::start_runner(runner).await {
            Err(micro_framework::Error::Startup(reason)) => reason,
            Err(other) => panic!("expected a start-up error, got {other}"),
            Ok(_) => panic!("the service started"),
        }
    };
    for protocol in [Protocol::Nameko, Protocol::MicroFramework] {
        let config = config(&uri, "bad_labels").with_protocol(protocol);
        let empty_route = Runner::new(vec![on(Route::new(noop).metric_label(""))], config.clone());
        let reason = refusal(empty_route).await;
        assert!(reason.contains("route 'noop' has an empty metric_label"), "{reason}");

        let empty_context = Runner::new(vec![on(Route::new(noop))], config.clone())
            .context(RunnerContext::new(vec![on(Route::new(noop).name("b"))]).metric_label(" "));
        let reason = refusal(empty_context).await;
        assert!(reason.contains("a RunnerContext has an empty metric_label"), "{reason}");

        let shared_context = Runner::new(vec![on(Route::new(noop))], config.clone()).context(
            RunnerContext::new(vec![on(Route::new(noop).name("b"))]).metric_label("default"),
        );
        let reason = refusal(shared_context).await;
        assert!(reason.contains("two RunnerContexts have the metric_label 'default'"), "{reason}");

        // a label that another route of the context has by default
        let default_of_a = match protocol {
            Protocol::Nameko => "a",
            Protocol::MicroFramework => "Route__a",
        };
        let shared_route = Runner::new(
            vec![on(Route::new(noop).name("a")), on(Route::new(noop).metric_label(default_of_a))],
            config.clone(),
        );
        let reason = refusal(shared_route).await;
        let expected = format!("routes 'a' and 'noop' have the same metric label '{default_of_a}'");
        assert!(reason.contains(&expected), "{reason}");
    }
}

/// A `promtool test rules` file, removed when dropped.
struct PromtoolTest(PathBuf);

impl PromtoolTest {
    fn write(test: &Json) -> Self {
        let path = std::env::temp_dir().join(format!("{}.yml", unique("mf_dashboard_test")));
        std::fs::write(&path, serde_yaml_ng::to_string(test).unwrap()).unwrap();
        PromtoolTest(path)
    }
}

impl Drop for PromtoolTest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The "Requests refused" panel shows WebSocket handshakes refused for their origin, counted
/// with empty `context` and `route`, which no value of those variables matches: its queries,
/// with the variables as Grafana expands "All" (an alternation of the values they list) are
/// evaluated by promtool over a route's refusals, another context's and the handshakes'.
/// Mutant: the panel's one query filtering on `$context` and `$route` (no `origin` series).
#[test]
fn the_requests_refused_panel_shows_handshakes_refused_for_their_origin() {
    let Some(promtool) = promtool() else { return };
    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    let panel = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|panel| panel["title"] == "Requests refused")
        .expect("a Requests refused panel");
    let queries: Vec<String> = panel["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|target| {
            let expr = target["expr"].as_str().expect("a query");
            let expanded = expr
                .replace("$__rate_interval", "5m")
                .replace("$job", "(orders)")
                .replace("$instance", "(a:9464)")
                .replace("$context", "(default)")
                .replace("$route", "(checkout)");
            format!("({expanded})")
        })
        .collect();
    // the panel's series, whichever of its queries gives each
    let shown = format!("sum by (reason) ({})", queries.join(" or "));
    let refused = |labels: &str| {
        format!("requests_refused_total{{job=\"orders\", instance=\"a:9464\", {labels}}}")
    };
    let test = serde_json::json!({
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                // one a second
                {
                    "series": refused(r#"context="default", route="checkout", reason="too_large""#),
                    "values": "0+60x10",
                },
                // another context, not selected: not shown
                {
                    "series": refused(r#"context="other", route="report", reason="busy""#),
                    "values": "0+60x10",
                },
                // two a second, named by no context or route
                { "series": refused(r#"context="", route="", reason="origin""#), "values": "0+120x10" },
            ],
            "promql_expr_test": [{
                "expr": shown,
                "eval_time": "10m",
                "exp_samples": [
                    { "labels": r#"{reason="origin"}"#, "value": 2 },
                    { "labels": r#"{reason="too_large"}"#, "value": 1 },
                ],
            }],
        }],
    });
    let file = PromtoolTest::write(&test);
    let tested = run_promtool(promtool, &["test", "rules"], &file.0);
    assert!(tested.contains("SUCCESS"), "{tested}");
}
