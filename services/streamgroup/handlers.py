"""Loading the user's handler, and the built-in ones."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from streamgroup.errors import ConfigError
from streamgroup.logs import get_logger
from streamgroup.message import Message

Handler = Callable[[Message], Any]


def load_handler(path: str) -> Handler:
    """Import 'package.module:function'; a failure is a configuration error naming the variable."""
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:  # any import-time failure of user code is the same config problem
        raise ConfigError([f"STREAMGROUP_HANDLER: cannot load {path!r}: {type(exc).__name__}: {exc}"]) from exc
    if not callable(target):
        raise ConfigError([f"STREAMGROUP_HANDLER: {path!r} is not callable"])
    return target


def is_async(handler: Handler) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


_log = get_logger("streamgroup.handler")


def log_message(message: Message) -> None:
    """The default handler: logs each message and succeeds."""
    _log.info("message", message_id=message.id, fields=message.fields, deliveries=message.deliveries)


def noop(message: Message) -> None:
    """Does nothing; for benchmarks and smoke tests."""


async def sleep_10ms(message: Message) -> None:
    """Waits 10 ms, as an IO-bound handler would; for benchmarks."""
    await asyncio.sleep(0.01)
