"""Named registries: every name a recipe may use comes from one of these.

A registry maps a lowercase name to an object (a builder, a config class, a function),
lists itself (optionally by glob), and answers an unknown name with the close matches.

>>> from slimkit.registry import Registry
>>> colors = Registry("color")
>>> @colors.register("red")
... def red():
...     return "#f00"
>>> colors.get("red")()
'#f00'
>>> colors.get("rde")
Traceback (most recent call last):
...
slimkit.exceptions.UnknownNameError: unknown color 'rde'; did you mean 'red'? (known: red)
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from slimkit.exceptions import ConfigError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with close-match suggestions.

    ``lazy_modules`` are imported the first time the registry is read, so that modules
    which register entries (``@REGISTRY.register(...)``) need not be imported eagerly.
    """

    def __init__(self, kind: str, lazy_modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy_modules = lazy_modules
        self._loaded = not lazy_modules
        self._loading = False
        self._lock = threading.RLock()

    def register(self, name: str, obj: T | None = None, *, replace: bool = False) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; used bare as a decorator when ``obj`` is None.

        A second registration of a name is an error unless ``replace`` (a user's rule overriding
        a built-in one on purpose).
        """
        key = name.lower()
        if replace:
            self._load()  # the built-ins first, so that they cannot replace this entry later

        def add(entry: T) -> T:
            if not replace and key in self._entries and self._entries[key] is not entry:
                raise ConfigError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = entry
            return entry

        return add if obj is None else add(obj)

    @contextlib.contextmanager
    def temporarily(self, name: str, obj: T) -> Iterator[T]:
        """``obj`` registered as ``name`` for the ``with`` block only; what was there before comes back after.

        For tests and experiments: a spy in place of a built-in, a deliberately broken entry.
        """
        self._load()  # the built-ins first, so that loading them later cannot overwrite the entry
        key = name.lower()
        missing = object()
        before = self._entries.get(key, missing)
        self._entries[key] = obj
        try:
            yield obj
        finally:
            if before is missing:
                self._entries.pop(key, None)
            else:
                self._entries[key] = before

    def remove(self, name: str) -> None:
        """Take ``name`` out of the registry (no error when it is not there)."""
        self._entries.pop(str(name).lower(), None)

    def _load(self) -> None:
        # Marked loaded only once every module imported: a second thread waits for the first
        # instead of reading a half-filled table; a failed import is raised again on next use.
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:  # loading: a registering module reads its own registry
                return
            self._loading = True
            try:
                for module in self._lazy_modules:
                    importlib.import_module(module)
                self._loaded = True
            finally:
                self._loading = False

    def get(self, name: str) -> T:
        """The entry registered as ``name`` (case-insensitive), or UnknownNameError."""
        self._load()
        key = str(name).lower()
        if key in self._entries:
            return self._entries[key]
        raise UnknownNameError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        close = difflib.get_close_matches(str(name).lower(), known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known)})"

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a glob pattern, sorted."""
        self._load()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern.lower()))

    def __contains__(self, name: object) -> bool:
        self._load()
        return str(name).lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)
