#!/usr/bin/env python
"""Command-line Nameko 2.14.1 peer for the Rust interoperability tests.

Every observable thing is printed as one JSON object per line on stdout
(flushed); logs go to stderr. Every sub-command ends by itself: on success
with exit code 0, after ``--timeout`` seconds with exit code 3 and a
``{"timeout": true, ...}`` line.

Sub-commands (see tests/interop/README.md):

  dispatch   --service SRC --event EVT --payload JSON [--count N]
             [--call-id-stack a,b] [--delete-exchange] [--python-types]
  listen     --service SVC --source SRC --event EVT --count N [--keep-queue]
             [--relay EVT2]
  rpc-serve  --service SVC [--count N]
  rpc-call   --service SVC --method M [--args JSON] [--kwargs JSON]
             [--call-id-stack a,b] [--python-types]
  rpc-call-async --service SVC --calls '[[M, ARGS, KWARGS], ...]'
  standalone-dispatch --service SRC --event EVT --payload JSON [--count N]
             [--options JSON]
  shell      --service SVC --method M [--args JSON] [--kwargs JSON]
             --source SRC --event EVT --payload JSON
  serve      --service SVC --source SRC --event EVT [--stop-timeout S]

``dispatch`` runs a real ServiceContainer named SRC whose entrypoint uses
nameko's EventDispatcher, so the message carries the ``nameko.call_id_stack``
header exactly as a Nameko service sends it (the standalone
``event_dispatcher`` sends no context headers at all).

``serve`` is a long-running instance (event handler + RPC) for zero-downtime
migration tests: SIGTERM stops it as ``nameko run`` does
(``ServiceRunner.stop()``) and keeps its queues.
"""
import warnings

# eventlet >= 0.35 warns on import that it is deprecated; keep stderr readable
warnings.simplefilter("ignore")

import eventlet  # noqa: E402

eventlet.monkey_patch()  # noqa: E402  (nameko requires it before anything else)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from eventlet import patcher  # noqa: E402

# A real OS thread (not a green one) as a watchdog, so a blocked hub cannot
# stop the timeout from firing.
_real_threading = patcher.original("threading")
_real_time = patcher.original("time")

DEFAULT_URI = "amqp://guest:guest@127.0.0.1:5672/"
_print_lock = threading.Lock()


def _json_default(value):
    if isinstance(value, bytes):
        return {"$bytes": value.decode("utf-8", "replace")}
    return repr(value)


def emit(obj):
    line = json.dumps(obj, default=_json_default, sort_keys=True)
    with _print_lock:
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass  # the reader is gone (a test that gave up): keep going, clean up


def public(state):
    return {k: v for k, v in state.items() if not k.startswith("_")}


def start_watchdog(seconds, state):
    """Exit with code 3 after ``seconds`` (143 on SIGTERM).

    A green timer fires first so it can still clean up what the run declared
    (state["_cleanup"]); a real OS thread is the backstop in case the hub
    itself is blocked.
    """

    def on_timeout():
        emit({"timeout": True, "after_seconds": seconds, **public(state)})
        cleanup = state.get("_cleanup")
        if cleanup is not None:
            with eventlet.Timeout(5, False):
                cleanup()
        sys.stderr.flush()
        os._exit(3)

    def backstop():
        _real_time.sleep(seconds + 5)
        # commands for which --timeout is a normal end set a grace period
        # for their own stop; this thread stays the backstop
        grace = state.get("_grace")
        if grace:
            _real_time.sleep(grace)
        emit({"timeout": True, "after_seconds": seconds + 5, **public(state)})
        os._exit(3)

    def terminate():
        emit({"terminated": True, **public(state)})
        cleanup = state.get("_cleanup")
        if cleanup is not None:
            with eventlet.Timeout(5, False):
                cleanup()
        sys.stderr.flush()
        os._exit(143)

    state["_timer"] = eventlet.spawn_after(seconds, on_timeout)
    _real_threading.Thread(target=backstop, name="watchdog", daemon=True).start()
    # SIGTERM (a test giving up on us): clean up in a green thread, then exit 143
    signal.signal(signal.SIGTERM, lambda *_: eventlet.spawn_n(terminate))


def split_stack(text):
    if not text:
        return []
    return [part for part in text.split(",") if part]


