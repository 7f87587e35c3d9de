//! The 3-node test cluster of `deploy/cluster/rabbitmq-cluster.sh`: its URIs, its nodes, and
//! faults on them that are undone when their guard drops (also when a test panics).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the cluster may take to form again after a fault is undone.
const REFORM_LIMIT: Duration = Duration::from_secs(120);

/// The cluster named by `MF_CLUSTER_URIS` (one URI per node, node N = the N-th URI), whose
/// nodes the script manages (it reads the same `MF_CLUSTER_*` variables).
pub struct Cluster {
    pub uris: Vec<String>,
    /// The Erlang node names, node N = the N-th.
    pub nodes: Vec<String>,
}

/// The cluster when `MF_CLUSTER_URIS` is set and every node answers. Cluster tests run when
/// asked for: with `MF_CLUSTER_URIS` or `MF_CLUSTER_TESTS=1`; otherwise they skip with the
/// reason (also under `CI=true`, whose main test step runs without a cluster). Asked for and
/// not reachable fails under `CI=true` or `MF_CLUSTER_TESTS=1`, and skips loudly otherwise.
pub fn cluster() -> Option<Cluster> {
    let flag = |name: &str, value: &str| std::env::var(name).is_ok_and(|v| v == value);
    let strict = flag("CI", "true") || flag("MF_CLUSTER_TESTS", "1");
    let uris: Vec<String> = std::env::var("MF_CLUSTER_URIS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|uri| !uri.is_empty())
        .map(str::to_owned)
        .collect();
    if uris.is_empty() && !flag("MF_CLUSTER_TESTS", "1") {
        eprintln!(
            "SKIPPED: no cluster requested (set MF_CLUSTER_URIS to the output of \
             `deploy/cluster/rabbitmq-cluster.sh start` to run the cluster tests)"
        );
        return None;
    }
    let problem = if uris.len() != 3 {
        Some(format!("MF_CLUSTER_URIS must hold the 3 nodes' URIs, got {uris:?}"))
    } else {
        uris.iter().find(|uri| !reachable(uri)).map(|uri| format!("{uri} does not answer"))
    };
    match problem {
        None => Some(Cluster { uris, nodes: node_names() }),
        Some(problem) if strict => panic!("cluster requested but not reachable: {problem}"),
        Some(problem) => {
            eprintln!("SKIPPED: cluster requested but not reachable: {problem}");
            None
        }
    }
}

fn reachable(uri: &str) -> bool {
    let address: Option<SocketAddr> = url::Url::parse(uri)
        .ok()
        .and_then(|url| format!("{}:{}", url.host_str()?, url.port().unwrap_or(5672)).parse().ok());
    address
        .is_some_and(|address| TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok())
}

fn node_names() -> Vec<String> {
    let output = Command::new(script()).arg("nodes").output().expect("the cluster script runs");
    let nodes: Vec<String> =
        String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect();
    assert_eq!(nodes.len(), 3, "the cluster script names 3 nodes: {nodes:?}");
    nodes
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/cluster/rabbitmq-cluster.sh")
}

/// `rabbitmqctl` (or `rabbitmq-queues` with `tool = "queues"`) against node `node` (1..=3):
/// its output, or the error output when it fails.
pub fn tool(tool: &str, node: usize, args: &[&str]) -> Result<String, String> {
    let output = Command::new(script())
        .arg(tool)
        .arg(node.to_string())
        .args(args)
        .output()
        .map_err(|error| format!("{} does not run: {error}", script().display()))?;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    if output.status.success() {
        Ok(text(&output.stdout))
    } else {
        Err(format!("{tool} {node} {args:?}: {}{}", text(&output.stdout), text(&output.stderr)))
    }
}

/// `rabbitmqctl` against node `node`; panics when it fails.
pub fn ctl(node: usize, args: &[&str]) -> String {
    tool("ctl", node, args).unwrap_or_else(|error| panic!("{error}"))
}

impl Cluster {
    /// The URI of node `node` (1..=3).
    pub fn uri(&self, node: usize) -> &str {
        &self.uris[node - 1]
    }

    /// The whole cluster as an `AMQP_URI` list.
    pub fn list(&self) -> String {
        self.uris.join(",")
    }

    /// The node (1..=3) listening at `host:port`.
    pub fn node_at(&self, address: &str) -> Option<usize> {
        self.uris
            .iter()
            .position(|uri| {
                url::Url::parse(uri).ok().is_some_and(|url| {
                    url.host_str()
                        .zip(url.port())
                        .is_some_and(|(host, port)| address == format!("{host}:{port}"))
                })
            })
            .map(|index| index + 1)
    }

    /// The node (1..=3) leading quorum queue `queue`, asked of node `ask`.
    pub fn leader(&self, ask: usize, queue: &str) -> Option<usize> {
        let listing = ctl(ask, &["list_queues", "-q", "--no-table-headers", "name", "leader"]);
        let leader = listing.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(queue)).then(|| fields.next().map(str::to_owned)).flatten()
        })?;
        (1..=3).find(|node| leader == self.nodes[node - 1])
    }

    /// Delete the queues and exchanges whose names contain `marker`, through node `node`.
    pub async fn delete_named(&self, node: usize, marker: &str) {
        let names = |what: &str| -> Vec<String> {
            ctl(node, &[what, "-q", "--no-table-headers", "name"])
                .lines()
                .map(|line| line.trim().to_owned())
                .filter(|name| name.contains(marker))
                .collect()
        };
        let config = micro_framework::Config::new("cleanup").with_amqp_uri(self.uri(node).into());
        let transport =
            micro_framework::transport::connect(&config).await.expect("cleanup connects");
        for queue in names("list_queues") {
            transport.delete_queue(&queue).await.expect("queue deleted");
        }
        for exchange in names("list_exchanges") {
            transport.delete_exchange(&exchange).await.expect("exchange deleted");
        }
        transport.close().await;
    }
}

