//! Soak test against RabbitMQ: `cargo run --release -p micro-framework-soak -- --seconds 60`.
//!
//! Two services exchange events and RPC calls under steady load while faults are injected on a
//! schedule; every message id is counted end to end. The program is the driver and, started
//! again by itself with `--role a|b`, each service (so a SIGKILL and restart is real):
//!
//! ```text
//!  driver ──event job{id}──► A.on_job (thread) ──RPC stamp(id)──► B.stamp (process)
//!    │                          └──event forward{id}──► B.on_forward (process) ─┐
//!    └──RPC work(id), retried until replied──► B.work (process) ────────────────┤
//!  driver.collect ◄──event handled{id, exec} (one per execution) ───────────────┘
//! ```
//!
//! Faults, in turn every `--interval` seconds (each once the previous one has recovered):
//! all of the soak's broker connections closed (`rabbitmqctl close_all_user_connections`), a
//! service SIGKILLed and restarted (B, then A, ...), a worker process of B
//! (`WORKER_MODE=process`) SIGKILLed, preferably one in the middle of a call, and RabbitMQ's
//! app stopped for 3 s and started again (`--no-broker-restart` skips that one).
//!
//! The last line is `sent=N handled=N duplicates=D lost=L max_recovery_ms=M`; the exit code is
//! 1 when an id is lost (some are printed) or a fault never recovered. See the README's "Soak
//! test" section.

mod broker;
mod driver;
mod faults;
mod fleet;
mod services;
mod tracker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use micro_framework::Config;

/// Default broker when `AMQP_URI` is unset.
const DEFAULT_URI: &str = "amqp://guest:guest@127.0.0.1:5672/";

const USAGE: &str = "\
usage: soak [--seconds S] [--rate R] [--interval I] [--no-broker-restart] [--drain D] [--keep-logs]

  --seconds S          seconds of load (default 60)
  --rate R             message ids per second, 2/3 events and 1/3 RPC calls (default 60)
  --interval I         seconds between faults (default 9)
  --no-broker-restart  skip the fault that stops and starts RabbitMQ's app
  --drain D            seconds to wait for in-flight messages after the load (default 60)
  --keep-logs          keep the logs directory even when nothing was lost

The broker is AMQP_URI (default amqp://guest:guest@127.0.0.1:5672/); rabbitmqctl must reach it.";

/// Options of the driver.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub seconds: u64,
    pub rate: f64,
    pub interval: u64,
    pub broker_restart: bool,
    pub drain: u64,
    pub keep_logs: bool,
    pub uri: String,
}

/// The two services of the soak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    /// Thread mode: takes the driver's events, calls B, dispatches events to B.
    A,
    /// Process mode: its calls run in worker processes, one of which the soak kills.
    B,
}

impl Role {
    fn arg(self) -> &'static str {
        match self {
            Role::A => "a",
            Role::B => "b",
        }
    }
}

/// The names of one run: everything the soak declares contains `soak-{run}`.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    pub run: String,
}

impl Names {
    /// The marker found in every queue, exchange and connection name of the run.
    pub fn marker(&self) -> String {
        format!("soak-{}", self.run)
    }

    pub fn driver(&self) -> String {
        format!("soak-{}-driver", self.run)
    }

    pub fn service(&self, role: Role) -> String {
        format!("soak-{}-{}", self.run, role.arg())
    }

    /// The run's own RPC exchange (nothing of the soak touches `nameko-rpc`).
    pub fn rpc_exchange(&self) -> String {
        format!("soak-{}-rpc", self.run)
    }

    /// The config every participant shares: broker, RPC exchange, short timeouts.
    pub fn config(&self, uri: &str, service: String) -> Config {
        Config::new(service)
            .with_amqp_uri(uri.to_owned())
            .with_rpc_exchange(self.rpc_exchange())
            .with_rpc_timeout(Duration::from_secs(5))
            .with_shutdown_timeout(Duration::from_secs(5))
    }
}

enum Mode {
    Driver(Options),
    Service { role: Role, names: Names, dir: PathBuf },
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Mode, String> {
    let mut options = Options {
        seconds: 60,
        rate: 60.0,
        interval: 9,
        broker_restart: true,
        drain: 60,
        keep_logs: false,
        uri: std::env::var("AMQP_URI").unwrap_or_else(|_| DEFAULT_URI.to_owned()),
    };
    let (mut role, mut run, mut dir) = (None, None, None);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => options.seconds = number("--seconds", value("--seconds")?)?,
            "--rate" => options.rate = number("--rate", value("--rate")?)?,
            "--interval" => options.interval = number("--interval", value("--interval")?)?,
            "--drain" => options.drain = number("--drain", value("--drain")?)?,
            "--no-broker-restart" => options.broker_restart = false,
            "--keep-logs" => options.keep_logs = true,
            "--role" => {
                role = Some(match value("--role")?.as_str() {
                    "a" => Role::A,
                    "b" => Role::B,
                    other => return Err(format!("--role: a or b, not {other}")),
                })
            }
            "--run" => run = Some(value("--run")?),
            "--dir" => dir = Some(PathBuf::from(value("--dir")?)),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if !(options.rate >= 3.0 && options.rate <= 10_000.0) {
        return Err("--rate must be between 3 and 10000".into());
    }
    if options.interval < 3 {
        return Err("--interval must be at least 3 seconds".into());
    }
    match (role, run, dir) {
        (Some(role), Some(run), Some(dir)) => Ok(Mode::Service { role, names: Names { run }, dir }),
        (None, None, None) => Ok(Mode::Driver(options)),
        _ => Err("--role, --run and --dir go together (internal)".into()),
    }
}

fn number<T: std::str::FromStr>(name: &str, text: String) -> Result<T, String> {
    text.parse().map_err(|_| format!("{name}: not a number: {text}"))
}

fn main() -> ExitCode {
    let mode = match parse(std::env::args().skip(1)) {
        Ok(mode) => mode,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Service { role, names, dir } => match services::serve(role, &names, &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                // `Debug`: a route that stopped says why only in its source
                eprintln!("service {}: {error:?}", names.service(role));
                ExitCode::FAILURE
            }
        },
        Mode::Driver(options) => driver::main(options),
    }
}
