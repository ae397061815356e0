"""Loading the user's handler, and the built-in ones."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
from collections.abc import Callable
from types import FrameType
from typing import Any

from streamgroup.errors import ConfigError
from streamgroup.logs import get_logger
from streamgroup.message import Message

Handler = Callable[[Message], Any]


def load_handler(path: str) -> Handler:
    """Import 'package.module:function'; a failure is a configuration error naming the variable,
    and for an import nested in the user's code, which module failed to import which."""
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:  # any import-time failure of user code is the same config problem
        raise ConfigError([f"STREAMGROUP_HANDLER: cannot load {path!r}: {_load_failure(module_name, exc)}"]) from exc
    if not callable(target):
        raise ConfigError([f"STREAMGROUP_HANDLER: {path!r} is not callable"])
    return target


def _load_failure(module_name: str, exc: Exception) -> str:
    """What went wrong, said from the user's side: the handler module itself is missing, or one of
    its modules failed (on a missing import, or by raising) at a file and line."""
    culprit = _innermost_user_frame(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name is not None:
        if culprit is None or module_name == exc.name or module_name.startswith(exc.name + "."):
            return f"no module named {exc.name!r} (is the handler's package installed or on PYTHONPATH?)"
        return f"{culprit.f_globals.get('__name__', '?')} imports missing module {exc.name!r}"
    where = ""
    if culprit is not None:
        where = f" in {culprit.f_globals.get('__name__', '?')} ({culprit.f_code.co_filename}:{culprit.f_lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def _innermost_user_frame(exc: BaseException) -> FrameType | None:
    """The innermost frame of the traceback that is not importlib's machinery or this module."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith(("<frozen", _IMPORTLIB_DIR)) and filename != __file__:
            found = tb.tb_frame
        tb = tb.tb_next
    return found


_IMPORTLIB_DIR = os.path.dirname(importlib.__file__)


def is_async(handler: Handler) -> bool:
    """Whether the handler is an `async def` (or an object with one as `__call__`): such handlers
    are called on the event loop. A handler not recognised here that returns an awaitable anyway
    still has it awaited (see processing.HandlerRunner); this only decides where calls start."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


_log = get_logger("streamgroup.handler")


def log_message(message: Message) -> None:
    """The default handler: logs each message's id (its fields only at DEBUG: message bodies may
    hold personal data, and do not belong in logs at INFO) and succeeds."""
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("message", message_id=message.id, fields=message.fields, deliveries=message.deliveries)
    else:
        _log.info("message", message_id=message.id, deliveries=message.deliveries)


def noop(message: Message) -> None:
    """Does nothing; for benchmarks and smoke tests."""


async def sleep_10ms(message: Message) -> None:
    """Waits 10 ms, as an IO-bound handler would; for benchmarks."""
    await asyncio.sleep(0.01)
