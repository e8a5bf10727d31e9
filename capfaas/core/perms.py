"""Morello's 18 permission bits and the reserved object types, named once for every module."""
from __future__ import annotations

import enum


class Perm(enum.IntFlag):
    """Permission bits as they sit in the 18-bit field (bit 0 = capability bit 110)."""

    GLOBAL = 1 << 0
    EXECUTIVE = 1 << 1
    USER0 = 1 << 2
    USER1 = 1 << 3
    USER2 = 1 << 4
    USER3 = 1 << 5
    MUTABLE_LOAD = 1 << 6
    COMPARTMENT_ID = 1 << 7
    BRANCH_SEALED_PAIR = 1 << 8
    SYSTEM = 1 << 9
    UNSEAL = 1 << 10
    SEAL = 1 << 11
    STORE_LOCAL_CAP = 1 << 12
    STORE_CAP = 1 << 13
    LOAD_CAP = 1 << 14
    EXECUTE = 1 << 15
    STORE = 1 << 16
    LOAD = 1 << 17


ALL_PERMS = 0x3FFFF

OTYPE_UNSEALED = 0
OTYPE_RB = 1
"""Sentry: a branch to it unseals it."""
OTYPE_LPB = 2
"""Load-pair-and-branch sentry."""
OTYPE_LB = 3
"""Load-and-branch sentry."""
OTYPE_MAX = 0x7FFF

DATA_PERMS = Perm.LOAD | Perm.STORE | Perm.LOAD_CAP | Perm.STORE_CAP | Perm.STORE_LOCAL_CAP | Perm.MUTABLE_LOAD | Perm.GLOBAL
"""What Intravisor grants a cVM's DDC."""
CODE_PERMS = Perm.LOAD | Perm.LOAD_CAP | Perm.EXECUTE | Perm.GLOBAL | Perm.BRANCH_SEALED_PAIR | Perm.EXECUTIVE
"""What Intravisor grants a cVM's PCC (no store rights)."""
