#!/usr/bin/env python
"""Command-line micro-framework 2.1.1 (PyPI) peer for the Rust interop tests.

Every observable thing is printed as one JSON object per line on stdout
(flushed); logs go to stderr. Every sub-command ends by itself: on success
with exit code 0, after ``--timeout`` seconds with exit code 3 and a
``{"timeout": true, ...}`` line.

Sub-commands (see tests/interop/README.md):

  dispatch --service SRC --event EVT --payload JSON [--count N]
           [--delete-exchange]
  listen   --service SVC --source SRC --event EVT --count N [--target handle]
           [--keep-queue]
  ws-call  --url ws://HOST:PORT --calls '[[COMMAND, ARGS, KWARGS], ...]'
  ws-serve --port PORT [--max-workers N]
  backoff-retry   --service SVC --target T --payload JSON --meta JSON
                  --max-retries N --interval MS
  backoff-receive --service SVC --target T --body TEXT --content-type CT
                  --content-encoding CE --max-retries N

``dispatch`` uses the package's own standalone helper
(``get_dependency_standalone_sync(Producer(...))``); like every
micro-framework producer it never declares the exchange, so a listener (which
declares ``{SRC}.events`` topic, durable, auto_delete=true) must exist first,
or the publish fails with 404 NOT_FOUND.

``backoff-retry`` and ``backoff-receive`` need no broker: they run the
package's own ``AsyncBackOff`` (bound to ``Route(T,
entrypoint=EventListener(...), backoff=AsyncBackOff(N, MS))`` of a service SVC)
on one retry. ``backoff-retry`` fails a call of T that got PAYLOAD and
``_meta`` META and lets ``AsyncBackOff.retry`` schedule it: the publish is
captured at kombu's ``Producer._publish`` (below the package's ``dispatch``,
which it reaches unchanged) and printed with the exchange and queue the
package declares. ``backoff-receive`` decodes a body as kombu does for the
package's consumer and hands it to ``AsyncBackOff.call_route``; the route's
``start_route`` is recorded instead of run, and what the call would get is
printed, with the package's ``BackOffData`` and ``can_retry`` on it.

``listen`` runs a real ``Runner`` with one ``Route(handle,
entrypoint=EventListener(SRC, EVT))``. The only additions are observation
hooks on the package's ``ConsumerManager`` (print ``ready`` when it consumes,
count acks so the peer can stop after the N-th event was acked).
"""
import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings

warnings.simplefilter("ignore")

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
    """Exit with code 3 after ``seconds`` (143 on SIGTERM), removing what the run declared."""

    def fire():
        time.sleep(seconds)
        emit({"timeout": True, "after_seconds": seconds, **public(state)})
        cleanup = state.get("_cleanup")
        if cleanup is not None:
            t = threading.Thread(target=cleanup, daemon=True)
            t.start()
            t.join(3)
        sys.stderr.flush()
        os._exit(3)

    threading.Thread(target=fire, name="watchdog", daemon=True).start()

    def terminate(*_):
        emit({"terminated": True, **public(state)})
        cleanup = state.get("_cleanup")
        if cleanup is not None:
            t = threading.Thread(target=cleanup, daemon=True)
            t.start()
            t.join(3)
        sys.stderr.flush()
        os._exit(143)

    # SIGTERM (a test giving up on us): clean up, then exit 143
    signal.signal(signal.SIGTERM, terminate)


def delete_entities(uri, queues=(), exchanges=()):
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
    except Exception as exc:  # pragma: no cover - cleanup only
        logging.getLogger("ufw_peer").warning("cleanup failed: %s", exc)


# --------------------------------------------------------------------------
# dispatch


def cmd_dispatch(args, state):
    from micro_framework import get_dependency_standalone_sync
    from micro_framework.amqp.dependencies import Producer

    payload = json.loads(args.payload)
    dispatch = get_dependency_standalone_sync(
        Producer(service_name=args.service),
        AMQP_URI=args.uri,
        SERVICE_NAME=args.service,
    )
    for i in range(args.count):
        dispatch(args.event, payload)
        emit({"sent": i})
        state["dispatched"] = i + 1
    if args.delete_exchange:
        delete_entities(args.uri, exchanges=["{}.events".format(args.service)])
    emit({"dispatched": args.count})
    return 0