def nameko_config(uri):
    return {"AMQP_URI": uri}


# --------------------------------------------------------------------------
# dispatch


def with_python_types(payload):
    """``payload`` (an object) plus one value of each type kombu's JSON encoder writes as
    a ``{"__type__": T, "__value__": V}`` envelope (``--python-types``)."""
    import datetime
    import decimal
    import uuid

    return dict(
        payload,
        at=datetime.datetime(2026, 1, 2, 3, 4, 5, 123456),
        day=datetime.date(2026, 1, 2),
        clock=datetime.time(3, 4, 5),
        amount=decimal.Decimal("10.50"),
        id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        text=b"hi",
        blob=b"\xff",
    )


def cmd_dispatch(args, state):
    from nameko.containers import ServiceContainer
    from nameko.events import EventDispatcher
    from nameko.testing.services import dummy, entrypoint_hook

    payload = json.loads(args.payload)
    if args.python_types:
        payload = with_python_types(payload)
    sent_stacks = []

    from nameko.extensions import DependencyProvider

    class WorkerCtx(DependencyProvider):
        def get_dependency(self, worker_ctx):
            return worker_ctx

    def emit_event(self, data):
        sent_stacks.append(self.ctx.call_id_stack)
        self.dispatch(args.event, data)

    service_cls = type(
        "DispatchService",
        (object,),
        {
            "name": args.service,
            "dispatch": EventDispatcher(),
            "ctx": WorkerCtx(),
            "emit": dummy(emit_event),
        },
    )
    container = ServiceContainer(service_cls, nameko_config(args.uri))
    container.start()
    try:
        parent = split_stack(args.call_id_stack)
        for i in range(args.count):
            # a fresh dict per call: WorkerContext pops call_id_stack from it
            context_data = {"call_id_stack": list(parent)} if parent else {}
            with entrypoint_hook(
                container, "emit", context_data=context_data
            ) as hook:
                hook(payload)
            emit({"sent": i, "call_id_stack": sent_stacks[-1]})
            state["dispatched"] = i + 1
    finally:
        container.stop()

    if args.delete_exchange:
        delete_entities(args.uri, exchanges=["{}.events".format(args.service)])
    emit({"dispatched": args.count})
    return 0


# --------------------------------------------------------------------------
# listen


def cmd_listen(args, state):
    from nameko.containers import ServiceContainer
    from nameko.events import EventDispatcher, event_handler
    from nameko.extensions import DependencyProvider

    done = eventlet.event.Event()
    received = []

    class WorkerCtx(DependencyProvider):
        def get_dependency(self, worker_ctx):
            return worker_ctx

    def handle(self, payload):
        ctx = self.ctx
        emit(
            {
                "payload": payload,
                "call_id_stack": ctx.call_id_stack,
                "parent_call_id_stack": list(ctx._parent_call_id_stack),
                "call_id": ctx.call_id,
                "context_data": ctx.data,
            }
        )
        if args.relay:
            # as a Nameko service does, with every header of this call forwarded
            self.dispatch(args.relay, payload)
        received.append(payload)
        state["received"] = len(received)
        if len(received) >= args.count and not done.ready():
            done.send(True)

    service_cls = type(
        "ListenService",
        (object,),
        {
            "name": args.service,
            "ctx": WorkerCtx(),
            "handle": event_handler(
                args.source, args.event, reliable_delivery=not args.unreliable
            )(handle),
        },
    )
    if args.relay:
        # only then: Nameko's dispatcher declares the service's own exchange, `{service}.events`
        service_cls.dispatch = EventDispatcher()
    queue = "evt-{}-{}--{}.handle".format(args.source, args.event, args.service)
    exchange = "{}.events".format(args.source)

    def cleanup():
        if not args.keep_queue:
            # the exchange only if nothing else is bound to it any more
            delete_entities(args.uri, queues=[queue], exchanges_if_unused=[exchange])

    container = ServiceContainer(service_cls, nameko_config(args.uri))
    state["_cleanup"] = aborting(container, cleanup)
    container.start()  # returns once the QueueConsumer is consuming
    emit({"ready": True, "queue": queue, "exchange": exchange})
    done.wait()
    container.stop()  # acks the last message before closing
    cleanup()
    emit({"done": True, "received": len(received)})
    return 0


# --------------------------------------------------------------------------
# rpc


