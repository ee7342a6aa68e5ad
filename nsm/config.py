"""Command lines: flags with ``NSM_*`` environment variable equivalents, and what every ``nsm``
command's ``main`` shares (log flags, the one-line error, exit codes, stopping on a signal).

Every daemon flag ``--some-flag`` can be given as ``NSM_SOME_FLAG`` (containers are configured by
environment). A flag on the command line wins over the environment. List-valued flags take a
comma-separated environment value.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

LOG_LEVELS = ["debug", "info", "warning", "error"]
#: A request or a peer failed.
EXIT_FAILED = 1
#: Bad input: exit status 2, like argparse's.
EXIT_USAGE = 2


class _Extend(argparse.Action):
    """Like ``action="extend"``, except that the first use on the command line replaces the
    default (which may come from the environment) instead of adding to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        seen = f"_{self.dest}_seen"
        current = [] if not getattr(namespace, seen, False) else list(getattr(namespace, self.dest))
        setattr(namespace, seen, True)
        current.extend(values)
        setattr(namespace, self.dest, current)


def env_name(flag: str) -> str:
    return "NSM_" + flag.lstrip("-").replace("-", "_").upper()


def flag(
    parser: argparse.ArgumentParser,
    name: str,
    *,
    help: str,
    default: Any = None,
    type: Callable[[str], Any] = str,
    many: bool = False,
    required: bool = False,
    env: Mapping[str, str] | None = None,
    choices: list[str] | None = None,
    switch: bool = False,
) -> None:
    """Add ``--name`` whose default comes from ``NSM_NAME`` in the environment."""
    environ = os.environ if env is None else env
    var = env_name(name)
    raw = environ.get(var)
    if switch:
        value = default if raw is None else raw.strip().lower() in ("1", "true", "yes", "on")
        parser.add_argument(name, action=argparse.BooleanOptionalAction, default=value,
                            help=f"{help} [env {var}]")
        return
    if raw is not None:
        try:
            value = [type(v.strip()) for v in raw.split(",") if v.strip()] if many else type(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{var}={raw!r}: {exc}")
        default, required = value, False
    kwargs: dict[str, Any] = {"help": f"{help} [env {var}]", "type": type, "default": default}
    if choices:
        kwargs["choices"] = choices
    if many:
        kwargs["action"] = _Extend
        kwargs["nargs"] = "+"
    parser.add_argument(name, required=required, **kwargs)


def duration(text: str) -> float:
    """Parse ``90``, ``90s``, ``1.5m``, ``250ms``, ``1h`` into seconds."""
    t = text.strip().lower()
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if t.endswith(suffix):
            t, factor = t[: -len(suffix)], mult
            break
    else:
        factor = 1.0
    try:
        value = float(t) * factor
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return value


def label(text: str) -> tuple[str, str]:
    """Parse ``key=value``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label must be key=value: {text!r}")
    return key, value


def log_flags(parser: argparse.ArgumentParser, *, level: str = "info") -> None:
    """``--log-level`` (default ``level``) and ``--log-json``."""
    flag(parser, "--log-level", default=level, choices=LOG_LEVELS, help="log level")
    flag(parser, "--log-json", switch=True, default=False, help="log JSON lines")


def fail(prog: str, message: str, status: int = EXIT_FAILED) -> int:
    """The one line a command prints on stderr when it fails, ``<prog>: <message>``; returns
    ``status`` (the exit status)."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return status


class StopSignals:
    """SIGTERM and SIGINT, while entered (``async with StopSignals() as stop:``), set
    :attr:`stopped` instead of killing the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    async def __aenter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self._event.set)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    async def first(self, aw: Awaitable[T]) -> T | None:
        """``aw``'s result, or None when a signal comes first (``aw`` is cancelled then)."""
        task = asyncio.ensure_future(aw)
        waiting = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, waiting):
                t.cancel()
            await asyncio.gather(task, waiting, return_exceptions=True)
        return None if task.cancelled() else task.result()

    async def wait(self, timeout: float | None = None) -> bool:
        """Until a signal (True) or ``timeout`` seconds (False)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        return self.stopped


def run_command(prog: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
                argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with the command's flags and run it; its exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return asyncio.run(run(parser.parse_args(argv)))
