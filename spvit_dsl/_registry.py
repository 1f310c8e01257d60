"""A tiny name → entry registry shared by ops and search strategies.

Users type these names in `.vit` files, so registering a name twice raises, and looking up an unknown name
raises a :class:`KeyError` subclass whose message suggests the closest names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .lang.errors import did_you_mean

T = TypeVar("T")


class UnknownName(KeyError):
    def __init__(self, kind: str, name: str, hint: str) -> None:
        super().__init__(name)
        self.kind, self.name, self.hint = kind, name, hint

    def __str__(self) -> str:
        return f"unknown {self.kind} '{self.name}'"


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        return lambda entry: self.register(name, entry)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(self.kind, name, did_you_mean(name, self._entries)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)
