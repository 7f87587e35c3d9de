//! [`Switch`]: a TCP proxy in front of RabbitMQ that can be switched off (every connection
//! cut, new ones closed at once) and on again, for tests of a service whose broker goes away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A TCP proxy to RabbitMQ that can be switched off and on again.
pub struct Switch {
    port: u16,
    up: Arc<AtomicBool>,
    pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Switch {
    /// A switch in front of the broker of `uri`, on, and the URI that goes through it.
    pub async fn in_front_of(uri: &str) -> (Switch, String) {
        let url = url::Url::parse(uri).unwrap();
        let broker = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (up_too, pipes_too) = (up.clone(), pipes.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up_too.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let broker = broker.clone();
                let pipe = tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(broker).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
                pipes_too.lock().unwrap().push(pipe);
            }
        });
        let mut proxied = url.clone();
        proxied.set_port(Some(port)).unwrap();
        (Switch { port, up, pipes, accept }, proxied.to_string())
    }

    /// Cut every connection and refuse new ones.
    pub fn off(&self) {
        self.up.store(false, Ordering::SeqCst);
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    /// Let connections through again.
    pub fn on(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.off();
        self.accept.abort();
        let _ = self.port;
    }
}
