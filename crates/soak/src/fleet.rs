//! [`Fleet`]: the services' processes of a soak run, started, killed and stopped by the driver
//! and the faults.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use micro_framework::transport::SharedTransport;

use crate::broker;
use crate::tracker::Tracker;
use crate::{Names, Role};

/// The services' processes.
pub struct Fleet {
    pub names: Names,
    pub dir: PathBuf,
    /// The run's broker user, whose connections fault (a) closes.
    pub user: broker::SoakUser,
    /// The driver's own connections, watched to see when a broker-side fault takes effect.
    pub observed: Vec<SharedTransport>,
    /// Counts the ids; told when each fault took effect.
    pub tracker: Arc<Tracker>,
    /// Problems seen on the side (printed at the end; they fail the soak).
    pub findings: Arc<Mutex<Vec<String>>>,
    /// The soak binary, started again in each service role.
    pub exe: PathBuf,
    pub children: HashMap<Role, Child>,
}

impl Fleet {
    /// Start `role` (its output goes to `{dir}/{role}.log`).
    pub fn spawn(&mut self, role: Role) -> Result<(), String> {
        let path = self.dir.join(format!("{}.log", role.arg()));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        let err = log.try_clone().map_err(|error| error.to_string())?;
        let child = Command::new(&self.exe)
            .args(["--role", role.arg(), "--run", &self.names.run, "--dir"])
            .arg(&self.dir)
            .env("AMQP_URI", &self.user.uri)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            // Its own process group: a Ctrl-C at the terminal reaches the driver only, which
            // then stops the services itself.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|error| format!("cannot start service {}: {error}", role.arg()))?;
        self.children.insert(role, child);
        Ok(())
    }

    pub fn pid(&self, role: Role) -> Option<u32> {
        self.children.get(&role).map(Child::id)
    }

    /// SIGKILL `role`; returns its pid.
    pub fn kill(&mut self, role: Role) -> Result<u32, String> {
        let mut child = self.children.remove(&role).ok_or("the service is not running")?;
        let pid = child.id();
        child.kill().map_err(|error| format!("cannot kill {pid}: {error}"))?;
        child.wait().map_err(|error| format!("cannot reap {pid}: {error}"))?;
        Ok(pid)
    }

    /// SIGTERM every service and wait for them (and their worker processes) to end.
    pub async fn stop_all(&mut self) {
        let mut workers = Vec::new();
        for child in self.children.values() {
            workers.extend(broker::children_of(child.id()));
            broker::signal(child.id(), "TERM");
        }
        for (role, mut child) in self.children.drain() {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) if !status.success() => {
                        let finding = format!("service {} stopped with {status}", role.arg());
                        self.findings.lock().unwrap_or_else(PoisonError::into_inner).push(finding);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok(None) | Err(_) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        let finding = format!("service {} did not stop in 20 s", role.arg());
                        self.findings.lock().unwrap_or_else(PoisonError::into_inner).push(finding);
                        break;
                    }
                    Ok(Some(_)) => break,
                }
            }
        }
        for pid in workers {
            if !broker::wait_gone(pid, Duration::from_secs(5)).await {
                broker::signal(pid, "KILL");
                let finding = format!("worker process {pid} outlived its service's stop");
                self.findings.lock().unwrap_or_else(PoisonError::into_inner).push(finding);
            }
        }
    }
}
