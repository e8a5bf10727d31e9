"""Morello capabilities in pure Python: the reference twin of the compiled ``_capability`` module.

Every rule here follows ``morello-capabilities.md`` bit for bit; the Cython module must give the
same answers, and both are checked row for row against the reference vectors.
"""
from __future__ import annotations

from typing import Any

from .perms import ALL_PERMS, OTYPE_LB, OTYPE_RB, OTYPE_UNSEALED, Perm

MASK64 = (1 << 64) - 1
MASK65 = (1 << 65) - 1
MASK56 = (1 << 56) - 1
BIT55 = 1 << 55
MAX_EXPONENT = 50
ROOT_PESBT = 0xFFFFC00000010005
_STORE_RIGHTS = Perm.STORE | Perm.STORE_CAP | Perm.STORE_LOCAL_CAP | Perm.MUTABLE_LOAD


def _check_u64(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= MASK64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value:#x}")
    return value


def _check_length(length: Any) -> int:
    if not isinstance(length, int) or isinstance(length, bool):
        raise TypeError(f"length must be an int, not {type(length).__name__}")
    if not 0 <= length <= 1 << 64:
        raise ValueError(f"length must be in [0, 2**64], got {length:#x}")
    return length


def _sign_extend56(value: int) -> int:
    """SignExtend(value[55:0]) as an unsigned 64-bit number: the address that bounds use."""
    low = value & MASK56
    return low | (0xFF << 56) if low & BIT55 else low


def _decode(pesbt: int, cursor: int) -> tuple[int, int, int, bool]:
    """Bounds of (pesbt, cursor): (base, top, exponent, bounds_valid)."""
    internal = not (pesbt >> 30) & 1
    t_field = (pesbt >> 16) & 0x3FFF
    b_field = pesbt & 0xFFFF
    if internal:
        exponent = (~((t_field & 7) << 3 | (b_field & 7))) & 0x3F
        if exponent > MAX_EXPONENT:
            return 0, 1 << 64, exponent, exponent == 63
        b = b_field & ~7
        t14 = t_field & ~7
    else:
        exponent, b, t14 = 0, b_field, t_field
    carry = 1 if t14 < (b & 0x3FFF) else 0
    t = ((((b >> 14) + internal + carry) & 3) << 14) | t14
    if exponent >= MAX_EXPONENT:
        return (b << exponent) & MASK64, (t << exponent) & MASK65, exponent, True
    a = _sign_extend56(cursor)
    a3 = (a >> (exponent + 13)) & 7
    b3 = b >> 13
    t3 = t >> 13
    r3 = (b3 - 1) & 7
    a_hi = 1 if a3 < r3 else 0
    corr_b = (1 if b3 < r3 else 0) - a_hi
    corr_t = (1 if t3 < r3 else 0) - a_hi
    upper = a >> (exponent + 16)
    base = ((((upper + corr_b) << 16) | b) << exponent) & MASK64
    top = ((((upper + corr_t) << 16) | t) << exponent) & MASK65
    if exponent < MAX_EXPONENT - 1 and (((top >> 63) - (base >> 63)) & 3) > 1:
        top ^= 1 << 64
    return base, top, exponent, True


def _mantissas(req_base: int, req_top: int, exponent: int) -> tuple[int, int, bool]:
    """13-bit base and top mantissas at ``exponent``: base rounded down, top up."""
    shift = exponent + 3
    low = (1 << shift) - 1
    b = (req_base >> shift) & 0x1FFF
    t = (req_top >> shift) & 0x1FFF
    lost_t = req_top & low != 0
    if lost_t:
        t = (t + 1) & 0x1FFF
    return b, t, not (req_base & low or lost_t)


def _bounds_encoding(req_base: int, req_top: int, length: int) -> tuple[int, bool, int]:
    """CSetBounds' encoding of [req_base, req_top): (18 low pesbt bits + IE bit, exact, exponent)."""
    exponent = max(length.bit_length() - 15, 0)
    if exponent == 0 and not (length >> 14) & 1:
        return (1 << 30) | ((req_top & 0x3FFF) << 16) | (req_base & 0xFFFF), True, 0
    b, t, exact = _mantissas(req_base, req_top, exponent)
    if ((t - b) >> 12) & 1:
        exponent += 1
        b, t, exact = _mantissas(req_base, req_top, exponent)
    e_inv = ~exponent & 0x3F
    bits = (((t & 0x7FF) << 3 | e_inv >> 3) << 16) | (b << 3) | (e_inv & 7)
    return bits, exact, exponent


def representable_alignment_mask(length: int) -> int:
    """The alignment a base needs so that ``length`` bytes from it are exactly representable."""
    length = _check_length(length)
    if length < 1 << 14:
        return MASK64
    _, _, exponent = _bounds_encoding(0, length, length)
    return (MASK64 << (exponent + 3)) & MASK64


def representable_length(length: int) -> int:
    """``length`` rounded up to what CSetBounds can represent exactly (wraps to 0 past 2**64)."""
    mask = representable_alignment_mask(length)
    return (length + (~mask & MASK64)) & mask


class Capability:
    """A 129-bit Morello capability: a tag plus 128 bits, decoded once at construction."""

    __slots__ = ("tag", "pesbt", "cursor", "base", "top", "exponent", "bounds_valid")
    tag: bool
    pesbt: int
    cursor: int
    base: int
    top: int
    exponent: int
    bounds_valid: bool

    def __init__(self, tag: bool, pesbt: int, cursor: int) -> None:
        _check_u64("pesbt", pesbt)
        _check_u64("cursor", cursor)
        self._init(bool(tag), pesbt, cursor)

    def _init(self, tag: bool, pesbt: int, cursor: int) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "tag", tag)
        setattr_(self, "pesbt", pesbt)
        setattr_(self, "cursor", cursor)
        base, top, exponent, valid = _decode(pesbt, cursor)
        setattr_(self, "base", base)
        setattr_(self, "top", top)
        setattr_(self, "exponent", exponent)
        setattr_(self, "bounds_valid", valid)

    @classmethod
    def _make(cls, tag: bool, pesbt: int, cursor: int) -> Capability:
        cap = cls.__new__(cls)
        cap._init(tag, pesbt, cursor)
        return cap

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Capability is immutable: derive a new one")

    __delattr__ = __setattr__

    # -- construction and encoding -------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, tag: bool = False) -> Capability:
        """Decode the 16-byte in-memory form (value first, little-endian)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        if len(data) != 16:
            raise ValueError(f"a capability is 16 bytes in memory, got {len(data)}")
        raw = int.from_bytes(data, "little")
        return cls._make(bool(tag), raw >> 64, raw & MASK64)

    def to_bytes(self) -> bytes:
        return ((self.pesbt << 64) | self.cursor).to_bytes(16, "little")

    @classmethod
    def null(cls) -> Capability:
        return cls._make(False, 0, 0)

    @classmethod
    def root(cls) -> Capability:
        """The reset capability: every permission over the whole address space."""
        return cls._make(True, ROOT_PESBT, 0)

    def _with(self, tag: bool, pesbt: int | None = None, cursor: int | None = None) -> Capability:
        return self._make(tag, self.pesbt if pesbt is None else pesbt,
                          self.cursor if cursor is None else cursor)

    def _detagged(self) -> Capability:
        return self._with(False) if self.tag else self

    # -- fields --------------------------------------------------------------------------------

    @property
    def value(self) -> int:
        return self.cursor

    @property
    def flags(self) -> int:
        return self.cursor >> 56

    @property
    def address(self) -> int:
        return _sign_extend56(self.cursor)

    @property
    def length(self) -> int:
        return self.top - self.base

    @property
    def offset(self) -> int:
        return (self.address - self.base) & MASK64

    @property
    def perms(self) -> int:
        return self.pesbt >> 46

    @property
    def otype(self) -> int:
        return (self.pesbt >> 31) & 0x7FFF

    @property
    def sealed(self) -> bool:
        return self.otype != OTYPE_UNSEALED

    # -- bounds --------------------------------------------------------------------------------

    def set_bounds(self, length: int, exact: bool = False) -> Capability:
        """SCBNDS (or SCBNDSE with ``exact``): narrow the bounds to ``length`` bytes from here."""
        length = _check_length(length)
        large = self.exponent >= MAX_EXPONENT - 2
        req_base = self.cursor if large else _sign_extend56(self.cursor)
        req_top = req_base + length
        bits, is_exact, exponent = _bounds_encoding(req_base, req_top, length)
        pesbt = (self.pesbt & ~((1 << 31) - 1)) | bits
        tag = (self.tag and self.bounds_valid and not self.sealed
               and req_base >= self.base and req_top <= self.top
               and not (exact and not is_exact)
               and not (large and exponent < MAX_EXPONENT - 2
                        and self.flags != (0xFF if self.cursor & BIT55 else 0)))
        return self._make(tag, pesbt, self.cursor)

    def set_bounds_exact(self, length: int) -> Capability:
        return self.set_bounds(length, exact=True)

    # -- moving the address --------------------------------------------------------------------

    def _movable(self, new_value: int) -> bool | None:
        """The checks both moves share; None means 'decide by the specific check'."""
        if not self.bounds_valid:
            return False
        if self.exponent < MAX_EXPONENT - 2 and (self.cursor ^ new_value) & BIT55:
            return False
        return None

    def fast_representable(self, value: int) -> bool:
        """CapAdd's check for moving to ``value``: cheap, and conservative outside the bounds."""
        value = _check_u64("value", value)
        shared = self._movable(value)
        if shared is not None:
            return shared
        if self.exponent >= MAX_EXPONENT - 2:
            return True
        if self.base <= _sign_extend56(value) < self.top:
            return True
        e = self.exponent
        inc = _sign_extend56((value - self.cursor) & MASK64)
        if inc & (1 << 63):
            inc -= 1 << 64
        a = _sign_extend56(self.cursor)
        i_top = inc >> (e + 16)
        i_mid = (inc >> e) & 0xFFFF
        a_mid = (a >> e) & 0xFFFF
        r = ((((self.pesbt & 0xFFFF) >> 13) - 1) & 7) << 13
        diff = (r - a_mid) & 0xFFFF
        diff1 = (diff - 1) & 0xFFFF
        return (i_top == 0 and i_mid < diff1) or (i_top == -1 and i_mid >= diff and r != a_mid)

    def precise_representable(self, value: int) -> bool:
        """SCVALUE's check: the bounds decoded around ``value`` must be the current ones."""
        value = _check_u64("value", value)
        shared = self._movable(value)
        if shared is not None:
            return shared
        base, top, _, _ = _decode(self.pesbt, value)
        return base == self.base and top == self.top

    def add(self, increment: int) -> Capability:
        """CapAdd (ADD/SUB): move the address by ``increment`` with the fast check."""
        if not isinstance(increment, int) or isinstance(increment, bool):
            raise TypeError(f"increment must be an int, not {type(increment).__name__}")
        if not -(1 << 64) <= increment <= MASK64:
            raise ValueError(f"increment must be in [-2**64, 2**64), got {increment:#x}")
        value = (self.cursor + increment) & MASK64
        return self._make(self.tag and not self.sealed and self.fast_representable(value),
                          self.pesbt, value)

    def set_address(self, value: int) -> Capability:
        """SCVALUE: set the whole 64-bit value (flags included) with the precise check."""
        value = _check_u64("value", value)
        return self._make(self.tag and not self.sealed and self.precise_representable(value),
                          self.pesbt, value)

    # -- permissions ---------------------------------------------------------------------------

    def clear_permissions(self, mask: int) -> Capability:
        """CLRPERM: clear the permission bits set in ``mask``."""
        mask = _check_perm_mask(mask)
        pesbt = self.pesbt & ~(mask << 46)
        return self._make(self.tag and not self.sealed, pesbt, self.cursor)

    def and_permissions(self, mask: int) -> Capability:
        """Keep only the permission bits set in ``mask``."""
        return self.clear_permissions(~_check_perm_mask(mask) & ALL_PERMS)

    # -- sealing -------------------------------------------------------------------------------

    def _with_otype(self, tag: bool, otype: int) -> Capability:
        return self._make(tag, (self.pesbt & ~(0x7FFF << 31)) | (otype << 31), self.cursor)

    def _key_in_bounds(self) -> bool:
        return self.base <= self.address < self.top

    def seal(self, key: Capability) -> Capability:
        """SEAL with a sealing key: the object type becomes the key's address."""
        key = _check_cap(key)
        otype = key.address & 0x7FFF
        ok = (self.tag and key.tag and not self.sealed and not key.sealed
              and key.perms & Perm.SEAL and key._key_in_bounds() and key.address <= 0x7FFF)
        return self._with_otype(bool(ok), otype)

    def seal_entry(self, otype: int = OTYPE_RB) -> Capability:
        """SEAL with RB / LPB / LB: make a sentry (object type 1, 2 or 3)."""
        if not isinstance(otype, int) or isinstance(otype, bool):
            raise TypeError(f"otype must be an int, not {type(otype).__name__}")
        if not OTYPE_RB <= otype <= OTYPE_LB:
            raise ValueError(f"sentry object types are 1 (RB), 2 (LPB) and 3 (LB), got {otype}")
        if not self.tag or self.sealed:
            return self._detagged()
        return self._with_otype(True, otype)

    def unseal(self, key: Capability) -> Capability:
        """UNSEAL with a key whose address is this capability's object type."""
        key = _check_cap(key)
        ok = (self.tag and key.tag and self.sealed and not key.sealed
              and key.perms & Perm.UNSEAL and key._key_in_bounds() and key.address == self.otype)
        if not ok:
            return self._detagged()
        result = self._with_otype(True, OTYPE_UNSEALED)
        if not key.perms & Perm.GLOBAL and result.perms & Perm.GLOBAL:
            result = result._make(result.tag, result.pesbt & ~(Perm.GLOBAL << 46), result.cursor)
        return result

    def branch(self) -> Capability:
        """What a branch to this capability installs as PCC: RB sentries unseal, sealed targets detag."""
        if self.otype == OTYPE_RB:
            return self._with_otype(self.tag, OTYPE_UNSEALED)
        return self._detagged() if self.sealed else self

    def build(self, key: Capability) -> Capability:
        """BUILD: re-tag this (data) capability if ``key`` is a valid authority covering it."""
        key = _check_cap(key)
        ok = (key.tag and not key.sealed and self.bounds_valid and key.bounds_valid
              and key.base <= self.base and self.top <= key.top
              and self.perms & ~key.perms == 0)
        return self._with_otype(True, OTYPE_UNSEALED) if ok else self._detagged()

    def copy_type(self, key: Capability) -> Capability:
        """CPYTYPE: ``key`` with its value set to this capability's object type."""
        key = _check_cap(key)
        return key.set_address(self.otype if self.sealed else MASK64)

    # -- comparison ----------------------------------------------------------------------------

    def is_subset_of(self, other: Capability) -> bool:
        """CHKSS: same tag, valid bounds, and bounds and permissions within ``other``'s."""
        other = _check_cap(other)
        return (self.tag == other.tag and self.bounds_valid and other.bounds_valid
                and other.base <= self.base and self.top <= other.top
                and self.perms & ~other.perms == 0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Capability):
            return NotImplemented
        return (self.tag, self.pesbt, self.cursor) == (other.tag, other.pesbt, other.cursor)

    def __hash__(self) -> int:
        return hash((self.tag, self.pesbt, self.cursor))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.tag, self.pesbt, self.cursor))

    def __repr__(self) -> str:
        perms = "|".join(p.name for p in Perm if self.perms & p) or "none"
        sealed = f" otype={self.otype:#x}" if self.sealed else ""
        valid = "" if self.bounds_valid else " invalid-bounds"
        return (f"<Capability tag={int(self.tag)} address={self.cursor:#x} "
                f"bounds=[{self.base:#x}, {self.top:#x}){valid} perms={perms}{sealed}>")


def _check_cap(value: Any) -> Capability:
    if not isinstance(value, Capability):
        raise TypeError(f"expected a Capability, not {type(value).__name__}")
    return value


def _check_perm_mask(mask: Any) -> int:
    if not isinstance(mask, int) or isinstance(mask, bool):
        raise TypeError(f"permission mask must be an int, not {type(mask).__name__}")
    if not 0 <= mask <= ALL_PERMS:
        raise ValueError(f"permission mask must fit in 18 bits, got {mask:#x}")
    return int(mask)
