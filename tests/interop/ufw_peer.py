#!/usr/bin/env python
"""Command-line micro-framework 2.1.1 (PyPI) peer for the Rust interop tests.

Every observable thing is printed as one JSON object per line on stdout
(flushed); logs go to stderr. Every sub-command ends by itself: on success
with exit code 0, after ``--timeout`` seconds with exit code 3 and a
``{"timeout": true, ...}`` line.

Sub-commands (see tests/interop/README.md):

  dispatch --service SRC --event EVT --payload JSON [--count N]
           [--delete-exchange] [--python-types]
  listen   --service SVC --source SRC --event EVT --count N [--target handle]
           [--keep-queue]
  ws-call  --url ws://HOST:PORT --calls '[[COMMAND, ARGS, KWARGS], ...]'
  ws-serve --port PORT [--max-workers N]
  rpc-serve --service SVC [--count N] [--max-workers N] [--keep-queue]
  rpc-call  --service SVC --target T [--args JSON] [--kwargs JSON]
            [--repeat N] [--call-timeout S]
  rpc-list  --service SVC [--call-timeout S]
  rpc-client --service SVC [--calls '[[T, ARGS, KWARGS], ...]'] [--discover]
             [--get-target T] [--send '[T, ARGS, KWARGS]'] [--call-timeout S]
  serve     --service SVC --source SRC --event EVT [--max-workers N]
            [--stop-timeout S]
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

``rpc-serve`` runs a real ``Runner`` with ``Route(f, entrypoint=RPCListener())``
per target; ``rpc-call``/``rpc-list`` call through the package's own AMQP RPC
client (``standalone.Client``'s ``RPCSystemProxyProvider``); ``rpc-client`` through the
proxies its users call (``RPCService``, ``RPCTarget.call_async``). ``serve`` is a
long-running instance (event handler + RPC) for zero-downtime migration
tests: SIGTERM stops it the package's own way and keeps its queues.
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


def hard_exit(code):
    """``os._exit``, after ending this process's multiprocessing children.

    micro-framework's ``RPCReplyListener`` forks a ``multiprocessing.Manager``
    server; ``os._exit`` skips its shutdown, and the orphan would keep our
    stdout open (a reader waiting for EOF would hang).
    """
    try:
        import multiprocessing

        for child in multiprocessing.active_children():
            child.kill()
    except Exception:
        pass
    os._exit(code)


def start_watchdog(seconds, state):
    """Exit with code 3 after ``seconds`` (143 on SIGTERM), removing what the run declared."""

    def fire():
        time.sleep(seconds)
        # commands for which --timeout is a normal end set a grace period
        # for their own stop; the watchdog stays the backstop
        grace = state.get("_grace")
        if grace:
            time.sleep(grace)
        emit({"timeout": True, "after_seconds": seconds, **public(state)})
        cleanup = state.get("_cleanup")
        if cleanup is not None:
            t = threading.Thread(target=cleanup, daemon=True)
            t.start()
            t.join(3)
        sys.stderr.flush()
        hard_exit(3)

    threading.Thread(target=fire, name="watchdog", daemon=True).start()

    def terminate(*_):
        emit({"terminated": True, **public(state)})
        cleanup = state.get("_cleanup")
        if cleanup is not None:
            t = threading.Thread(target=cleanup, daemon=True)
            t.start()
            t.join(3)
        sys.stderr.flush()
        hard_exit(143)

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
    from micro_framework import get_dependency_standalone_sync
    from micro_framework.amqp.dependencies import Producer

    payload = json.loads(args.payload)
    if args.python_types:
        payload = with_python_types(payload)
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
        try:
            reply = connection.send_and_receive(
                format_rpc_command(command, *call_args, **call_kwargs)
            )
        except Exception as exc:  # no reply: the handshake refused (a 403), the server gone
            emit({"command": command, "error": _exception_fields(exc), "raised": True})
            continue
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


# --------------------------------------------------------------------------
# AMQP RPC


RPC_TARGETS = ("add", "echo", "fail", "slow")


def _rpc_targets():
    """The functions rpc-serve exposes (their ``__name__`` is the target id)."""

    def add(a, b):
        return a + b

    def echo(x):
        return x

    def fail(x):
        raise ValueError("bad {}".format(x))

    def slow(seconds):
        time.sleep(seconds)
        return seconds

    return [add, echo, fail, slow]


def _observed_rpc_listener(on_ready, on_request, on_answered):
    """``RPCListener`` whose (context-singleton) ``AMQPRPCManager`` reports
    when it consumes, each request as decoded (before the target runs) and
    each request answered and acked. Nothing else is changed."""
    from micro_framework.amqp.entrypoints import RPCListener
    from micro_framework.amqp.manager import AMQPRPCManager

    class ObservedAMQPRPCManager(AMQPRPCManager):
        consumer_stopped = threading.Event()

        def run(self, *args, **kwargs):  # kombu ConsumerMixin.run, in a thread
            try:
                return super().run(*args, **kwargs)
            finally:
                self.consumer_stopped.set()

        def on_consume_ready(self, connection, channel, consumers, **kwargs):
            super().on_consume_ready(connection, channel, consumers, **kwargs)
            on_ready(self)

        async def consume_message(self, client, message):
            # client: the kombu Message; message: its decoded body (a body
            # without "command" makes the package raise and requeue it, forever)
            if isinstance(message, dict) and "command" in message:
                on_request(message, client)
            return await super().consume_message(client, message)

        async def ack_message(self, message):
            await super().ack_message(message)
            on_answered(message)

    class ObservedRPCListener(RPCListener):
        manager = ObservedAMQPRPCManager()

    return ObservedRPCListener


def _is_target_call(message):
    """A request on a target queue (not ``{service}._broadcast.*``)."""
    return "._broadcast." not in message.delivery_info.get("routing_key", "")


def stop_consuming(managers, timeout=2.5):
    """Stop kombu ConsumerMixin managers and wait for their consume loops to
    end (they check ``should_stop`` every second). Deleting a queue under a
    running consumer cancels it, which kombu takes for a lost connection: it
    reconnects and declares the queue again."""
    for manager in managers:
        manager.should_stop = True
    deadline = time.monotonic() + timeout
    for manager in managers:
        manager.consumer_stopped.wait(max(deadline - time.monotonic(), 0))


def _start_runner(runner):
    """Run ``runner.start()`` (its own event loop) in a daemon thread."""
    loop = asyncio.new_event_loop()

    def run():
        asyncio.set_event_loop(loop)
        try:
            runner.start()
        except Exception as exc:  # pragma: no cover - reported, not raised
            logging.getLogger("ufw_peer").exception("runner failed")
            emit({"failed": {"exc_type": type(exc).__name__, "value": str(exc)}})

    threading.Thread(target=run, name="ufw-runner", daemon=True).start()
    return loop


def _stop_runner(runner, loop, timeout=10):
    """The package's own stop path (what ``Runner.start`` runs on
    KeyboardInterrupt): ``Runner._stop()`` on the runner's loop. False if it
    did not end within ``timeout`` seconds."""
    import concurrent.futures

    try:
        asyncio.run_coroutine_threadsafe(runner._stop(), loop).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return False
    except Exception as exc:  # best effort
        logging.getLogger("ufw_peer").warning("runner stop: %r", exc)
    return True


def cmd_rpc_serve(args, state):
    """Serve add(a, b), echo(x), fail(x), slow(seconds) with ``RPCListener``."""
    from micro_framework import Route, Runner, RunnerContext
    from micro_framework.amqp.amqp_elements import rpc_queue_name

    queues = [rpc_queue_name(args.service, t) for t in RPC_TARGETS]
    queues.append("rpc-{}-broadcast".format(args.service))
    done = threading.Event()
    ready = threading.Event()
    lock = threading.Lock()
    counts = {"calls": 0}
    managers = []

    def on_ready(manager):
        managers.append(manager)
        if not ready.is_set():
            ready.set()
            emit({"ready": True, "queues": queues, "exchange": "ufw-rpc"})

    def on_answered(message):
        if not _is_target_call(message):
            return  # __list_targets__ / __get_target__: not a target call
        with lock:
            counts["calls"] += 1
            state["calls"] = counts["calls"]
            if args.count and counts["calls"] >= args.count:
                done.set()

    def on_request(body, message):
        if _is_target_call(message):
            emit(
                {
                    "call": body.get("command"),
                    "args": body.get("command_args"),
                    "kwargs": body.get("command_kwargs"),
                }
            )

    listener = _observed_rpc_listener(on_ready, on_request, on_answered)
    routes = [Route(f, entrypoint=listener()) for f in _rpc_targets()]
    runner = Runner(
        contexts=[RunnerContext(routes, worker_mode="thread", max_workers=args.max_workers)],
        config={
            "AMQP_URI": args.uri,
            "SERVICE_NAME": args.service,
            "MAX_WORKERS": args.max_workers,
        },
    )

    def cleanup():
        stop_consuming(managers)
        delete_entities(args.uri, queues=queues)

    if not args.keep_queue:
        state["_cleanup"] = cleanup
    loop = _start_runner(runner)
    if args.count:
        done.wait()
    else:
        # no --count: serve until --timeout, which then is the normal end
        # (exit 0, like nameko_peer.py rpc-serve); SIGTERM still exits 143
        state["_grace"] = 15
        time.sleep(max(args.timeout - 2, 0.5))
    _stop_runner(runner, loop)
    if not args.keep_queue:
        cleanup()
    emit({"done": True, "calls": counts["calls"]})
    return 0


def _exception_fields(exc):
    """``{"type", "module", "str"}`` (+ ``exc_type``/``value`` of an RPCException)."""
    fields = {
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "str": str(exc),
    }
    for attr in ("exc_type", "value"):
        if hasattr(exc, attr):
            fields[attr] = getattr(exc, attr)
    return fields


class _RpcClient:
    """micro-framework's own AMQP RPC client, as ``standalone.ufw_client``
    builds it: a ``Runner`` whose only route is ``standalone.Client`` (the
    ``RPCSystemProxyProvider`` dependency, i.e. an ``RPCReplyListener`` on
    ``ufw-reply-{uuid4}`` plus ``AMQPRPCConnector``/``RPCProducer``).

    Not the ``ufw_client`` context manager itself: an exception inside it
    skips its shutdown (the "code stuck when exceptions are raised" known
    issue), and its ``RPCReplyListener`` forks a ``multiprocessing.Manager``
    server that outlives an ``os._exit`` holding our stdout; with the runner
    at hand the peer shuts both down on every exit path.
    """

    def __init__(self, uri, service_name):
        from micro_framework.amqp.rpc import RPCReplyListener
        from micro_framework.standalone import _get_client, _get_runner, start_loop

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=start_loop, args=(self.loop,), name="ufw-client", daemon=True
        )
        self.thread.start()
        self.runner = _get_runner({"AMQP_URI": uri, "SERVICE_NAME": service_name})
        self.worker = asyncio.run_coroutine_threadsafe(
            _get_client(self.runner), self.loop
        ).result(timeout=30)
        if self.worker.exception:
            raise self.worker.exception
        self.client = self.worker.result  # standalone.Client: .amqp_rpc, .dispatch
        self.reply_listener = next(
            ext
            for ext in self.runner.singletons.values()
            if isinstance(ext, RPCReplyListener)
        )
        self.reply_queue = self.reply_listener._reply_queue.name
        self._closed = False

    def rpc_client(self, service):
        """The ``RPCClient`` an ``RPCService``/``RPCTarget`` proxy calls through."""
        return getattr(self.client.amqp_rpc, service)._client

    def close(self):
        """The package's shutdown (stops the runner; ``RPCReplyListener.stop``
        deletes the reply queue and shuts the Manager down)."""
        from micro_framework.standalone import _shutdown

        if self._closed:
            return
        self._closed = True
        # let reply_sender finish its iteration before the Manager goes away
        # (RPCReplyListener.stop shuts it down right after running = False)
        self.reply_listener.running = False
        time.sleep(0.05)
        _shutdown(self.loop, self.runner, self.thread, self.worker)

    def abort(self):
        """Cleanup for an interrupted run (timeout, SIGTERM)."""
        if self._closed:
            return
        self._closed = True
        # stop consuming first (ConsumerMixin notices within 1 s), or kombu
        # declares the deleted reply queue again; the Manager process is left
        # to hard_exit (shutting it down here would fail the pending call)
        self.reply_listener.manager.should_stop = True
        time.sleep(1.1)
        delete_entities(self.runner.config["AMQP_URI"], queues=[self.reply_queue])


def _rpc_call(rpc_client, command, call_args, call_kwargs, timeout):
    """``RPCClient.make_call`` with the reply timeout it does not pass on.

    ``RPCClient.make_call`` is ``with connector.get_connection() as c:
    parse_rpc_response(c.send_and_receive(message))``; ``RPCProducer.
    send_and_receive`` takes ``timeout`` (raises ``TimeoutError``), but
    ``make_call`` never passes one (a call nobody answers waits forever), and
    ``RPCTarget.__call__`` runs ``make_call`` in a thread whose exception
    (e.g. ``RPCTargetDoesNotExist`` on an unroutable request) is lost, leaving
    ``future.result()`` waiting forever.
    """
    from micro_framework.rpc.formatters import format_rpc_command, parse_rpc_response

    message = format_rpc_command(command, *call_args, **call_kwargs)
    line = {}
    try:
        with rpc_client.connector.get_connection() as connection:
            reply = connection.send_and_receive(message, timeout=timeout)
    except Exception as exc:  # raised by the client, no reply
        line["error"] = _exception_fields(exc)
        line["raised"] = True
        return line
    line["raw"] = json.loads(reply)
    result = parse_rpc_response(reply)
    if isinstance(result, Exception):
        line["error"] = _exception_fields(result)
    else:
        line["result"] = result
    return line


def _with_rpc_client(args, state, body):
    client = _RpcClient(args.uri, args.caller)
    state["_cleanup"] = client.abort
    emit({"reply_queue": client.reply_queue})
    try:
        code = body(client)
    finally:
        state.pop("_cleanup", None)
        client.close()
    return code


def cmd_rpc_call(args, state):
    call_args = json.loads(args.args)
    call_kwargs = json.loads(args.kwargs)

    def body(client):
        rpc_client = client.rpc_client(args.service)
        for i in range(args.repeat):
            emit(_rpc_call(rpc_client, args.target, call_args, call_kwargs, args.call_timeout))
            state["calls"] = i + 1
        emit({"done": True, "calls": args.repeat})
        return 0

    return _with_rpc_client(args, state, body)


def cmd_rpc_list(args, state):
    def body(client):
        line = _rpc_call(
            client.rpc_client(args.service), "__list_targets__", [], {}, args.call_timeout
        )
        if "result" in line:
            line["targets"] = line.pop("result")
        emit(line)
        return 0

    return _with_rpc_client(args, state, body)


def _future_line(future, timeout):
    """``{"result"}`` or ``{"error"}`` of a call's ``Future`` (the package's async API sets the
    rebuilt exception on it); ``{"error", "raised": true}`` if it is not done in time."""
    import concurrent.futures

    try:
        return {"result": future.result(timeout=timeout)}
    except concurrent.futures.TimeoutError as exc:
        return {"error": _exception_fields(exc), "raised": True}
    except Exception as exc:
        return {"error": _exception_fields(exc)}


def cmd_rpc_client(args, state):
    """The package's caller API as its users call it, in this order:
    ``RPCService.discover_targets()``, ``RPCClient.get_target_async``,
    ``RPCTarget.call_async`` for every call at once (futures read in reverse order) and
    ``call_target(..., _wait_response=False)``."""
    calls = json.loads(args.calls)

    def body(client):
        service = getattr(client.client.amqp_rpc, args.service)
        if args.discover:
            service.discover_targets()  # __list_targets__, one RPCTarget per target
            emit({"discovered": sorted(target.target_id for target in service.targets)})
        if args.get_target:
            detail = _future_line(
                service._client.get_target_async(args.get_target), args.call_timeout
            )
            emit({"get_target": args.get_target, **detail})
        futures = [
            getattr(service, target).call_async(*call_args, **call_kwargs)
            for target, call_args, call_kwargs in calls
        ]
        emit({"sent": len(futures)})
        for index in reversed(range(len(futures))):
            line = {"index": index, "target": calls[index][0]}
            line.update(_future_line(futures[index], args.call_timeout))
            emit(line)
            state["read"] = len(futures) - index
        if args.send:
            target, call_args, call_kwargs = json.loads(args.send)
            service._client.call_target(target, *call_args, _wait_response=False, **call_kwargs)
            emit({"sent_without_reply": target})
        emit({"done": True, "calls": len(futures)})
        return 0

    return _with_rpc_client(args, state, body)


# --------------------------------------------------------------------------
# serve: a long-running service instance (zero-downtime migration tests)


def _maybe_sleep(payload):
    """An event payload (or echo argument) ``{"sleep": S, ...}`` makes the
    handler (or echo) sleep S seconds first, to have a message in flight when
    the peer is stopped."""
    if isinstance(payload, dict) and isinstance(payload.get("sleep"), (int, float)):
        time.sleep(payload["sleep"])


def cmd_serve(args, state):
    """Event handler ``handle`` + RPC targets ``echo(x)``, ``add(a, b)`` in one
    Runner; on SIGTERM (or --timeout) the Runner is stopped the way the package
    stops it itself (``Runner.start`` runs ``Runner._stop()`` on
    KeyboardInterrupt; it installs no SIGTERM handler), the queues are kept."""
    from micro_framework import Route, Runner, RunnerContext
    from micro_framework.amqp.amqp_elements import rpc_queue_name
    from micro_framework.amqp.entrypoints import EventListener
    from micro_framework.amqp.manager import ConsumerManager

    stop = threading.Event()
    lock = threading.Lock()
    counts = {"events": 0, "calls": 0, "acked": 0}
    event_queue = "{}.{}__{}.handle".format(args.source, args.event, args.service)
    rpc_queues = [rpc_queue_name(args.service, t) for t in ("echo", "add")]
    rpc_queues.append("rpc-{}-broadcast".format(args.service))
    ready = {"event": False, "rpc": False, "sent": False}
    managers = []

    def on_ready(kind, manager):
        with lock:
            if manager not in managers:
                managers.append(manager)
            ready[kind] = True
            if ready["event"] and ready["rpc"] and not ready["sent"]:
                ready["sent"] = True
                emit({"ready": True, "queues": [event_queue] + rpc_queues})

    class ObservedConsumerManager(ConsumerManager):
        consumer_stopped = threading.Event()

        def run(self, *a, **kw):
            try:
                return super().run(*a, **kw)
            finally:
                self.consumer_stopped.set()

        def on_consume_ready(self, connection, channel, consumers, **kwargs):
            super().on_consume_ready(connection, channel, consumers, **kwargs)
            on_ready("event", self)

        async def ack_message(self, message):
            await super().ack_message(message)
            with lock:
                counts["acked"] += 1

    class ObservedEventListener(EventListener):
        manager = ObservedConsumerManager()

    def on_request(body, message):
        if _is_target_call(message):
            with lock:
                counts["calls"] += 1
                state["calls"] = counts["calls"]
            emit(
                {
                    "rpc": body.get("command"),
                    "args": body.get("command_args"),
                    "kwargs": body.get("command_kwargs"),
                }
            )

    rpc_listener = _observed_rpc_listener(
        lambda manager: on_ready("rpc", manager), on_request, lambda message: None
    )

    def handle(payload):
        _maybe_sleep(payload)
        with lock:
            counts["events"] += 1
            state["events"] = counts["events"]
        if isinstance(payload, dict) and payload.get("raise"):
            emit({"event": payload, "raised": True})
            raise ValueError("raise requested")
        emit({"event": payload})  # after the handler ran, before the ack

    def echo(x):
        _maybe_sleep(x)
        return x

    def add(a, b):
        return a + b

    routes = [
        Route(handle, entrypoint=ObservedEventListener(args.source, args.event)),
        Route(echo, entrypoint=rpc_listener()),
        Route(add, entrypoint=rpc_listener()),
    ]
    runner = Runner(
        contexts=[RunnerContext(routes, worker_mode="thread", max_workers=args.max_workers)],
        config={
            "AMQP_URI": args.uri,
            "SERVICE_NAME": args.service,
            "MAX_WORKERS": args.max_workers,
        },
    )
    # SIGTERM / --timeout: stop gracefully, keep the queues, exit 0
    reason = {}

    def request_stop(why):
        reason.setdefault("by", why)
        stop.set()

    signal.signal(signal.SIGTERM, lambda *_: request_stop("SIGTERM"))
    state["_grace"] = args.stop_timeout + 5  # the watchdog is only the backstop
    loop = _start_runner(runner)
    if not stop.wait(args.timeout):
        request_stop("timeout")
    if not _stop_runner(runner, loop, timeout=args.stop_timeout):
        emit(
            {
                "timeout": True,
                "stage": "stop",
                "after_seconds": args.stop_timeout,
                **public(state),
            }
        )
        sys.stdout.flush()
        hard_exit(3)
    # the consume loops close their connections: unacked messages go back
    stop_consuming(managers)
    emit(
        {
            "stopped": True,
            "by": reason["by"],
            "events": counts["events"],
            "calls": counts["calls"],
            "acked_events": counts["acked"],
        }
    )
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
    p.add_argument("--python-types", action="store_true", help="add a datetime, date, time, "
                   "Decimal, UUID and bytes to the payload (an object)")
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

    p = sub.add_parser("rpc-serve", parents=[common])
    p.add_argument("--service", required=True)
    p.add_argument("--count", type=int, default=0, help="exit 0 after N answered target calls")
    p.add_argument("--max-workers", type=int, default=1)
    p.add_argument("--keep-queue", action="store_true")
    p.set_defaults(func=cmd_rpc_serve)

    p = sub.add_parser("rpc-call", parents=[common])
    p.add_argument("--service", required=True, help="the called service")
    p.add_argument("--target", required=True)
    p.add_argument("--args", default="[]", help="JSON list")
    p.add_argument("--kwargs", default="{}", help="JSON object")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--call-timeout", type=float, default=10.0)
    p.add_argument("--caller", default="ufw-peer-caller", help="SERVICE_NAME of the caller")
    p.set_defaults(func=cmd_rpc_call)

    p = sub.add_parser("rpc-list", parents=[common])
    p.add_argument("--service", required=True)
    p.add_argument("--call-timeout", type=float, default=10.0)
    p.add_argument("--caller", default="ufw-peer-caller", help="SERVICE_NAME of the caller")
    p.set_defaults(func=cmd_rpc_list)

    p = sub.add_parser("rpc-client", parents=[common])
    p.add_argument("--service", required=True, help="the called service")
    p.add_argument("--calls", default="[]", help="JSON [[TARGET, ARGS, KWARGS], ...]")
    p.add_argument("--discover", action="store_true", help="discover_targets() first")
    p.add_argument("--get-target", default="", help="get_target_async(T) before the calls")
    p.add_argument("--send", default="", help="JSON [TARGET, ARGS, KWARGS]: call_target "
                   "with _wait_response=False, last")
    p.add_argument("--call-timeout", type=float, default=10.0)
    p.add_argument("--caller", default="ufw-peer-caller", help="SERVICE_NAME of the caller")
    p.set_defaults(func=cmd_rpc_client)

    p = sub.add_parser("serve", parents=[common])
    p.add_argument("--service", required=True, help="this service's name")
    p.add_argument("--source", required=True, help="event source service")
    p.add_argument("--event", required=True)
    p.add_argument("--max-workers", type=int, default=1)
    p.add_argument("--stop-timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_serve)

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
    hard_exit(code)


if __name__ == "__main__":
    main()