def cmd_rpc_serve(args, state):
    from nameko.containers import ServiceContainer
    from nameko.extensions import DependencyProvider
    from nameko.rpc import rpc

    calls = []
    done = eventlet.event.Event()

    class WorkerCtx(DependencyProvider):
        def get_dependency(self, worker_ctx):
            return worker_ctx

        def worker_teardown(self, worker_ctx):
            # after the reply has been sent
            if args.count and len(calls) >= args.count and not done.ready():
                done.send(True)

    def record(self, method, *a, **kw):
        calls.append(method)
        state["calls"] = len(calls)
        emit(
            {
                "call": method,
                "args": list(a),
                "kwargs": kw,
                "call_id_stack": self.ctx.call_id_stack,
                # the other context data (nameko.* headers, prefix stripped)
                "context_data": {
                    key: value
                    for key, value in self.ctx.context_data.items()
                    if key != "call_id_stack"
                },
            }
        )

    def echo(self, x):
        record(self, "echo", x)
        return x

    def add(self, a, b):
        record(self, "add", a, b)
        return a + b

    def fail(self):
        record(self, "fail")
        raise ValueError("boom")

    def call_missing(self, service):
        record(self, "call_missing", service)
        # what a nested call of a service that is not running raises in a Nameko worker
        from nameko.exceptions import UnknownService

        raise UnknownService(service)

    service_cls = type(
        "RpcService",
        (object,),
        {
            "name": args.service,
            "ctx": WorkerCtx(),
            "echo": rpc(echo),
            "add": rpc(add),
            "fail": rpc(fail),
            "call_missing": rpc(call_missing),
        },
    )
    container = ServiceContainer(service_cls, nameko_config(args.uri))
    queue = "rpc-{}".format(args.service)
    if not args.keep_queue:
        state["_cleanup"] = aborting(
            container, lambda: delete_entities(args.uri, queues=[queue])
        )
    container.start()
    emit({"ready": True, "queue": queue})
    if args.count:
        done.wait()
        container.stop()
        if not args.keep_queue:
            delete_entities(args.uri, queues=["rpc-{}".format(args.service)])
        emit({"done": True, "calls": len(calls)})
        return 0
    # no --count: serve until --timeout, which then is the normal end (exit 0)
    state["_timer"].cancel()
    eventlet.sleep(max(args.timeout - 2, 0.5))
    container.stop()
    if not args.keep_queue:
        delete_entities(args.uri, queues=["rpc-{}".format(args.service)])
    emit({"done": True, "calls": len(calls)})
    return 0


def cmd_rpc_call(args, state):
    from nameko.exceptions import RemoteError
    from nameko.standalone.rpc import ClusterRpcProxy

    call_args = json.loads(args.args)
    call_kwargs = json.loads(args.kwargs)
    if args.python_types:
        call_kwargs = with_python_types(call_kwargs)
    context_data = {}
    parent = split_stack(args.call_id_stack)
    if parent:
        context_data["call_id_stack"] = parent
    cluster = ClusterRpcProxy(
        nameko_config(args.uri),
        context_data=context_data,
        timeout=max(args.timeout - 2, 1),
    )
    outcome = None
    with cluster as proxy:
        method = getattr(getattr(proxy, args.service), args.method)
        try:
            outcome = {"result": method(*call_args, **call_kwargs)}
            if args.result_repr:
                # Python's own text of the result: exact, unlike floats read back elsewhere
                outcome["repr"] = repr(outcome["result"])
        except RemoteError as exc:
            outcome = {"error": {"exc_type": exc.exc_type, "value": exc.value}}
        except Exception as exc:  # MethodNotFound, UnknownService, RpcTimeout...
            outcome = {"error": {"exc_type": type(exc).__name__, "value": str(exc)}}
    # the reply queue has x-expires 300000; remove it now rather than in 5 min
    reply_queue = getattr(getattr(cluster._reply_listener, "queue", None), "name", None)
    if reply_queue:
        delete_entities(args.uri, queues=[reply_queue])
    emit(outcome)
    return 0


