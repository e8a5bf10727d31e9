"""CAP_Files a deployment declares.

A deployment's ``capFiles`` field is a list of ``{"name", "size", "contents" (base64, optional),
"grants": {function: "r" | "rw"}}``. Each is created, owned by the function, when the function is
activated and does not exist yet (a new version keeps the contents of the last), and deleted
with the function. The spec carries the declarations too (``FunctionSpec.capfiles``), so a backend
that provides CAP_Files its own way (Morello's capfiles) sees them when it starts a cVM.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from capfaas.core.broker import Broker, FileError
from capfaas.core.spec import DeclaredFile, SpecError, declared_files as parse_declared
from capfaas.registry import InvalidInput


def declared_files(value: Any, max_size: int) -> list[DeclaredFile]:
    """The ``capFiles`` of a deployment, checked; InvalidInput says what is wrong."""
    try:
        return list(parse_declared(value, max_size))
    except SpecError as exc:
        raise InvalidInput(str(exc)) from None


def create_declared(broker: Broker, owner: str, declared: Iterable[DeclaredFile]) -> None:
    """Create what is missing and apply the grants; a name another function owns is refused."""
    for entry in declared:
        existing = broker.files.get(entry.name)
        if existing is not None and existing.owner != owner:
            raise InvalidInput(f"CAP_File {entry.name!r} is owned by function {existing.owner!r}")
        if existing is None:
            try:
                broker.create_file(owner, entry.name, entry.size, entry.contents)
            except FileError as exc:
                raise InvalidInput(str(exc)) from None
        for function, write in entry.grants.items():
            broker.grant_file(owner, entry.name, function, write)


def delete_owned(broker: Broker, owner: str) -> None:
    for info in broker.list_files():
        if info.owner == owner:
            broker.delete_file(info.name)
