"""A small name -> factory registry shared by mixers, models, datasets, tasks and reproductions.

Lookups are exact (no substring matching); an unknown name raises a ValueError that suggests
up to three close matches.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any, Callable, Iterable


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates that look like ``name`` (difflib ratio), best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.4)


def unknown_name_error(kind: str, name: str, candidates: Iterable[str], listing: str | None = None) -> ValueError:
    """``listing`` says where the valid names are listed (default: ``list_<kind>s()``)."""
    candidates = sorted(candidates)
    matches = close_matches(name, candidates)
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    listing = listing or f"list_{kind.replace(' ', '_')}s()"
    return ValueError(f"unknown {kind} {name!r}.{hint} ({len(candidates)} known; see {listing})")


def check_kwargs(kind: str, given: dict[str, Any], allowed: Iterable[str]) -> None:
    """Raise a TypeError naming the first key of ``given`` that is not in ``allowed``."""
    allowed = sorted(set(allowed))
    for key in given:
        if key not in allowed:
            matches = close_matches(key, allowed)
            hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
            raise TypeError(f"{kind} got an unknown argument {key!r}.{hint} Valid arguments: {', '.join(allowed)}")


def signature_kwargs(fn: Callable) -> list[str] | None:
    """Keyword names ``fn`` accepts, or None when it takes **kwargs (anything goes)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class Registry:
    """Maps names to factories (classes or functions)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str, factory: Callable) -> Callable:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = factory
        return factory

    def get(self, name: str) -> Callable:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_name_error(self.kind, name, self._entries) from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries
