"""Command-line flags with ``NSM_*`` environment variable equivalents.

Every daemon flag ``--some-flag`` can be given as ``NSM_SOME_FLAG`` (containers are configured by
environment). A flag on the command line wins over the environment. List-valued flags take a
comma-separated environment value.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from typing import Any


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
