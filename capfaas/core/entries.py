"""Call targets: sealed entry capabilities that only the intravisor can unseal.

A function calls another through an entry capability the intravisor minted for it: a capability
to that function's slot in an entry table, sealed with an object type whose unsealing key only
the intravisor holds. A cVM can keep an entry and hand it back, but not read a name out of it,
point it elsewhere (any change to a sealed capability clears its tag), or mint one itself: the
intravisor accepts only the exact entries it issued to that cVM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .capability import Capability
from .faults import SealedFault, TagFault
from .perms import Perm

ENTRY_OTYPE = 4
"""The first object type Morello leaves to software (1-3 are sentries)."""
ENTRY_BASE = 1 << 52
"""Entry slots live in address space no region or shared object uses."""
SLOT = 16
ENTRY_PERMS = int(Perm.LOAD | Perm.EXECUTE | Perm.GLOBAL)


@dataclass
class EntryTable:
    """The intravisor's entries: one slot per function name, minted on first use."""

    slots: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._key = Capability.root().set_address(ENTRY_OTYPE).set_bounds(1).and_permissions(
            Perm.SEAL | Perm.UNSEAL | Perm.GLOBAL)
        self._table = Capability.root().set_address(ENTRY_BASE).set_bounds_exact(1 << 40).and_permissions(ENTRY_PERMS)

    def entry(self, function: str) -> Capability:
        """The sealed entry capability for ``function``."""
        slot = self.index.get(function)
        if slot is None:
            slot = self.index[function] = len(self.slots)
            self.slots.append(function)
        return self._table.set_address(ENTRY_BASE + slot * SLOT).set_bounds_exact(SLOT).seal(self._key)

    def resolve(self, target: Any, issued: set[Capability]) -> str:
        """The function an entry names, if it is one this intravisor issued to the caller
        (``issued``); a forged, altered or unsealed one raises the capability fault."""
        if not isinstance(target, Capability) or not target.tag:
            raise TagFault(target if isinstance(target, Capability) else Capability.null(), 0, 0, "call",
                           "the call target is not a tagged entry capability")
        if target.otype != ENTRY_OTYPE:
            raise SealedFault(target, target.address, 0, "call",
                              f"the call target is sealed with object type {target.otype:#x}, "
                              f"not the entry type {ENTRY_OTYPE:#x} (ask context.entry for one)")
        if target not in issued:
            raise TagFault(target, target.address, 0, "call",
                           "the intravisor never issued this entry capability to this cVM: it was forged")
        unsealed = target.unseal(self._key)
        return self.slots[(unsealed.address - ENTRY_BASE) // SLOT]