def cmd_rpc_call_async(args, state):
    """Several calls in flight at once through ``ClusterRpcProxy``'s ``call_async``, their
    replies read in the reverse order of sending."""
    from nameko.exceptions import RemoteError
    from nameko.standalone.rpc import ClusterRpcProxy

    calls = json.loads(args.calls)
    cluster = ClusterRpcProxy(nameko_config(args.uri), timeout=max(args.timeout - 2, 1))
    with cluster as proxy:
        service = getattr(proxy, args.service)
        replies = [
            getattr(service, method).call_async(*call_args, **call_kwargs)
            for method, call_args, call_kwargs in calls
        ]
        emit({"sent": len(replies)})
        for index in reversed(range(len(replies))):
            line = {"index": index, "method": calls[index][0]}
            try:
                line["result"] = replies[index].result()
            except RemoteError as exc:
                error = {"class": "RemoteError", "exc_type": exc.exc_type, "value": exc.value}
                line["error"] = error
            except Exception as exc:  # MethodNotFound, RpcTimeout... rebuilt locally
                name = type(exc).__name__
                line["error"] = {"class": name, "exc_type": name, "value": str(exc)}
            emit(line)
            state["read"] = len(replies) - index
    # the reply queue has x-expires 300000; remove it now rather than in 5 min
    reply_queue = getattr(getattr(cluster._reply_listener, "queue", None), "name", None)
    if reply_queue:
        delete_entities(args.uri, queues=[reply_queue])
    emit({"done": True, "calls": len(replies)})
    return 0


# --------------------------------------------------------------------------
# standalone-dispatch / shell: Nameko's own tools for callers


def cmd_standalone_dispatch(args, state):
    """``nameko.standalone.events.event_dispatcher(config, **OPTIONS)``, as is."""
    from nameko.standalone.events import event_dispatcher

    payload = json.loads(args.payload)
    options = json.loads(args.options)
    dispatch = event_dispatcher(nameko_config(args.uri), **options)
    sent = 0
    for i in range(args.count):
        try:
            dispatch(args.service, args.event, payload)
        except Exception as exc:  # UndeliverableMessage for mandatory and unroutable
            emit({"index": i, "error": {"exc_type": type(exc).__name__, "value": str(exc)}})
            continue
        sent += 1
        state["dispatched"] = sent
        emit({"sent": i})
    emit({"dispatched": sent})
    return 0


SHELL_MARK = "@peer "


def shell_script(args):
    """What ``shell`` types into ``nameko shell``: one statement a line (it is interactive),
    each result printed as a marked JSON line among the prompts."""
    call_args = json.loads(args.args)
    call_kwargs = json.loads(args.kwargs)
    payload = json.loads(args.payload)
    return "\n".join(
        [
            "import json",
            "out = lambda obj: print({!r} + json.dumps(obj, sort_keys=True))".format(SHELL_MARK),
            'out({"reply_queue": n.rpc._reply_listener.queue.name})',
            'out({{"result": n.rpc.{}.{}(*{!r}, **{!r})}})'.format(
                args.service, args.method, call_args, call_kwargs
            ),
            "n.dispatch_event({!r}, {!r}, {!r})".format(args.source, args.event, payload),
            'out({"dispatched": True})',
            "n.disconnect()",
            "",
        ]
    )


def cmd_shell(args, state):
    """``nameko shell --config FILE`` (the CLI, a YAML file with AMQP_URI) with a script on
    stdin that calls ``n.rpc.SVC.METHOD(...)`` and ``n.dispatch_event(SRC, EVT, PAYLOAD)``."""
    import subprocess
    import tempfile

    import yaml

    cli = os.path.join(os.path.dirname(sys.executable), "nameko")
    with tempfile.TemporaryDirectory() as directory:
        config = os.path.join(directory, "config.yaml")
        with open(config, "w") as file:
            yaml.safe_dump(nameko_config(args.uri), file)
        shell = subprocess.run(
            [cli, "shell", "--config", config],
            input=shell_script(args),
            capture_output=True,
            text=True,
            timeout=max(args.timeout - 2, 1),
        )
    lines = [
        json.loads(line.split(SHELL_MARK, 1)[1])
        for line in shell.stdout.splitlines()
        if SHELL_MARK in line
    ]
    # the proxy's reply queue has x-expires 300000; remove it now rather than in 5 min
    for line in lines:
        if "reply_queue" in line:
            delete_entities(args.uri, queues=[line["reply_queue"]])
    for line in lines:
        emit(line)
    if shell.returncode != 0:
        sys.stderr.write(shell.stderr)
        raise RuntimeError("nameko shell exited with {}".format(shell.returncode))
    emit({"shell_exit": shell.returncode})
    return 0


