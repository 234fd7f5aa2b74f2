"""How the registries (fedlearn.privacy, fedlearn.families) name the parts they load late."""

from __future__ import annotations

import importlib
from typing import Any

Ref = str | Any  # "package.module:attribute", or the object itself


def load(ref: Ref) -> Any:
    """The object a ``Ref`` names."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Registry:
    """Named entries (privacy modes, strategy families), in the order they were registered."""

    def __init__(self):
        self._entries: dict[str, Any] = {}

    def register(self, entry):
        """Add (or replace) ``entry``; returns it, so a module can keep it under a name."""
        self._entries[entry.name] = entry
        return entry

    def restore(self, entry):
        """``entry``, registered unless one of its name already is (unpickling in a Ray worker)."""
        return self._entries.setdefault(entry.name, entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> tuple:
        return tuple(self._entries.values())

    def get(self, name: str):
        """The entry called ``name``; a KeyError for an unknown one (config validation names them)."""
        return self._entries[name]

    def find(self, name: str):
        """The entry called ``name``, or None."""
        return self._entries.get(name)