# --------------------------------------------------------------------------
# listen


def cmd_listen(args, state):
    from micro_framework import Route, Runner, RunnerContext
    from micro_framework.amqp.entrypoints import EventListener
    from micro_framework.amqp.manager import ConsumerManager

    acked = threading.Event()
    counts = {"received": 0, "acked": 0}
    queue = "{}.{}__{}.{}".format(args.source, args.event, args.service, args.target)

    managers = []

    class ObservedConsumerManager(ConsumerManager):
        def on_consume_ready(self, connection, channel, consumers, **kwargs):
            super().on_consume_ready(connection, channel, consumers, **kwargs)
            managers.append(self)
            emit(
                {
                    "ready": True,
                    "queue": queue,
                    "exchange": "{}.events".format(args.source),
                }
            )

        async def ack_message(self, message):
            await super().ack_message(message)
            counts["acked"] += 1
            if counts["acked"] >= args.count:
                acked.set()

    class ObservedEventListener(EventListener):
        manager = ObservedConsumerManager()

    def handle(payload):
        counts["received"] += 1
        state["received"] = counts["received"]
        emit({"payload": payload})

    handle.__name__ = args.target  # the target name is part of the queue name

    runner = Runner(
        contexts=[
            RunnerContext(
                [Route(handle, entrypoint=ObservedEventListener(args.source, args.event))],
                worker_mode="thread",
            )
        ],
        config={
            "AMQP_URI": args.uri,
            "SERVICE_NAME": args.service,
            "MAX_WORKERS": 1,
        },
    )
    def cleanup():
        # Stop consuming first: kombu's ConsumerMixin would take the deletion's
        # consumer-cancel as a lost connection and declare the queue again.
        for manager in managers:
            manager.should_stop = True
        # the exchange is auto_delete: it goes with its last bound queue
        delete_entities(args.uri, queues=[queue])

    if not args.keep_queue:
        state["_cleanup"] = cleanup
    loop = asyncio.new_event_loop()

    def run():
        asyncio.set_event_loop(loop)
        runner.start()

    threading.Thread(target=run, name="ufw-runner", daemon=True).start()
    acked.wait()
    try:
        asyncio.run_coroutine_threadsafe(runner._stop(), loop).result(timeout=5)
    except Exception as exc:  # stopping is best effort; the messages are acked
        logging.getLogger("ufw_peer").warning("runner stop: %r", exc)
    if not args.keep_queue:
        state["_cleanup"]()
    emit({"done": True, "received": counts["received"]})
    return 0


# --------------------------------------------------------------------------
# WebSocket RPC


# --------------------------------------------------------------------------
# backoff-retry / backoff-receive


def bound_backoff(args):
    """The package's AsyncBackOff, bound as a Runner binds it, and its route."""
    from micro_framework import Route, Runner, RunnerContext
    from micro_framework.amqp.entrypoints import EventListener
    from micro_framework.retry import AsyncBackOff

    def target(payload):
        return payload

    target.__name__ = args.target
    route = Route(
        target,
        entrypoint=EventListener("backoff_peer_source", "backoff_peer_event"),
        backoff=AsyncBackOff(max_retries=args.max_retries, interval=args.interval),
    )
    context = RunnerContext([route])
    runner = Runner(
        contexts=[context],
        config={"AMQP_URI": args.uri, "SERVICE_NAME": args.service},
    )

    async def bind():
        await context.bind(runner)
        await context.setup()
        return context.routes[0]

    bound = asyncio.run(bind())
    return bound.backoff, bound


def entities(backoff):
    exchange = asyncio.run(backoff.get_exchange())
    queue = asyncio.run(backoff.get_queue())
    return {
        "exchange": {
            "name": exchange.name,
            "type": exchange.type,
            "arguments": exchange.arguments,
            "durable": exchange.durable,
            "auto_delete": exchange.auto_delete,
        },
        "queue": {
            "name": queue.name,
            "routing_key": queue.routing_key,
            "durable": queue.durable,
            "auto_delete": queue.auto_delete,
            "exclusive": queue.exclusive,
            "arguments": queue.queue_arguments,
        },
    }


