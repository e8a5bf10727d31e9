"""CAP_Files a deployment declares.

A deployment's ``capFiles`` field is a list of ``{"name", "size", "contents" (base64, optional),
"grants": {function: "r" | "rw"}}``. Each is created, owned by the function, when the function is
activated and does not exist yet (a new version keeps the contents of the last), and deleted
with the function.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any


from capfaas.core.broker import Broker, FileError
from capfaas.core.capfiles import check_name
from capfaas.registry import InvalidInput


@dataclass(frozen=True)
class DeclaredFile:
    name: str
    size: int
    contents: bytes
    grants: dict[str, bool]
    """Function name -> whether the grant is read-write."""


def declared_files(value: Any, max_size: int) -> list[DeclaredFile]:
    """The ``capFiles`` of a deployment, checked; InvalidInput says what is wrong."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidInput("'capFiles' must be a list of {\"name\", \"size\", \"contents\", \"grants\"} objects")
    declared: list[DeclaredFile] = []
    for entry in value:
        if not isinstance(entry, dict):
            raise InvalidInput("each of 'capFiles' must be an object")
        try:
            name = check_name(entry.get("name"))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= max_size:
            raise InvalidInput(f"CAP_File {name!r}: 'size' must be 1 to {max_size} bytes, got {size!r}")
        try:
            contents = base64.b64decode(entry.get("contents") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise InvalidInput(f"CAP_File {name!r}: 'contents' is not valid base64") from None
        if len(contents) > size:
            raise InvalidInput(f"CAP_File {name!r}: {len(contents)} bytes of contents exceed its size {size}")
        grants = entry.get("grants") or {}
        if not isinstance(grants, dict) or not all(isinstance(k, str) and v in ("r", "rw") for k, v in grants.items()):
            raise InvalidInput(f"CAP_File {name!r}: 'grants' must map function names to \"r\" or \"rw\"")
        declared.append(DeclaredFile(name, size, contents, {k: v == "rw" for k, v in grants.items()}))
    if len({d.name for d in declared}) != len(declared):
        raise InvalidInput("'capFiles' names a CAP_File twice")
    return declared


def create_declared(broker: Broker, owner: str, declared: list[DeclaredFile]) -> None:
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