# --------------------------------------------------------------------------
# serve: a long-running service instance (zero-downtime migration tests)


def _maybe_sleep(payload):
    """An event payload (or echo argument) ``{"sleep": S, ...}`` makes the
    handler (or echo) sleep S seconds first, to have a message in flight when
    the peer is stopped."""
    if isinstance(payload, dict) and isinstance(payload.get("sleep"), (int, float)):
        eventlet.sleep(payload["sleep"])


def cmd_serve(args, state):
    """``@event_handler(SRC, EVT) handle`` + ``@rpc echo(x)``, ``add(a, b)``
    in a ``ServiceRunner``; SIGTERM (or --timeout) runs ``ServiceRunner.stop()``
    as ``nameko run`` does on SIGTERM, keeps the queues, exits 0."""
    from nameko.events import event_handler
    from nameko.extensions import DependencyProvider
    from nameko.rpc import rpc
    from nameko.runners import ServiceRunner

    counts = {"events": 0, "calls": 0}

    class WorkerCtx(DependencyProvider):
        def get_dependency(self, worker_ctx):
            return worker_ctx

    def handle(self, payload):
        _maybe_sleep(payload)
        counts["events"] += 1
        state["events"] = counts["events"]
        if isinstance(payload, dict) and payload.get("raise"):
            emit({"event": payload, "raised": True})
            raise ValueError("raise requested")
        # after the handler ran; the ack follows when the worker ends
        emit({"event": payload})

    def record(self):
        ctx = self.ctx
        counts["calls"] += 1
        state["calls"] = counts["calls"]
        emit(
            {
                "rpc": ctx.entrypoint.method_name,
                "args": list(ctx.args),
                "kwargs": dict(ctx.kwargs),
            }
        )

    def echo(self, x):
        record(self)
        _maybe_sleep(x)
        return x

    def add(self, a, b):
        record(self)
        return a + b

    service_cls = type(
        "ServeService",
        (object,),
        {
            "name": args.service,
            "ctx": WorkerCtx(),
            "handle": event_handler(args.source, args.event)(handle),
            "echo": rpc(echo),
            "add": rpc(add),
        },
    )
    runner = ServiceRunner(nameko_config(args.uri))
    runner.add_service(service_cls)

    stop = eventlet.event.Event()

    def request_stop(why):
        if not stop.ready():
            stop.send(why)

    # like `nameko run`: the signal handler only spawns the stop in a greenlet
    signal.signal(signal.SIGTERM, lambda *_: eventlet.spawn_n(request_stop, "SIGTERM"))
    state["_timer"].cancel()  # --timeout is a normal end here
    state["_grace"] = args.stop_timeout + 5  # the OS-thread backstop stays
    eventlet.spawn_after(args.timeout, request_stop, "timeout")

    runner.start()  # returns once the (shared) QueueConsumer consumes both queues
    emit(
        {
            "ready": True,
            "queues": [
                "evt-{}-{}--{}.handle".format(args.source, args.event, args.service),
                "rpc-{}".format(args.service),
            ],
        }
    )
    by = stop.wait()
    try:
        with eventlet.Timeout(args.stop_timeout):
            runner.stop()  # graceful: entrypoints stop, running workers finish
    except eventlet.Timeout:
        emit({"timeout": True, "stage": "stop", "after_seconds": args.stop_timeout, **public(state)})
        with eventlet.Timeout(3, False):
            runner.kill()
        sys.stdout.flush()
        os._exit(3)
    emit({"stopped": True, "by": by, "events": counts["events"], "calls": counts["calls"]})
    return 0


# --------------------------------------------------------------------------
# helpers


def aborting(container, cleanup):
    """Cleanup for an interrupted run (timeout, SIGTERM): kill the container first,
    or kombu's ConsumerMixin would take the deletion's consumer-cancel as a lost
    connection and declare the queue again."""

    def run():
        with eventlet.Timeout(2, False):
            container.kill()
        cleanup()

    return run


