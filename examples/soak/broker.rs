//! The outside world: `rabbitmqctl`, the soak's connections at the broker, processes under
//! `/proc`, and the final clean-up.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use micro_framework::amqp::transport::SharedTransport;

/// Run `rabbitmqctl args` (async); Ok(stdout) when it succeeded.
pub async fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|error| format!("rabbitmqctl {args:?}: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The same, blocking (for drop guards).
fn rabbitmqctl_blocking(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Start RabbitMQ's app again and wait for it (blocking); if the node itself is gone, start
/// the server.
pub fn ensure_broker_running() {
    let started = rabbitmqctl_blocking(&["start_app"]);
    if !started && !rabbitmqctl_blocking(&["status"]) {
        let _ = Command::new("rabbitmq-server").arg("-detached").status();
    }
    rabbitmqctl_blocking(&["await_startup", "--timeout", "120"]);
}

/// Stop RabbitMQ's app (hold an [`AppStopped`] first).
pub async fn rabbitmq_stop() -> Result<(), String> {
    rabbitmqctl(&["stop_app"]).await.map(|_| ())
}

/// Held while RabbitMQ's app is stopped: dropped without [`AppStopped::started`] (an error, a
/// panic, Ctrl-C), it starts the app again.
pub struct AppStopped {
    armed: bool,
}

impl AppStopped {
    pub fn new() -> Self {
        AppStopped { armed: true }
    }

    /// Start the app and wait until it runs.
    pub async fn started(mut self) -> Result<(), String> {
        let result = async {
            rabbitmqctl(&["start_app"]).await?;
            rabbitmqctl(&["await_startup", "--timeout", "120"]).await.map(|_| ())
        }
        .await;
        if result.is_ok() {
            self.armed = false;
        }
        result
    }
}

impl Drop for AppStopped {
    fn drop(&mut self) {
        if self.armed {
            eprintln!("soak: starting RabbitMQ's app again");
            ensure_broker_running();
        }
    }
}

/// The connections of the run at the broker: those named after it (every service names its
/// connection after itself) and this process's own (the RPC client's connection is named
/// `standalone_rpc_proxy`, so it is found by its local port). Returns their broker pids.
pub async fn soak_connections(marker: &str, broker_port: u16) -> Result<Vec<String>, String> {
    let own_ports = own_tcp_ports(broker_port);
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "peer_port",
        "client_properties",
    ])
    .await?;
    let mut pids = Vec::new();
    for line in listing.lines() {
        let mut fields = line.split('\t');
        let (Some(pid), Some(port)) = (fields.next(), fields.next()) else { continue };
        let ours = line.contains(&format!("\"{marker}-"))
            || port.trim().parse::<u16>().is_ok_and(|port| own_ports.contains(&port));
        if ours {
            pids.push(pid.trim().to_owned());
        }
    }
    Ok(pids)
}

/// Close the broker connections `pids` at once.
pub async fn close_connections(pids: &[String]) -> Result<(), String> {
    let closes = pids.iter().map(|pid| async move {
        rabbitmqctl(&["close_connection", pid, "soak: fault injected"]).await
    });
    let results = futures::future::join_all(closes).await;
    // A connection that closed by itself meanwhile is not an error worth stopping for.
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if failures.len() == pids.len() && !pids.is_empty() {
        return Err(failures.join("; "));
    }
    Ok(())
}

/// Local ports of this process's TCP connections to `broker_port` (Linux `/proc`).
fn own_tcp_ports(broker_port: u16) -> HashSet<u16> {
    let inodes: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned)
        })
        .collect();
    let port_of = |address: &str| {
        address.rsplit(':').next().and_then(|hex| u16::from_str_radix(hex, 16).ok())
    };
    let mut ports = HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(9))
            else {
                continue;
            };
            if port_of(remote) == Some(broker_port) && inodes.contains(*inode) {
                ports.extend(port_of(local));
            }
        }
    }
    ports
}

/// Names (and message counts) of the queues whose names contain `marker`.
pub async fn queues(marker: &str) -> Result<Vec<(String, u64)>, String> {
    let listing =
        rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name", "messages"]).await?;
    Ok(listing
        .lines()
        .filter_map(|line| {
            let (name, messages) = line.rsplit_once('\t')?;
            Some((name.trim().to_owned(), messages.trim().parse().unwrap_or(0)))
        })
        .filter(|(name, _)| name.contains(marker))
        .collect())
}

/// Names of the exchanges whose names contain `marker`.
pub async fn exchanges(marker: &str) -> Result<Vec<String>, String> {
    let listing = rabbitmqctl(&["list_exchanges", "-q", "--no-table-headers", "name"]).await?;
    Ok(listing.lines().map(|line| line.trim().to_owned()).filter(|n| n.contains(marker)).collect())
}

/// Delete every queue and exchange of the run; returns how many were deleted, and what is
/// left (should be nothing).
pub async fn clean_up(
    transport: &SharedTransport,
    marker: &str,
) -> Result<(usize, Vec<String>), String> {
    let mut deleted = 0;
    for (queue, _) in queues(marker).await? {
        transport.delete_queue(&queue).await.map_err(|e| format!("delete {queue}: {e}"))?;
        deleted += 1;
    }
    for exchange in exchanges(marker).await? {
        transport.delete_exchange(&exchange).await.map_err(|e| format!("delete {exchange}: {e}"))?;
        deleted += 1;
    }
    let mut left: Vec<String> = queues(marker).await?.into_iter().map(|(name, _)| name).collect();
    left.extend(exchanges(marker).await?);
    Ok((deleted, left))
}

/// The live (not zombie) child processes of `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((state, ppid)) = stat(pid) {
            if ppid == parent && state != 'Z' {
                children.push(pid);
            }
        }
    }
    children.sort_unstable();
    children
}

/// True while `pid` runs (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// (state, parent pid) of `pid`.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Send `signal` (e.g. `KILL`, `TERM`) to `pid`.
pub fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Wait up to `limit` for `pid` to end.
pub async fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while alive(pid) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}