def cmd_backoff_retry(args, state):
    from kombu.messaging import Producer
    from micro_framework.workers import Worker

    published = []

    def capture(self, body, priority, content_type, content_encoding, headers,
                properties, routing_key, mandatory, immediate, exchange, declare,
                *rest, **kwargs):
        published.append({
            "exchange": exchange,
            "routing_key": routing_key,
            "body": body.decode("utf-8") if isinstance(body, bytes) else body,
            "content_type": content_type,
            "content_encoding": content_encoding,
            "headers": headers,
            "properties": dict(properties, priority=priority),
            "mandatory": mandatory,
        })

    Producer._publish = capture
    backoff, route = bound_backoff(args)
    worker = Worker(
        route.target, [], route.runner.config, json.loads(args.payload),
        _meta=json.loads(args.meta),
    )
    worker.exception = RuntimeError("failed in the peer")

    async def retry():
        can_retry = await backoff.can_retry(worker)
        if can_retry:
            await backoff.retry(worker)
        return can_retry

    can_retry = asyncio.run(retry())
    emit({"can_retry": can_retry, "publish": published[0] if published else None,
          **entities(backoff)})
    return 0


def cmd_backoff_receive(args, state):
    from kombu.serialization import loads
    from micro_framework.retry import BackOffData

    backoff, route = bound_backoff(args)
    calls = []

    async def start_route(entry_id, *fn_args, _meta=None, **fn_kwargs):
        calls.append((fn_args, fn_kwargs, _meta))

    route.start_route = start_route
    payload = loads(args.body.encode("utf-8"), args.content_type, args.content_encoding)

    async def receive():
        await backoff.call_route("entry", payload)
        fn_args, fn_kwargs, meta = calls[0]
        worker = await route.get_worker_instance(*fn_args, _meta=meta, **fn_kwargs)
        data = await BackOffData().get_dependency(worker)
        worker.exception = RuntimeError("failed in the peer")
        return {
            "fn_args": list(fn_args),
            "fn_kwargs": fn_kwargs,
            "_meta": meta,
            "backoff_data": {"retry_count": data.retry_count, "last_retry": data.last_retry},
            "can_retry": await backoff.can_retry(worker),
        }

    emit(asyncio.run(receive()))
    return 0


def patch_websockets_for_python_3_10():
    """Let websockets 8.1 serve on Python >= 3.10 (test-only shim).

    micro-framework 2.1.1 caps ``websockets<9``; 8.1 passes ``loop=`` to
    ``asyncio.Lock``/``sleep``/``wait``/``wait_for`` (removed in 3.10) and
    coroutines to ``asyncio.wait`` (removed in 3.11), so on the venv's Python
    3.11 its server resets every connection ("Lock.__init__() got an
    unexpected keyword argument 'loop'"). The shim drops the argument and wraps
    the coroutines; the package's server, manager and entrypoint code run
    unchanged.
    """
    import asyncio
    import functools

    def without_loop(function):
        @functools.wraps(function)
        def call(*args, loop=None, **kwargs):
            return function(*args, **kwargs)

        return call

    class Lock(asyncio.Lock):
        def __init__(self, *, loop=None):
            super().__init__()

    wait = asyncio.wait

    async def wait_tasks(aws, *args, loop=None, **kwargs):
        return await wait([asyncio.ensure_future(aw) for aw in aws], *args, **kwargs)

    asyncio.Lock = Lock
    asyncio.sleep = without_loop(asyncio.sleep)
    asyncio.wait_for = without_loop(asyncio.wait_for)
    asyncio.wait = wait_tasks