def delete_entities(uri, queues=(), exchanges=(), exchanges_if_unused=()):
    """Best-effort removal of what a run declared (durable leftovers)."""
    from kombu import Connection

    try:
        with Connection(uri) as conn:
            for name in queues:
                channel = conn.channel()
                try:
                    channel.queue_delete(name)
                finally:
                    channel.close()
            for name in exchanges:
                channel = conn.channel()
                try:
                    channel.exchange_delete(name)
                finally:
                    channel.close()
            for name in exchanges_if_unused:
                channel = conn.channel()
                try:
                    channel.exchange_delete(name, if_unused=True)
                except Exception:
                    pass  # still in use (406 closes this channel only)
    except Exception as exc:  # pragma: no cover - cleanup only
        logging.getLogger("nameko_peer").warning("cleanup failed: %s", exc)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--uri", default=DEFAULT_URI)
    common.add_argument("--timeout", type=float, default=30.0)
    common.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dispatch", parents=[common])
    p.add_argument("--service", required=True, help="source service name")
    p.add_argument("--event", required=True)
    p.add_argument("--payload", required=True, help="JSON value")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--call-id-stack", default="", help="comma-separated parent call ids")
    p.add_argument("--delete-exchange", action="store_true")
    p.add_argument("--python-types", action="store_true", help="add a datetime, date, time, "
                   "Decimal, UUID and bytes to the payload (an object)")
    p.set_defaults(func=cmd_dispatch)

    p = sub.add_parser("listen", parents=[common])
    p.add_argument("--service", required=True, help="this (listening) service's name")
    p.add_argument("--source", required=True)
    p.add_argument("--event", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--keep-queue", action="store_true")
    p.add_argument(
        "--unreliable", action="store_true", help="reliable_delivery=False (auto-delete queue)"
    )
    p.add_argument("--relay", default="", help="dispatch each payload again as this event")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("rpc-serve", parents=[common])
    p.add_argument("--service", required=True)
    p.add_argument("--count", type=int, default=0, help="exit 0 after N calls")
    p.add_argument("--keep-queue", action="store_true")
    p.set_defaults(func=cmd_rpc_serve)

    p = sub.add_parser("rpc-call", parents=[common])
    p.add_argument("--service", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--args", default="[]")
    p.add_argument("--kwargs", default="{}")
    p.add_argument("--call-id-stack", default="")
    p.add_argument("--result-repr", action="store_true", help="also print repr(result)")
    p.add_argument("--python-types", action="store_true", help="add a datetime, date, time, "
                   "Decimal, UUID and bytes to the keyword arguments")
    p.set_defaults(func=cmd_rpc_call)

    p = sub.add_parser("rpc-call-async", parents=[common])
    p.add_argument("--service", required=True)
    p.add_argument("--calls", required=True, help="JSON [[METHOD, ARGS, KWARGS], ...]")
    p.set_defaults(func=cmd_rpc_call_async)

    p = sub.add_parser("standalone-dispatch", parents=[common])
    p.add_argument("--service", required=True, help="source service name")
    p.add_argument("--event", required=True)
    p.add_argument("--payload", required=True, help="JSON value")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--options", default="{}", help="JSON keyword arguments of event_dispatcher")
    p.set_defaults(func=cmd_standalone_dispatch)

    p = sub.add_parser("shell", parents=[common])
    p.add_argument("--service", required=True, help="the service n.rpc calls")
    p.add_argument("--method", required=True)
    p.add_argument("--args", default="[]")
    p.add_argument("--kwargs", default="{}")
    p.add_argument("--source", required=True, help="the source n.dispatch_event claims")
    p.add_argument("--event", required=True)
    p.add_argument("--payload", required=True, help="JSON value")
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("serve", parents=[common])
    p.add_argument("--service", required=True, help="this service's name")
    p.add_argument("--source", required=True, help="event source service")
    p.add_argument("--event", required=True)
    p.add_argument("--stop-timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_serve)
    return parser


def main():
    args = build_parser().parse_args()
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper(), logging.WARNING),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    state = {"command": args.command}
    start_watchdog(args.timeout, state)
    try:
        code = args.func(args, state)
    except Exception as exc:
        logging.getLogger("nameko_peer").exception("peer failed")
        emit({"failed": {"exc_type": type(exc).__name__, "value": str(exc)}})
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: don't let lingering green threads / kombu pools delay exit
    os._exit(code)


if __name__ == "__main__":
    main()
