//! CPU time spent, for CPU-per-message figures: this process's (getrusage), its child
//! processes' and the local RabbitMQ node's (/proc).

use std::time::Duration;

/// CPU time (user + system) of this process so far.
pub fn own_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// CPU time of this process's live child processes so far (e.g. worker processes), in
/// nanoseconds from each of their threads' `/proc/PID/task/TID/schedstat`: getrusage counts
/// children only once they are reaped, and `/proc/PID/stat` only in clock ticks (10 ms).
/// Threads that ended are not counted.
pub fn children_cpu() -> Duration {
    let mut total = Duration::ZERO;
    for child in children_of(std::process::id()) {
        let Ok(threads) = std::fs::read_dir(format!("/proc/{child}/task")) else { continue };
        for thread in threads.flatten() {
            let Ok(stat) = std::fs::read_to_string(thread.path().join("schedstat")) else {
                continue;
            };
            let on_cpu = stat.split_whitespace().next().and_then(|ns| ns.parse().ok());
            total += Duration::from_nanos(on_cpu.unwrap_or(0));
        }
    }
    total
}

/// The live child processes of `pid`, from each of its threads' `/proc/PID/task/TID/children`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| {
            children.split_whitespace().filter_map(|child| child.parse().ok()).collect::<Vec<_>>()
        })
        .collect()
}

/// CPU time (user + system) of the local RabbitMQ node so far, from /proc; `None` when the
/// broker is not a local process this user can read (`BROKER_PID`, else `pgrep -u rabbitmq
/// beam.smp`).
pub fn broker_cpu() -> Option<Duration> {
    let pid = match std::env::var("BROKER_PID") {
        Ok(pid) => pid,
        Err(_) => {
            let found = std::process::Command::new("pgrep")
                .args(["-u", "rabbitmq", "-x", "beam.smp"])
                .output()
                .ok()?;
            String::from_utf8(found.stdout).ok()?.lines().next()?.trim().to_owned()
        }
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the fields after the command name, which is in parentheses and may hold spaces
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| Duration::from_secs_f64(ticks as f64 / per_second as f64))
}