def cmd_ws_call(args, state):
    """Call a WebSocket RPC server the way micro-framework's client would.

    The package's ``WebSocketRPCClient`` cannot make a call in 2.1.1: its
    factories build the abstract ``RPCConnector`` ("Can't instantiate abstract
    class"), and ``RPCClient.make_call`` uses ``WSConnection`` as a context
    manager, which it is not. So this uses the pieces those classes are made
    of: ``WSConnection.send_and_receive`` (websocket-client, one connection per
    call), ``format_rpc_command`` and ``parse_rpc_response``.
    """
    from micro_framework.rpc.formatters import format_rpc_command, parse_rpc_response
    from micro_framework.websocket.connectors import WSConnection

    connection = WSConnection(args.url, args.call_timeout)
    for command, call_args, call_kwargs in json.loads(args.calls):
        reply = connection.send_and_receive(
            format_rpc_command(command, *call_args, **call_kwargs)
        )
        result = parse_rpc_response(reply)
        line = {"command": command, "raw": json.loads(reply)}
        if isinstance(result, Exception):
            line["error"] = {
                "type": type(result).__name__,
                "module": type(result).__module__,
                "str": str(result),
            }
        else:
            line["result"] = result
        emit(line)
    emit({"done": True, "calls": len(json.loads(args.calls))})
    return 0


def cmd_ws_serve(args, state):
    """Serve add(a, b), fail(x), slow(seconds) and quit_peer() with WebSocketEntrypoint.

    Prints ``ready`` once the port accepts connections; a call of ``quit_peer``
    ends the run (exit 0) after its reply went out.
    """
    patch_websockets_for_python_3_10()
    import socket

    from micro_framework import Route, Runner, RunnerContext
    from micro_framework.websocket.entrypoints import WebSocketEntrypoint

    stopped = threading.Event()

    def add(a, b):
        return a + b

    def fail(x):
        raise ValueError("bad {}".format(x))

    def slow(seconds):
        time.sleep(seconds)
        return seconds

    def quit_peer():  # not "stop": a command named like a manager method calls that method
        stopped.set()
        return "stopping"

    routes = [Route(f, entrypoint=WebSocketEntrypoint()) for f in (add, fail, slow, quit_peer)]
    runner = Runner(
        contexts=[RunnerContext(routes, worker_mode="thread", max_workers=args.max_workers)],
        config={
            "WEBSOCKET_IP": "127.0.0.1",
            "WEBSOCKET_PORT": args.port,
            "MAX_WORKERS": args.max_workers,
            "ENABLE_METRICS": False,
        },
    )
    loop = asyncio.new_event_loop()

    def run():
        asyncio.set_event_loop(loop)
        runner.start()

    threading.Thread(target=run, name="ufw-runner", daemon=True).start()
    while True:
        try:
            socket.create_connection(("127.0.0.1", args.port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    emit({"ready": True, "port": args.port})
    stopped.wait()
    time.sleep(0.5)  # let the reply to quit_peer() go out
    emit({"done": True})
    return 0


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
    p.add_argument("--delete-exchange", action="store_true")
    p.set_defaults(func=cmd_dispatch)

    p = sub.add_parser("listen", parents=[common])
    p.add_argument("--service", required=True, help="this (listening) service's name")
    p.add_argument("--source", required=True)
    p.add_argument("--event", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--target", default="handle", help="target function name")
    p.add_argument("--keep-queue", action="store_true")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("ws-call", parents=[common])
    p.add_argument("--url", required=True, help="ws://host:port")
    p.add_argument("--calls", required=True, help="JSON [[command, args, kwargs], ...]")
    p.add_argument("--call-timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_ws_call)

    p = sub.add_parser("ws-serve", parents=[common])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-workers", type=int, default=1)
    p.set_defaults(func=cmd_ws_serve)

    for name, func in (("backoff-retry", cmd_backoff_retry),
                       ("backoff-receive", cmd_backoff_receive)):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("--service", required=True, help="the service's name")
        p.add_argument("--target", required=True, help="the route's target name")
        p.add_argument("--max-retries", type=int, required=True)
        p.add_argument("--interval", type=int, default=1000, help="ms")
        p.set_defaults(func=func)
        if func is cmd_backoff_retry:
            p.add_argument("--payload", required=True, help="JSON: the call's payload")
            p.add_argument("--meta", default="{}", help="JSON: the call's _meta")
        else:
            p.add_argument("--body", required=True, help="the message body, as text")
            p.add_argument("--content-type", default="application/json")
            p.add_argument("--content-encoding", default="utf-8")
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
        logging.getLogger("ufw_peer").exception("peer failed")
        emit({"failed": {"exc_type": type(exc).__name__, "value": str(exc)}})
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
