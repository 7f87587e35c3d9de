//! The faults and how each is injected.

use std::time::{Duration, Instant};

use micro_framework::transport::SharedTransport;

use crate::broker::{self, AppStopped};
use crate::fleet::Fleet;
use crate::services::busy_dir;
use crate::Role;

/// How long RabbitMQ's app stays stopped.
const BROKER_DOWN: Duration = Duration::from_secs(3);

/// One fault of the schedule.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Every broker connection of the soak closed by the broker.
    CloseConnections,
    /// A service SIGKILLed and started again at once.
    KillService(Role),
    /// A worker process of B SIGKILLed (preferably one in the middle of a call).
    KillWorker,
    /// RabbitMQ's app stopped, and started again after a pause.
    RestartBroker,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::CloseConnections => "close_connections",
            Fault::KillService(Role::A) => "sigkill_service_a",
            Fault::KillService(Role::B) => "sigkill_service_b",
            Fault::KillWorker => "sigkill_worker_process",
            Fault::RestartBroker => "restart_broker_app",
        }
    }
}

/// The faults in order, for ever: (a) connections, (b) SIGKILL B, (c) a worker of B,
/// (d) the broker's app; then the same with A as (b).
pub fn schedule(broker_restart: bool) -> impl Iterator<Item = Fault> {
    [
        Fault::CloseConnections,
        Fault::KillService(Role::B),
        Fault::KillWorker,
        Fault::RestartBroker,
        Fault::CloseConnections,
        Fault::KillService(Role::A),
        Fault::KillWorker,
        Fault::RestartBroker,
    ]
    .into_iter()
    .filter(move |fault| broker_restart || !matches!(fault, Fault::RestartBroker))
    .cycle()
}

/// A fault as injected: when it began, when it had taken effect (from then on the tracker
/// watches for ids that make it end to end), what exactly was done.
pub struct Injected {
    pub began: Instant,
    pub effective: Instant,
    pub detail: String,
}

/// Inject `fault`.
pub async fn inject(fault: Fault, fleet: &mut Fleet) -> Result<Injected, String> {
    match fault {
        Fault::CloseConnections => close_connections(fleet).await,
        Fault::KillService(role) => kill_service(fleet, role).await,
        Fault::KillWorker => kill_worker(fleet).await,
        Fault::RestartBroker => restart_broker(fleet).await,
    }
}

/// Resolves with the first moment one of `transports` is seen disconnected.
async fn first_drop(transports: Vec<SharedTransport>) -> Instant {
    loop {
        if transports.iter().any(|transport| !transport.is_connected()) {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Run `command` (which drops the broker connections) and tell when it took effect: the fault
/// began when the driver first saw one of its connections drop (what `rabbitmqctl` spends
/// starting up is not the fault's), or when the command was launched if that was not seen.
async fn dropping_connections<F>(fleet: &Fleet, command: F) -> Result<(Instant, Instant), String>
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let launched = Instant::now();
    let mut dropped = tokio::spawn(first_drop(fleet.observed.clone()));
    let result = command.await;
    let effective = Instant::now();
    let seen = tokio::time::timeout(Duration::from_millis(500), &mut dropped).await;
    dropped.abort();
    result?;
    let seen = seen.ok().and_then(Result::ok);
    let began = seen.filter(|seen| *seen <= effective).unwrap_or(launched);
    Ok((began, effective))
}

async fn close_connections(fleet: &Fleet) -> Result<Injected, String> {
    let connections = fleet.user.connections().await?;
    if connections == 0 {
        return Err("the soak has no connection at the broker".into());
    }
    let (began, effective) = dropping_connections(fleet, fleet.user.close_connections()).await?;
    fleet.tracker.watch(effective);
    let detail = format!(
        "{connections} connections of user {}, closed {} ms after the first drop",
        fleet.user.name,
        effective.duration_since(began).as_millis()
    );
    Ok(Injected { began, effective, detail })
}

async fn kill_service(fleet: &mut Fleet, role: Role) -> Result<Injected, String> {
    let workers = fleet.pid(role).map(broker::children_of).unwrap_or_default();
    let began = Instant::now();
    let killed = fleet.kill(role)?;
    let effective = Instant::now();
    fleet.tracker.watch(effective);
    fleet.spawn(role)?;
    if !workers.is_empty() {
        // The worker processes of a SIGKILLed service lose their socket: they must exit.
        let findings = fleet.findings.clone();
        let name = fault_name(role);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let left: Vec<u32> = workers.into_iter().filter(|pid| broker::alive(*pid)).collect();
            if !left.is_empty() {
                for pid in &left {
                    broker::signal(*pid, "KILL");
                }
                let finding = format!(
                    "{name}: worker processes {left:?} still ran 5 s after their service was killed"
                );
                findings.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(finding);
            }
        });
    }
    Ok(Injected { began, effective, detail: format!("pid {killed}, restarted") })
}

fn fault_name(role: Role) -> &'static str {
    Fault::KillService(role).name()
}

/// Kill a worker process of B, one in the middle of a call if one shows up within 3 s.
async fn kill_worker(fleet: &Fleet) -> Result<Injected, String> {
    let service = fleet.pid(Role::B).ok_or("service B is not running")?;
    let busy = busy_dir(&fleet.dir);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let workers = broker::children_of(service);
        let mid_call = workers.iter().find(|pid| busy.join(pid.to_string()).exists());
        let chosen = match (mid_call, workers.first()) {
            (Some(pid), _) => Some((*pid, "mid-call")),
            (None, Some(pid)) if Instant::now() >= deadline => Some((*pid, "idle")),
            (None, None) if Instant::now() >= deadline => {
                return Err(format!("service B (pid {service}) has no worker process"))
            }
            _ => None,
        };
        if let Some((pid, state)) = chosen {
            let began = Instant::now();
            if !broker::signal(pid, "KILL") {
                return Err(format!("cannot kill worker process {pid}"));
            }
            let effective = Instant::now();
            fleet.tracker.watch(effective);
            let detail = format!("worker pid {pid} of B ({state}), {} workers", workers.len());
            return Ok(Injected { began, effective, detail });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn restart_broker(fleet: &Fleet) -> Result<Injected, String> {
    let stopped = AppStopped::new();
    let (began, effective) = dropping_connections(fleet, broker::rabbitmq_stop()).await?;
    fleet.tracker.watch(effective);
    tokio::time::sleep(BROKER_DOWN).await;
    stopped.started().await?;
    let detail = format!("down {} ms", began.elapsed().as_millis());
    Ok(Injected { began, effective, detail })
}
