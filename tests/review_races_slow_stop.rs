//! Review (races): a stop over a link whose broker-to-client direction stalls. The messages
//! received but not started are handed back as copies (publish confirmed, then ack); the
//! confirm never arrives before the stop gives up and the connection goes: the copy is in
//! the queue and the original is requeued with the connection.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{config, unique, Probe};
use micro_framework::amqp::entrypoints::EventListener;
use micro_framework::dependencies::Shared;
use micro_framework::prelude::*;
use micro_framework::testing::TestService;
use micro_framework::transport::{OutgoingMessage, PublishOptions, QueueSpec};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP proxy whose broker-to-client direction can be stalled (nothing read from the broker
/// while stalled), and whose connections can be cut.
struct Proxy {
    address: std::net::SocketAddr,
    stall_down: Arc<AtomicBool>,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(broker: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stall_down = Arc::new(AtomicBool::new(false));
        let tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (stall, tasks_too) = (stall_down.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(broker).await else { continue };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut upstream_read, mut upstream_write) = upstream.into_split();
                let up = tokio::spawn(async move {
                    let mut buffer = vec![0u8; 65536];
                    while let Ok(read @ 1..) = client_read.read(&mut buffer).await {
                        if upstream_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                });
                let stall = stall.clone();
                let down = tokio::spawn(async move {
                    let mut buffer = vec![0u8; 65536];
                    loop {
                        while stall.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        let Ok(read @ 1..) = upstream_read.read(&mut buffer).await else { break };
                        while stall.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        if client_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                });
                tasks_too.lock().unwrap().extend([up, down]);
            }
        });
        Proxy { address, stall_down, tasks, accept }
    }

    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

fn gated(Payload(payload): Payload<Value>, Dep(probe): Dep<Arc<Probe>>) {
    probe.enter(payload);
    probe.leave();
}

/// One running call and three messages waiting for the worker slot when the stop begins,
/// over a link whose broker-to-client direction then stalls. Three messages were not run:
/// three should be in the queue afterwards, not six.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_over_a_stalled_link_does_not_double_the_unstarted_messages() {
    let Some(uri) = common::rabbitmq_uri() else { return };
    let url = url::Url::parse(&uri).unwrap();
    let broker = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672));
    let proxy = Proxy::start(broker.parse().unwrap()).await;
    let mut proxied = url.clone();
    proxied.set_port(Some(proxy.address.port())).unwrap();
    let shop = unique("rvracesshop");
    let config = config(proxied.as_str(), "rvracesstop")
        .with_max_workers(1)
        .with_prefetch_count(Some(4))
        .with_shutdown_timeout(Duration::from_secs(1));
    let queue = format!("evt-{shop}-job--{}.gated", config.service_name);
    let markers = [config.service_name.clone(), shop.clone()];
    let probe = Probe::closed();
    let routes = vec![Route::new(gated)
        .entrypoint(EventListener::new(&shop, "job"))
        .dependency(Shared(probe.clone()))];
    let service = TestService::start(routes, config).await.unwrap();
    for id in 0..4 {
        service.dispatch(&shop, "job", &json!({ "id": id })).await.unwrap();
    }
    // a mandatory publish made before (a retry, a dead letter, a hand-back in a service
    // that has run a while): the transport's mandatory channel is open
    let scratch = unique("rvracesscratch");
    let transport = service.transport();
    transport.declare_queue(&QueueSpec::durable(&scratch)).await.unwrap();
    let note = OutgoingMessage { body: b"{}".to_vec().into(), properties: Default::default() };
    transport.publish("", &scratch, note, PublishOptions { mandatory: true }).await.unwrap();
    transport.delete_queue(&scratch).await.unwrap();
    probe.wait_started(1).await;
    // the three others are received and wait for the slot
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.stall_down.store(true, Ordering::SeqCst);
    service.begin_stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    probe.open(); // the running call ends and is acked (client to broker still flows)
    let stopped = tokio::time::timeout(Duration::from_secs(60), service.wait_stopped()).await;
    eprintln!("stopped: {stopped:?}");
    drop(proxy); // the connection goes: the broker requeues what was unacked
    let direct = Config::new(unique("rvracescount")).with_amqp_uri(uri.clone());
    let transport = micro_framework::transport::connect(&direct).await.unwrap();
    let mut count = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        count = transport.queue_info(&queue).await.unwrap().message_count;
    }
    transport.close().await;
    common::cleanup(&uri, &markers).await;
    eprintln!("runs: {}, messages left in {queue}: {count}", probe.started());
    assert_eq!(probe.started(), 1);
    assert_eq!(count, 3, "three messages not run; {count} in the queue");
}
