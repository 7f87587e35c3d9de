//! The switch to RabbitMQ: with `TEST_AMQP_URI` set, `test_config` gives each call a virtual
//! host of its own, deleted with the last service that ran on it. Every test here sets the
//! switch itself (to `common::rabbitmq_uri()`), so they run on RabbitMQ whatever the
//! environment says.
#![cfg(feature = "test-rabbitmq")]

mod common;

use std::sync::Once;
use std::time::Duration;

use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::prelude::*;
use micro_framework::testing::{remove_stale_vhosts, test_config, TestService};
use serde_json::{json, Value};

/// Turn the switch on for this test binary; false when RabbitMQ is missing (outside CI).
fn switch_on() -> bool {
    static SET: Once = Once::new();
    let Some(uri) = common::rabbitmq_uri() else { return false };
    // Every test of this binary sets the same value before reading it.
    SET.call_once(|| std::env::set_var("TEST_AMQP_URI", uri));
    true
}

fn vhosts() -> Vec<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["list_vhosts", "-q", "--no-table-headers", "name"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout).lines().map(|line| line.trim().to_owned()).collect()
}

fn vhost_of(config: &Config) -> String {
    let url = url::Url::parse(&config.amqp_uri).unwrap();
    url.path().trim_start_matches('/').to_owned()
}

fn seen(Payload(order): Payload<Value>) -> Value {
    order
}

fn routes() -> Vec<Route> {
    vec![Route::new(seen).entrypoint(EventListener::new("shop", "paid"))]
}

#[tokio::test]
async fn each_config_gets_its_own_virtual_host_deleted_when_the_service_stops() {
    if !switch_on() {
        return;
    }
    // the same service and queue names twice, side by side
    let (first, second) = (test_config("orders"), test_config("orders"));
    let (first_vhost, second_vhost) = (vhost_of(&first), vhost_of(&second));
    assert!(first_vhost.starts_with("mf-test-"), "{first_vhost}");
    assert_ne!(first_vhost, second_vhost);
    let listed = vhosts();
    assert!(listed.contains(&first_vhost) && listed.contains(&second_vhost), "{listed:?}");

    let one = TestService::start(routes(), first).await.unwrap();
    let other = TestService::start(routes(), second).await.unwrap();
    one.dispatch("shop", "paid", &json!({"id": 1})).await.unwrap();
    one.wait_for_route("seen", 1).await.unwrap();
    assert_eq!(
        other.route("seen").unwrap().stats().settled_count(),
        0,
        "the hosts are not isolated"
    );

    one.stop().await.unwrap();
    assert!(!vhosts().contains(&first_vhost), "the stopped service's host is left");
    assert!(vhosts().contains(&second_vhost), "the running service's host is gone");
    drop(other);
    // deleted once the dropped service has stopped
    common::wait_until(|| !vhosts().contains(&second_vhost), "a dropped service's host to go")
        .await;
}

#[tokio::test]
async fn services_sharing_a_config_keep_its_host_until_the_last_stops() {
    if !switch_on() {
        return;
    }
    let config = test_config("shared");
    let vhost = vhost_of(&config);
    let orders = TestService::start(routes(), config.clone()).await.unwrap();
    let billing =
        TestService::start(routes(), config.with_service_name("billing".into())).await.unwrap();
    orders.stop().await.unwrap();
    assert!(vhosts().contains(&vhost), "the host went with the first service");
    billing.dispatch("shop", "paid", &json!({"id": 2})).await.unwrap();
    billing.wait_for_route("seen", 1).await.unwrap();
    billing.stop().await.unwrap();
    assert!(!vhosts().contains(&vhost));
}

#[tokio::test]
async fn stale_test_hosts_are_removed_and_others_kept() {
    if !switch_on() {
        return;
    }
    let stale = format!("mf-test-1000-{}", common::unique("crashed"));
    let recent = test_config("recent");
    let add = std::process::Command::new("rabbitmqctl").args(["add_vhost", &stale]).output();
    assert!(add.unwrap().status.success());
    let removed = remove_stale_vhosts(Duration::from_secs(600)).unwrap();
    assert!(removed >= 1, "{removed}");
    let listed = vhosts();
    assert!(!listed.contains(&stale), "{listed:?}");
    assert!(listed.contains(&vhost_of(&recent)), "a recent host was removed");
    assert!(listed.contains(&"/".to_owned()), "a host of another kind was removed");
}
