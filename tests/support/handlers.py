"""Handlers the tests plug into the real services (STREAMGROUP_HANDLER=support.handlers:NAME).

They record every call in the same Redis, so a test can account for each message id:
  calls:<id>         how many times the handler ran for the entry
  done:<id>          how many times it succeeded
  done-by            list of "<consumer> <id> <deliveries>" per success
Behaviour knobs come from TESTHANDLER_* variables (not STREAMGROUP_*, which must all be known).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time

import redis

from streamgroup import Message, PoisonMessage

# TESTHANDLER_REDIS_URL lets the record keeping bypass what the test does to the services' own
# connection (a proxy that goes silent, say).
_client = redis.Redis.from_url(os.environ.get("TESTHANDLER_REDIS_URL") or os.environ["STREAMGROUP_REDIS_URL"])
_consumer = os.environ.get("STREAMGROUP_CONSUMER_NAME", "?")
_sleep = float(os.environ.get("TESTHANDLER_SLEEP_S", "0"))
_fail_mod = int(os.environ.get("TESTHANDLER_FAIL_MOD", "0"))


def _called(message: Message) -> int:
    return _client.incr(f"calls:{message.id}")


def _succeeded(message: Message) -> None:
    with _client.pipeline(transaction=False) as pipe:
        pipe.incr(f"done:{message.id}")
        pipe.rpush("done-by", f"{_consumer} {message.id} {message.deliveries}")
        pipe.execute()


def record(message: Message) -> None:
    _called(message)
    if _sleep:
        time.sleep(_sleep)
    _succeeded(message)


def fail_first_delivery(message: Message) -> None:
    """Fails the first call for every message; later calls succeed."""
    if _called(message) == 1:
        raise RuntimeError(f"first delivery of {message.id} fails on purpose")
    _succeeded(message)


def fail_some(message: Message) -> None:
    """Always fails messages whose serial is a multiple of TESTHANDLER_FAIL_MOD."""
    _called(message)
    if _fail_mod and int(message.fields["serial"]) % _fail_mod == 0:
        raise RuntimeError(f"serial {message.fields['serial']} always fails")
    _succeeded(message)


def poison_some(message: Message) -> None:
    """Declares messages whose serial is a multiple of TESTHANDLER_FAIL_MOD poison."""
    _called(message)
    if _fail_mod and int(message.fields["serial"]) % _fail_mod == 0:
        raise PoisonMessage("cannot ever handle this")
    _succeeded(message)


async def record_async(message: Message) -> None:
    record(message)


def record_fields(message: Message) -> None:
    """Keeps the fields exactly as the handler saw them; a field named 'poison' makes it poison."""
    _called(message)
    if "poison" in message.fields:
        raise PoisonMessage("asked to be poison")
    _client.set(f"fields:{message.id}", json.dumps(message.fields))
    _succeeded(message)


def record_held(message: Message) -> None:
    """Like record, and also notes how many entries this consumer holds (its pending count) right now."""
    consumers = _client.xinfo_consumers(message.stream, os.environ.get("STREAMGROUP_GROUP", "messageGroup"))
    held = next(c["pending"] for c in consumers if c["name"] == _consumer.encode())
    _client.rpush("held", held)
    record(message)


# Handlers returning an awaitable without being recognisable as `async def`: the entry may only be
# acknowledged after the awaitable really ran (it records the success, after a real suspension).
async def _record_later(message: Message) -> None:
    _called(message)
    await asyncio.sleep(0.01)
    _succeeded(message)


def _plain_decorator(function):
    @functools.wraps(function)
    def wrapper(message: Message):
        return function(message)

    return wrapper


decorated_async = _plain_decorator(_record_later)
lambda_async = lambda message: _record_later(message)  # noqa: E731 - the shape under test


class _CallReturnsAwaitable:
    def __call__(self, message: Message):
        return _record_later(message)


callable_async = _CallReturnsAwaitable()


# A handler raising a BaseException (chosen by TESTHANDLER_RAISE) for serials that are multiples
# of TESTHANDLER_FAIL_MOD; the others succeed.
_RAISE = {
    "SystemExit": lambda: SystemExit(3),
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "CancelledError": asyncio.CancelledError,
}


def _chosen(message: Message) -> bool:
    return bool(_fail_mod) and int(message.fields["serial"]) % _fail_mod == 0


def raise_base_exception(message: Message) -> None:
    _called(message)
    if _chosen(message):
        raise _RAISE[os.environ["TESTHANDLER_RAISE"]]()
    _succeeded(message)


async def raise_base_exception_async(message: Message) -> None:
    raise_base_exception(message)


def raise_base_exception_deferred(message: Message):
    """A sync call returning a coroutine that raises the BaseException once awaited."""
    return raise_base_exception_async(message)


def hang_some(message: Message) -> None:
    """Hangs (a sync call that never returns) on chosen serials."""
    _called(message)
    if _chosen(message):
        threading.Event().wait()
    _succeeded(message)


async def hang_some_async(message: Message) -> None:
    _called(message)
    if _chosen(message):
        await asyncio.Event().wait()
    _succeeded(message)


def hang_some_deferred(message: Message):
    """A sync call returning a coroutine that hangs on chosen serials."""
    return hang_some_async(message)


# --- The stateful test's handlers (tests/test_stateful.py) -----------------------------------------
# Each message says what its handler call must do in its `op` field; every call and every success is
# appended to a file of this process in TESTHANDLER_LEDGER_DIR (os.write on an O_APPEND descriptor:
# in the kernel before the handler returns, so it survives SIGKILL and os._exit of the process, and
# it does not depend on the server under test, which the test makes fail).
#   ok       succeed
#   raise    raise RuntimeError (a failure: retried up to MAX_DELIVERIES, then dead-lettered)
#   poison   raise PoisonMessage (dead-lettered at once)
#   base     raise a BaseException: SystemExit or KeyboardInterrupt (sync), CancelledError or SystemExit (async)
#   hang     never return (past STREAMGROUP_HANDLER_TIMEOUT_MS)
#   exit     os._exit(EXIT_BY_HANDLER): the message kills the process, as a segfault would
# A `delay_ms` field makes the call take that long first.
# Three flavours of the same handler: plain function, `async def`, and `async def` behind an
# ordinary decorator (functools.wraps), which is still async although inspect does not say so.

EXIT_BY_HANDLER = 86
_ledger_fd: int | None = None


def _ledger(line: str) -> None:
    global _ledger_fd
    if _ledger_fd is None:
        directory = os.environ["TESTHANDLER_LEDGER_DIR"]
        path = os.path.join(directory, f"{_consumer}-{os.getpid()}.ledger")
        _ledger_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_ledger_fd, f"{line}\n".encode())


def _begin(message: Message) -> str:
    op = message.fields.get("op", "ok")
    _ledger(f"call {message.id} {message.deliveries} {_consumer} {op}")
    return op


def _delay(message: Message) -> float:
    """`delay_ms`: how long the call takes before doing what `op` says."""
    return int(message.fields.get("delay_ms", "0")) / 1000


def _done(message: Message) -> None:
    _ledger(f"ok {message.id} {message.deliveries} {_consumer}")


def _odd(message: Message) -> bool:
    return int(message.fields.get("key", "0")[-1:], 16) % 2 == 1


def stateful(message: Message) -> None:
    op = _begin(message)
    time.sleep(_delay(message))
    if op == "raise":
        raise RuntimeError(f"{message.id} is told to fail")
    if op == "poison":
        raise PoisonMessage(f"{message.id} is told to be poison")
    if op == "base":
        raise KeyboardInterrupt() if _odd(message) else SystemExit(3)
    if op == "hang":
        time.sleep(3600)
    if op == "exit":
        os._exit(EXIT_BY_HANDLER)
    _done(message)


async def stateful_async(message: Message) -> None:
    op = _begin(message)
    await asyncio.sleep(_delay(message))  # a real coroutine: it only runs when awaited
    if op == "raise":
        raise RuntimeError(f"{message.id} is told to fail")
    if op == "poison":
        raise PoisonMessage(f"{message.id} is told to be poison")
    if op == "base":
        raise asyncio.CancelledError() if _odd(message) else SystemExit(3)
    if op == "hang":
        await asyncio.sleep(3600)
    if op == "exit":
        os._exit(EXIT_BY_HANDLER)
    _done(message)


def _traced(handler):
    """An ordinary decorator, as tracing or retry libraries write them."""

    @functools.wraps(handler)
    def wrapper(message: Message):
        return handler(message)

    return wrapper


stateful_decorated_async = _traced(stateful_async)


def record_sharded(message: Message) -> None:
    """Records "<consumer> <stream> <id> <producer> <serial>" per success in `done-sharded` (ids
    alone are not unique across shards); serials that are a multiple of TESTHANDLER_FAIL_MOD are poison."""
    if _fail_mod and int(message.fields["serial"]) % _fail_mod == 0:
        raise PoisonMessage("cannot ever handle this")
    fields = message.fields
    _client.rpush("done-sharded", f"{_consumer} {message.stream} {message.id} {fields['producer']} {fields['serial']}")
