"""The one user-facing config error and the field checks that raise it.

A :class:`ConfigError` message is one line naming the dotted field and what is allowed, e.g.
``data.format: 'tfrecord' is not one of ['wds', 'ffcv']``; entry points print it and exit 2, before any data is
read or a process group exists.
"""
from __future__ import annotations

from typing import Any, Iterable

from pipeline.redaction import redact


class ConfigError(ValueError):
    """A one-line, user-facing configuration error (raised before any data or process group is touched); a URL
    in it is shown with its credentials masked."""

    def __init__(self, message: str):
        super().__init__(redact(message))


ConfigError.__module__ = "pipeline.config"   # its public name, as tracebacks and job logs print it


def check_choice(field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{field}: {value!r} is not one of {allowed}")


def check_positive(field: str, value: float, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        raise ConfigError(f"{field}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_range(field: str, value: float, lo: float, hi: float) -> None:
    if value is None or not (lo <= value <= hi):
        raise ConfigError(f"{field}: {value!r} must be in [{lo}, {hi}]")


def check_multiple(field: str, value: int, of: int) -> None:
    if value is None or value % of != 0:
        raise ConfigError(f"{field}: {value!r} must be a multiple of {of}")
