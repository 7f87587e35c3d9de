//! `dlq list|show|replay` on a dead letter whose header is an array nested as deep as one
//! frame (131,072 bytes) can hold: no crash. Parsing such a header recurses once per level, in
//! lapin's I/O thread, so the process needs the big default thread stack the library sets
//! (RUST_MIN_STACK) before `main`; the CLI runs its commands on spawned threads for the same
//! reason. Measured on the debug build, 26,009 levels: the CLI aborts with a 256 MiB default
//! stack (lapin's I/O thread) and passes with 320 MiB. In its own test binary: a stack overflow
//! aborts the whole process, and must not take other tests down with it.

use micro_framework::transport::{
    HeaderValue, Headers, OutgoingMessage, Properties, PublishOptions, QueueSpec,
};

mod support;

use support::*;

/// The frame size RabbitMQ offers (`frame_max`), which holds the whole content header.
const FRAME_MAX: usize = 131_072;
/// Bytes of one nesting level: the array's type tag `A` and its 4-byte length.
const LEVEL: usize = 5;
/// Room for everything else in the frame: frame and content-header fields, the other headers.
const OTHER_BYTES: usize = 1024;
/// The stack of the thread that builds, publishes and drops the header: each of those walks it
/// recursively.
const BIG_STACK: usize = 256 << 20;

/// An empty array inside `depth - 1` arrays of one element, built without recursion.
fn nested(depth: usize) -> HeaderValue {
    let mut value = HeaderValue::Array(Vec::new());
    for _ in 1..depth {
        value = HeaderValue::Array(vec![value]);
    }
    value
}

/// Set in the process that publishes the dead letter (see below).
const PUBLISHER: &str = "MF_TEST_DEEP_HEADERS_PUBLISHER";

#[test]
fn dlq_commands_survive_the_deepest_header_a_frame_holds() {
    if std::env::var_os(PUBLISHER).is_none() {
        // lapin serializes the header in its own I/O thread, whose stack size this process
        // fixed when libtest started its first thread: the test runs again in a process of
        // its own started with a big RUST_MIN_STACK (the CLI it runs does not inherit it)
        let status = std::process::Command::new(std::env::current_exe().expect("this test"))
            .args(["dlq_commands_survive_the_deepest_header_a_frame_holds", "--exact"])
            .args(["--nocapture", "--test-threads=1"])
            .env(PUBLISHER, "1")
            .env("RUST_MIN_STACK", BIG_STACK.to_string())
            .status()
            .expect("the test binary runs");
        assert!(status.success(), "{status}");
        return;
    }
    let worker = std::thread::Builder::new()
        .stack_size(BIG_STACK)
        .spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            runtime.expect("a runtime").block_on(deep_headers());
        })
        .expect("a thread");
    if let Err(panic) = worker.join() {
        std::panic::resume_unwind(panic);
    }
}

async fn deep_headers() {
    let Some(uri) = rabbitmq() else { return };
    let (target, dlq) = (unique("cli_deep_target"), unique("cli_deep") + ".dlq");
    let transport = connect(&uri).await;
    for name in [&target, &dlq] {
        transport.declare_queue(&QueueSpec::durable(name.as_str())).await.unwrap();
    }
    let depth = (FRAME_MAX - OTHER_BYTES) / LEVEL;
    let mut headers = Headers::new();
    headers.insert("x-mf-original-queue".into(), HeaderValue::from(target.as_str()));
    headers.insert("x-mf-error".into(), HeaderValue::from("too deep"));
    headers.insert("deep".into(), nested(depth));
    let properties = Properties { headers, ..Properties::default() };
    let message = OutgoingMessage { body: bytes::Bytes::from_static(b"{}"), properties };
    let published = transport.publish("", &dlq, message, PublishOptions::default()).await;

    let outcome = match published {
        Ok(()) => run_commands(&uri, &dlq, &target, depth, &transport).await,
        Err(error) => Err(format!("cannot publish the dead letter: {error}")),
    };
    // counters only from here: reading the message back would parse it in this process
    for queue in [&target, &dlq] {
        let _ = transport.delete_queue(queue).await;
    }
    transport.close().await;
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

async fn run_commands(
    uri: &str,
    dlq: &str,
    target: &str,
    depth: usize,
    transport: &micro_framework::transport::SharedTransport,
) -> Result<(), String> {
    let check = |what: &str, run: &Finished| {
        if run.status.success() && !run.stderr.contains("overflow") {
            Ok(())
        } else {
            let stderr: String = run.stderr.chars().take(2000).collect();
            Err(format!("{what} at depth {depth}: {}, stderr {stderr}", run.status))
        }
    };
    let list = cli_default_stack(uri, &["dlq", "list", dlq]).await;
    check("dlq list", &list)?;
    if !list.stdout.contains("too deep") {
        return Err(format!("dlq list does not show the dead letter: {}", list.stdout));
    }
    let show = cli_default_stack(uri, &["dlq", "show", dlq, "--index", "0"]).await;
    check("dlq show", &show)?;
    if !show.stdout.contains("\"deep\"") {
        return Err("dlq show does not show the deep header".to_owned());
    }
    let replay = cli_default_stack(uri, &["dlq", "replay", dlq]).await;
    check("dlq replay", &replay)?;
    let (moved, left) = (transport.queue_info(target).await, transport.queue_info(dlq).await);
    match (moved.map(|info| info.message_count), left.map(|info| info.message_count)) {
        (Ok(1), Ok(0)) => Ok(()),
        other => Err(format!("after the replay (target, dlq) counts are {other:?}")),
    }
}

/// How a run of the binary ended (a crash is a signal, not an exit code).
struct Finished {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Run the binary as an operator would: without the RUST_MIN_STACK of this process.
async fn cli_default_stack(uri: &str, args: &[&str]) -> Finished {
    let output = tokio::process::Command::new(BIN)
        .args(args)
        .env("AMQP_URI", uri)
        .env_remove("SERVICE_NAME")
        .env_remove("RUST_MIN_STACK")
        .output()
        .await
        .expect("the binary runs");
    Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