/// What node `ask` lists of the queues and bindings whose names contain `marker` (queue:
/// its node, consumers, ready and unacked messages), for a failure's message.
pub fn queues_view(ask: usize, marker: &str) -> String {
    let rows = |args: &[&str]| match tool("ctl", ask, args) {
        Ok(listing) => listing
            .lines()
            .filter(|line| line.contains(marker))
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("; "),
        Err(error) => error,
    };
    let queues = rows(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "pid",
        "consumers",
        "messages_ready",
        "messages_unacknowledged",
    ]);
    let bindings = rows(&[
        "list_bindings",
        "-q",
        "--no-table-headers",
        "source_name",
        "destination_name",
        "routing_key",
    ]);
    format!("queues ({marker}): [{queues}]; bindings: [{bindings}]")
}

/// Wait until the three nodes run and each sees the other two.
pub fn await_formed() {
    if let Err(failure) = formed() {
        panic!("{failure}");
    }
}

/// Whether the three nodes run and each sees the other two, within [`REFORM_LIMIT`]: each
/// node's count of running nodes, asked of node 1 for all three in one call. On failure, a
/// message with what the last check saw.
fn formed() -> Result<(), String> {
    let nodes = node_names().iter().map(|node| format!("'{node}'")).collect::<Vec<_>>();
    let views = format!(
        "[catch length(rpc:call(N, rabbit_nodes, all_running, [], 5000)) || N <- [{}]].",
        nodes.join(", ")
    );
    within(REFORM_LIMIT, || {
        let counts = tool("ctl", 1, &["eval", &views])?;
        match counts.trim() {
            "[3,3,3]" => Ok(()),
            other => Err(format!("running nodes as each node counts them: {other}")),
        }
    })
    .map_err(|last| {
        format!("the cluster did not form again within {REFORM_LIMIT:?}; last seen: {last}")
    })
}

/// Wait until no quorum queue needs node `node` for its majority, as an operator checks
/// before taking a node down.
pub fn await_not_critical(node: usize) {
    let safe = within(REFORM_LIMIT, || {
        tool("queues", node, &["check_if_node_is_quorum_critical"]).map(drop)
    });
    if let Err(last) = safe {
        panic!(
            "node {node} stayed critical for the quorum of a queue for {REFORM_LIMIT:?}; the \
             last check said: {last}"
        );
    }
}

/// Poll `check` every 500 ms for up to `limit`; the last failure when it never passed (a
/// failed wait names what it last saw).
fn within(limit: Duration, mut check: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let failure = match check() {
            Ok(()) => return Ok(()),
            Err(failure) => failure,
        };
        if Instant::now() >= deadline {
            return Err(failure);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A fault on one node, undone by [`Fault::undo`] or when dropped.
pub struct Fault {
    node: usize,
    kind: FaultKind,
    undone: bool,
}

#[derive(Clone, Copy, Debug)]
pub enum FaultKind {
    /// `rabbitmqctl stop_app`: RabbitMQ stopped on the node (its Erlang VM stays up), as in a
    /// node restart; undone by `start_app`.
    Stopped,
    /// The node cut off from its two peers: their Erlang cookie set wrong on the node and the
    /// distribution links closed, so neither side can reconnect until the cookie is restored.
    /// With `cluster_partition_handling = pause_minority` the node pauses itself.
    Partitioned,
    /// A memory alarm on the node (its high watermark set near 0): the broker blocks the
    /// publishing connections of the whole cluster (`connection.blocked`); undone by setting
    /// the watermark back to RabbitMQ's default, 0.4.
    MemoryAlarm,
}

const PARTITION: &str = "Peers = [N || N <- rabbit_nodes:all(), N =/= node()], \
    [erlang:set_cookie(N, mf_partitioned) || N <- Peers], \
    [erlang:disconnect_node(N) || N <- Peers], ok.";
const HEAL: &str = "Peers = [N || N <- rabbit_nodes:all(), N =/= node()], \
    [erlang:set_cookie(N, erlang:get_cookie()) || N <- Peers], ok.";

impl Fault {
    /// Inject `kind` on node `node`.
    pub fn inject(node: usize, kind: FaultKind) -> Fault {
        match kind {
            FaultKind::Stopped => ctl(node, &["stop_app"]),
            FaultKind::Partitioned => ctl(node, &["eval", PARTITION]),
            FaultKind::MemoryAlarm => ctl(node, &["set_vm_memory_high_watermark", "0.0000001"]),
        };
        Fault { node, kind, undone: false }
    }

    /// Undo the fault and wait until the cluster is whole again.
    pub fn undo(mut self) {
        self.undone = true;
        undo(self.node, self.kind).unwrap_or_else(|error| panic!("{error}"));
        await_formed();
    }
}

fn undo(node: usize, kind: FaultKind) -> Result<String, String> {
    match kind {
        FaultKind::Stopped => tool("ctl", node, &["start_app"]),
        FaultKind::Partitioned => tool("ctl", node, &["eval", HEAL]),
        FaultKind::MemoryAlarm => tool("ctl", node, &["set_vm_memory_high_watermark", "0.4"]),
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        if self.undone {
            return;
        }
        // A test failed with the fault in place: leave the cluster whole for the next test.
        if let Err(error) = undo(self.node, self.kind) {
            eprintln!("could not undo {:?} on node {}: {error}", self.kind, self.node);
        }
        if let Err(failure) = formed() {
            eprintln!("{failure}");
        }
    }
}
