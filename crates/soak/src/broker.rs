//! The outside world: `rabbitmqctl`, the soak's connections at the broker, processes under
//! `/proc`, and the final clean-up.

use std::process::{Command, Stdio};
use std::time::Duration;

use percent_encoding::percent_decode_str;

use micro_framework::transport::SharedTransport;

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

/// The run's own broker user: every connection of the soak (services, worker processes'
/// services, the driver's collector, producer and RPC client) logs in as it, so that one
/// `rabbitmqctl close_all_user_connections` closes exactly the soak's connections, at once.
pub struct SoakUser {
    pub name: String,
    /// `AMQP_URI` with the user's credentials.
    pub uri: String,
}

impl SoakUser {
    /// Create user `name` with every permission on the URI's vhost.
    pub async fn create(base_uri: &str, name: &str) -> Result<SoakUser, String> {
        let mut url = url::Url::parse(base_uri).map_err(|e| format!("AMQP_URI: {e}"))?;
        let path = url.path().trim_start_matches('/');
        let vhost = match percent_decode_str(path).decode_utf8_lossy().into_owned() {
            vhost if vhost.is_empty() => "/".to_owned(),
            vhost => vhost,
        };
        let password = uuid::Uuid::new_v4().simple().to_string();
        url.set_username(name).map_err(|()| "AMQP_URI cannot take a user name".to_owned())?;
        url.set_password(Some(&password)).map_err(|()| "AMQP_URI cannot take a password")?;
        rabbitmqctl(&["add_user", name, &password]).await?;
        let user = SoakUser { name: name.to_owned(), uri: url.to_string() };
        if let Err(error) =
            rabbitmqctl(&["set_permissions", "-p", &vhost, name, ".*", ".*", ".*"]).await
        {
            user.delete().await;
            return Err(error);
        }
        Ok(user)
    }

    /// How many connections the user has.
    pub async fn connections(&self) -> Result<usize, String> {
        let listing =
            rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "user"]).await?;
        Ok(listing.lines().filter(|line| line.trim() == self.name).count())
    }

    /// Close every connection of the user.
    pub async fn close_connections(&self) -> Result<(), String> {
        rabbitmqctl(&["close_all_user_connections", &self.name, "soak: fault injected"])
            .await
            .map(|_| ())
    }

    /// Delete the user (which closes its connections).
    pub async fn delete(&self) {
        if let Err(error) = rabbitmqctl(&["delete_user", &self.name]).await {
            println!("broker: cannot delete user {}: {error}", self.name);
        }
    }
}

/// Whether the soak's user exists (to check the clean-up).
pub async fn user_exists(name: &str) -> Result<bool, String> {
    let listing = rabbitmqctl(&["list_users", "-q", "--no-table-headers"]).await?;
    Ok(listing.lines().any(|line| line.split('\t').next() == Some(name)))
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
        transport
            .delete_exchange(&exchange)
            .await
            .map_err(|e| format!("delete {exchange}: {e}"))?;
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
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
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
