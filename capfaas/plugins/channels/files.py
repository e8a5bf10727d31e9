"""CAP_Files: named shared files a function creates, grants to others, and deletes (revoking them)."""
from __future__ import annotations

from typing import Any

from capfaas.core.broker import FileError
from capfaas.core.channels import Channel, ChannelRefused
from capfaas.hookspecs import hookimpl


class CapFiles(Channel):
    name = "CAP_Files"
    ops = frozenset({"file"})

    async def serve(self, intravisor: Any, cvm: Any, request: dict[str, Any]) -> dict[str, Any]:
        broker = intravisor.broker
        action = request.get("action")
        function = cvm.spec.name
        try:
            if action == "create":
                obj = broker.create_file(function, request.get("name"), request.get("size"))
                try:
                    return {"grant": broker.grant(cvm, obj, writable=True, transient=False, fresh=True)}
                except BaseException:  # it cannot reach the creator: do not leave it behind
                    broker.delete_file(obj.name)
                    raise
            if action == "open":
                return {"grant": broker.open_file(cvm, request.get("name"), bool(request.get("write")))}
            if action == "grant":
                broker.grant_file(function, request.get("name"), request.get("function"), bool(request.get("write")))
                return {}
            if action == "delete":
                broker.delete_file(request.get("name"), owner=function)
                return {}
            if action == "list":
                return {"files": [info.as_dict() for info in broker.list_files(function)]}
        except FileError as exc:
            raise ChannelRefused(exc.kind, str(exc)) from None
        raise ChannelRefused("ValueError", f"unknown CAP_File action {action!r}")


@hookimpl
def capfaas_channels() -> list[Channel]:
    """CAP_Files: named shared files with grants and revocation."""
    return [CapFiles()]
