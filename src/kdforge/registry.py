"""A name -> component mapping that recipes can refer to.

Losses, tasks and teacher signals each have one registry; a component joins by
decorating itself, so adding one never means editing an if-chain elsewhere. A
component whose module is heavy to import (a task that loads sentence-transformers,
faiss or scikit-learn) can be registered by name only (:meth:`Registry.lazy`): its module
is imported the first time the name is asked for, so a run (and every ``kdforge``
command) imports only what it uses.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kdforge.errors import RecipeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        #: names whose module registers them when imported, not imported yet
        self._lazy: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            self._lazy.pop(name, None)
            return item

        return decorate

    def lazy(self, name: str, module: str) -> None:
        """``name`` is registered by ``module``, imported the first time the name is asked for."""
        if name in self._items or name in self._lazy:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._lazy[name] = module

    def _load(self, name: str) -> None:
        module = self._lazy.get(name)
        if module is not None:
            importlib.import_module(module)
            if name not in self._items:
                raise RuntimeError(f"{module} did not register {self.kind} {name!r}")

    def _load_all(self) -> None:
        for name in list(self._lazy):
            self._load(name)

    def add(self, name: str, item: T) -> None:
        self.register(name)(item)

    def get(self, name: str, *, field: str | None = None) -> T:
        self._load(name)
        try:
            return self._items[name]
        except KeyError:
            where = f"{field}: " if field else ""
            known = ", ".join(self) or "none"
            raise RecipeError(f"{where}unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*self._items, *self._lazy}))

    def items(self) -> list[tuple[str, T]]:
        self._load_all()
        return sorted(self._items.items())
