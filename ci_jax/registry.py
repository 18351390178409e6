"""Named registries: the one place that says what a name (a model, a dataset) means.

The config's choices, `--help` and every 'did you mean' read a registry's names live, so an
entry registered after import (a plug-in, a test) is accepted everywhere a built-in one is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Generic, TypeVar

from ci_jax.errors import unknown_name

T = TypeVar("T")


class Names(Sequence[str]):
    """A read-only, live view of a registry's names, in registration order."""

    def __init__(self, entries: Mapping[str, object]):
        self._entries = entries

    def __getitem__(self, i):  # type: ignore[override]
        return tuple(self._entries)[i]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        # A snapshot: registering while a caller loops over the names must not break its loop.
        return iter(tuple(self._entries))

    def __contains__(self, name: object) -> bool:
        # A config value may be unhashable (a list from YAML): it is simply not a name.
        return isinstance(name, str) and name in self._entries

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # live, so unhashable like a list

    def __repr__(self) -> str:
        return f"Names{tuple(self)!r}"


class Registry(Generic[T]):
    """name -> entry; `what` names the kind of entry in error messages ('model', 'dataset')."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}
        self.names = Names(self._entries)

    def register(self, name: str, entry: T) -> None:
        """Adds `name`; a name registered twice is a programming error, never a silent override."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry

    def unregister(self, name: str) -> None:
        if name not in self._entries:
            raise ValueError(f"{self.what} {name!r} is not registered")
        del self._entries[name]

    def get(self, name: str) -> T:
        """The entry of `name`; UserError 'unknown WHAT ...: did you mean ...?' for any other."""
        if name not in self.names:
            raise unknown_name(self.what, name, self.names)
        return self._entries[name]
