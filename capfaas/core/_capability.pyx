# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Morello capabilities, compiled: the hot-path twin of ``_capability_py``.

Every rule follows ``morello-capabilities.md`` and gives the same answers (and the same
``TypeError``/``ValueError`` messages) as the pure-Python twin; both are checked row for row
against the reference vectors. The 128 bits are decoded once, at construction, into C fields
that ``_memory.pyx`` reads directly through ``_capability.pxd``.
"""

cimport cython
from cpython.bool cimport PyBool_Check
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.long cimport PyLong_Check
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from capfaas.core.perms import Perm

cdef extern from "Python.h":
    # Declared here without an exception clause: callers test PyErr_Occurred() themselves.
    unsigned long long _as_u64 "PyLong_AsUnsignedLongLong"(object)
    long long _as_i64_overflow "PyLong_AsLongLongAndOverflow"(object, int *)

cdef extern from "<endian.h>" nogil:
    uint64_t le64toh(uint64_t)
    uint64_t htole64(uint64_t)

cdef extern from * nogil:
    int clzll "__builtin_clzll"(unsigned long long)

cdef enum:
    MAX_EXPONENT_C = 50
    LARGE_EXPONENT = 48          # MAX_EXPONENT - 2: bounds no longer use the value
    ALL_PERMS_C = 0x3FFFF
    OTYPE_MASK = 0x7FFF
    PERM_SHIFT = 46
    OTYPE_SHIFT = 31
    PERM_GLOBAL = 1 << 0
    PERM_UNSEAL = 1 << 10
    PERM_SEAL = 1 << 11
    OTYPE_RB = 1
    OTYPE_LB = 3

cdef uint64_t MASK64_C = 0xFFFFFFFFFFFFFFFF
cdef uint64_t BIT55_C = 1ULL << 55
cdef uint64_t ROOT_PESBT_C = 0xFFFFC00000010005
cdef uint64_t LOW31 = (1ULL << 31) - 1

MAX_EXPONENT = 50
ROOT_PESBT = 0xFFFFC00000010005
MASK64 = (1 << 64) - 1
MASK65 = (1 << 65) - 1
MASK56 = (1 << 56) - 1
BIT55 = 1 << 55
_TWO64_PY = 1 << 64


# -- argument checks (messages as in the twin) ---------------------------------------------------

cdef inline bint _is_int(object value) noexcept:
    return PyLong_Check(value) and not PyBool_Check(value)


cdef uint64_t check_u64(str name, object value) except? 0xFFFFFFFFFFFFFFFF:
    cdef unsigned long long result
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    result = _as_u64(value)
    if result == <unsigned long long>-1 and PyErr_Occurred() != NULL:
        PyErr_Clear()
        raise ValueError(f"{name} must be in [0, 2**64), got {value:#x}")
    return result


cdef int check_length(object length, u128 *out) except -1:
    cdef unsigned long long result
    if not _is_int(length):
        raise TypeError(f"length must be an int, not {type(length).__name__}")
    result = _as_u64(length)
    if result == <unsigned long long>-1 and PyErr_Occurred() != NULL:
        PyErr_Clear()
        if length == _TWO64_PY:
            out[0] = U128_TWO64
            return 0
        raise ValueError(f"length must be in [0, 2**64], got {length:#x}")
    out[0] = <u128>result
    return 0


cdef uint32_t check_perm_mask(object mask) except? 0xFFFFFFFF:
    cdef unsigned long long result
    if not _is_int(mask):
        raise TypeError(f"permission mask must be an int, not {type(mask).__name__}")
    result = _as_u64(mask)
    if result == <unsigned long long>-1 and PyErr_Occurred() != NULL:
        PyErr_Clear()
        result = MASK64_C  # negative or huge: reported below
    if result > ALL_PERMS_C:
        raise ValueError(f"permission mask must fit in 18 bits, got {mask:#x}")
    return <uint32_t>result


cdef Capability check_cap(object value):
    if not isinstance(value, Capability):
        raise TypeError(f"expected a Capability, not {type(value).__name__}")
    return <Capability>value


# -- bit-level rules -----------------------------------------------------------------------------

cdef inline uint64_t sext56(uint64_t value) noexcept nogil:
    """SignExtend(value[55:0]) as an unsigned 64-bit number: the address that bounds use."""
    return <uint64_t>((<int64_t>(value << 8)) >> 8)


cdef inline void decode_bounds(uint64_t pesbt, uint64_t cursor, uint64_t *base_out, u128 *top_out,
                               int *exponent_out, bint *valid_out) noexcept nogil:
    """Bounds of (pesbt, cursor): base (64 bits), top (65 bits), exponent, bounds_valid."""
    cdef uint32_t internal = <uint32_t>(((pesbt >> 30) & 1) ^ 1)
    cdef uint32_t t_field = <uint32_t>((pesbt >> 16) & 0x3FFF)
    cdef uint32_t b_field = <uint32_t>(pesbt & 0xFFFF)
    cdef int e
    cdef uint32_t b, t14, t, carry, a3, b3, t3, r3
    cdef int a_hi, corr_b, corr_t
    cdef uint64_t a, base
    cdef u128 upper, top
    if internal:
        e = <int>((~(((t_field & 7) << 3) | (b_field & 7))) & 0x3F)
        if e > MAX_EXPONENT_C:
            base_out[0] = 0
            top_out[0] = U128_TWO64
            exponent_out[0] = e
            valid_out[0] = e == 63
            return
        b = b_field & 0xFFF8
        t14 = t_field & 0x3FF8
    else:
        e = 0
        b = b_field
        t14 = t_field
    carry = 1 if t14 < (b & 0x3FFF) else 0
    t = ((((b >> 14) + internal + carry) & 3) << 14) | t14
    exponent_out[0] = e
    valid_out[0] = True
    if e >= MAX_EXPONENT_C:
        base_out[0] = <uint64_t>((<u128>b) << e)
        top_out[0] = ((<u128>t) << e) & U128_MASK65
        return
    a = sext56(cursor)
    a3 = <uint32_t>((a >> (e + 13)) & 7)
    b3 = b >> 13
    t3 = t >> 13
    r3 = (b3 - 1) & 7
    a_hi = 1 if a3 < r3 else 0
    corr_b = (1 if b3 < r3 else 0) - a_hi
    corr_t = (1 if t3 < r3 else 0) - a_hi
    upper = (<u128>a) >> (e + 16)
    # Negative corrections wrap modulo 2**128, then everything is cut to 64 / 65 bits.
    base = <uint64_t>((((upper + <u128>(<int64_t>corr_b)) << 16) | <u128>b) << e)
    top = ((((upper + <u128>(<int64_t>corr_t)) << 16) | <u128>t) << e) & U128_MASK65
    if e < MAX_EXPONENT_C - 1 and ((<uint32_t>(top >> 63) - <uint32_t>(base >> 63)) & 3) > 1:
        top = top ^ U128_TWO64
    base_out[0] = base
    top_out[0] = top


cdef inline bint mantissas(uint64_t req_base, u128 req_top, int exponent,
                           uint64_t *b_out, uint64_t *t_out) noexcept nogil:
    """13-bit base and top mantissas at ``exponent`` (base rounded down, top up); returns exact."""
    cdef int shift = exponent + 3
    cdef uint64_t low = (1ULL << shift) - 1
    cdef uint64_t b = (req_base >> shift) & 0x1FFF
    cdef uint64_t t = <uint64_t>((req_top >> shift) & 0x1FFF)
    cdef bint lost_t = (<uint64_t>req_top & low) != 0
    if lost_t:
        t = (t + 1) & 0x1FFF
    b_out[0] = b
    t_out[0] = t
    return not ((req_base & low) != 0 or lost_t)


cdef inline uint64_t bounds_encoding(uint64_t req_base, u128 req_top, u128 length,
                                     bint *exact_out, int *exponent_out) noexcept nogil:
    """CSetBounds' encoding of [req_base, req_top): the low 31 pesbt bits (IE bit included)."""
    cdef uint64_t hi = <uint64_t>(length >> 64)
    cdef uint64_t lo = <uint64_t>length
    cdef int bit_length, e
    cdef uint64_t b, t, e_inv
    cdef bint exact
    if hi != 0:
        bit_length = 65
    elif lo == 0:
        bit_length = 0
    else:
        bit_length = 64 - clzll(lo)
    e = bit_length - 15 if bit_length > 15 else 0
    if e == 0 and ((lo >> 14) & 1) == 0:
        exact_out[0] = True
        exponent_out[0] = 0
        return (1ULL << 30) | ((<uint64_t>req_top & 0x3FFF) << 16) | (req_base & 0xFFFF)
    exact = mantissas(req_base, req_top, e, &b, &t)
    if ((t - b) >> 12) & 1:
        e += 1
        exact = mantissas(req_base, req_top, e, &b, &t)
    e_inv = <uint64_t>(~e & 0x3F)
    exact_out[0] = exact
    exponent_out[0] = e
    return (((((t & 0x7FF) << 3) | (e_inv >> 3)) << 16) | (b << 3) | (e_inv & 7))


cdef inline uint64_t alignment_mask_c(u128 length) noexcept nogil:
    cdef bint exact
    cdef int e
    if length < (1 << 14):
        return MASK64_C
    bounds_encoding(0, length, length, &exact, &e)
    return MASK64_C << (e + 3)


cdef inline object u128_to_int(u128 value):
    cdef uint64_t hi = <uint64_t>(value >> 64)
    cdef uint64_t lo = <uint64_t>value
    if hi == 0:
        return lo
    return ((<object>hi) << 64) | (<object>lo)


# -- module functions ----------------------------------------------------------------------------

def representable_alignment_mask(length):
    """The alignment a base needs so that ``length`` bytes from it are exactly representable."""
    cdef u128 n
    check_length(length, &n)
    return alignment_mask_c(n)


def representable_length(length):
    """``length`` rounded up to what CSetBounds can represent exactly (wraps to 0 past 2**64)."""
    cdef u128 n
    check_length(length, &n)
    cdef uint64_t mask = alignment_mask_c(n)
    return <uint64_t>((n + <u128>(~mask)) & <u128>mask)


# -- the value -----------------------------------------------------------------------------------

cdef Capability make_capability(bint tag, uint64_t pesbt, uint64_t cursor):
    """Build and decode a capability without argument checks (the C-level constructor)."""
    cdef Capability cap = Capability.__new__(Capability)
    cap.tag = tag
    cap.pesbt = pesbt
    cap.cursor = cursor
    decode_bounds(pesbt, cursor, &cap._base, &cap._top, &cap._exponent, &cap._bounds_valid)
    cap._perms = <uint32_t>(pesbt >> PERM_SHIFT)
    cap._otype = <uint32_t>((pesbt >> OTYPE_SHIFT) & OTYPE_MASK)
    cap._ready = True
    return cap


cdef inline Capability _detagged(Capability cap):
    return make_capability(False, cap.pesbt, cap.cursor) if cap.tag else cap


cdef inline Capability _with_otype(Capability cap, bint tag, uint32_t otype):
    return make_capability(
        tag, (cap.pesbt & ~(<uint64_t>OTYPE_MASK << OTYPE_SHIFT)) | (<uint64_t>otype << OTYPE_SHIFT),
        cap.cursor)


cdef inline Capability _clear_permissions(Capability cap, uint32_t mask):
    return make_capability(cap.tag and cap._otype == 0,
                           cap.pesbt & ~(<uint64_t>mask << PERM_SHIFT), cap.cursor)


cdef inline bint _key_in_bounds(Capability cap) noexcept:
    cdef uint64_t address = sext56(cap.cursor)
    return cap._base <= address and <u128>address < cap._top


cdef Capability _set_bounds(Capability self, u128 length, bint exact):
    cdef bint large = self._exponent >= LARGE_EXPONENT
    cdef uint64_t req_base = self.cursor if large else sext56(self.cursor)
    cdef u128 req_top = <u128>req_base + length
    cdef bint is_exact
    cdef int exponent
    cdef uint64_t bits = bounds_encoding(req_base, req_top, length, &is_exact, &exponent)
    cdef uint64_t pesbt = (self.pesbt & ~LOW31) | bits
    cdef uint64_t sign_flags = 0xFF if self.cursor & BIT55_C else 0
    cdef bint tag = (self.tag and self._bounds_valid and self._otype == 0
                     and req_base >= self._base and req_top <= self._top
                     and not (exact and not is_exact)
                     and not (large and exponent < LARGE_EXPONENT
                              and (self.cursor >> 56) != sign_flags))
    return make_capability(tag, pesbt, self.cursor)


cdef inline int _movable(Capability self, uint64_t new_value) noexcept:
    """The checks both moves share: 0 or 1 decides, -1 means 'decide by the specific check'."""
    if not self._bounds_valid:
        return 0
    if self._exponent < LARGE_EXPONENT and ((self.cursor ^ new_value) & BIT55_C):
        return 0
    return -1


cdef bint _fast_representable(Capability self, uint64_t value) noexcept:
    cdef int shared = _movable(self, value)
    cdef int e
    cdef uint64_t a, a_new
    cdef int64_t inc, i_top
    cdef uint32_t i_mid, a_mid, r, diff, diff1
    if shared >= 0:
        return shared
    if self._exponent >= LARGE_EXPONENT:
        return True
    a_new = sext56(value)
    if self._base <= a_new and <u128>a_new < self._top:
        return True
    e = self._exponent
    inc = <int64_t>sext56(value - self.cursor)
    a = sext56(self.cursor)
    i_top = inc >> (e + 16)
    i_mid = <uint32_t>((<uint64_t>inc >> e) & 0xFFFF)
    a_mid = <uint32_t>((a >> e) & 0xFFFF)
    r = <uint32_t>(((((self.pesbt & 0xFFFF) >> 13) - 1) & 7) << 13)
    diff = (r - a_mid) & 0xFFFF
    diff1 = (diff - 1) & 0xFFFF
    return (i_top == 0 and i_mid < diff1) or (i_top == -1 and i_mid >= diff and r != a_mid)


cdef bint _precise_representable(Capability self, uint64_t value) noexcept:
    cdef int shared = _movable(self, value)
    cdef uint64_t base
    cdef u128 top
    cdef int exponent
    cdef bint valid
    if shared >= 0:
        return shared
    decode_bounds(self.pesbt, value, &base, &top, &exponent, &valid)
    return base == self._base and top == self._top


@cython.final
@cython.freelist(64)
cdef class Capability:
    """A 129-bit Morello capability: a tag plus 128 bits, decoded once at construction."""

    def __init__(self, tag, pesbt, cursor):
        cdef uint64_t p, c
        if self._ready:
            raise AttributeError("Capability is immutable: derive a new one")
        p = check_u64("pesbt", pesbt)
        c = check_u64("cursor", cursor)
        self.tag = bool(tag)
        self.pesbt = p
        self.cursor = c
        decode_bounds(p, c, &self._base, &self._top, &self._exponent, &self._bounds_valid)
        self._perms = <uint32_t>(p >> PERM_SHIFT)
        self._otype = <uint32_t>((p >> OTYPE_SHIFT) & OTYPE_MASK)
        self._ready = True

    def __setattr__(self, name, value):
        raise AttributeError("Capability is immutable: derive a new one")

    def __delattr__(self, name):
        raise AttributeError("Capability is immutable: derive a new one")

    # -- construction and encoding ---------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data, tag=False):
        """Decode the 16-byte in-memory form (value first, little-endian)."""
        cdef const char *raw
        cdef uint64_t words[2]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        if len(data) != 16:
            raise ValueError(f"a capability is 16 bytes in memory, got {len(data)}")
        if isinstance(data, memoryview):
            data = bytes(data)
        if isinstance(data, bytes):
            raw = PyBytes_AS_STRING(data)
        else:
            raw = PyByteArray_AS_STRING(data)
        memcpy(words, raw, 16)
        return make_capability(bool(tag), le64toh(words[1]), le64toh(words[0]))

    def to_bytes(self):
        cdef uint64_t words[2]
        words[0] = htole64(self.cursor)
        words[1] = htole64(self.pesbt)
        return PyBytes_FromStringAndSize(<char *>words, 16)

    @classmethod
    def null(cls):
        return make_capability(False, 0, 0)

    @classmethod
    def root(cls):
        """The reset capability: every permission over the whole address space."""
        return make_capability(True, ROOT_PESBT_C, 0)

    # -- fields ----------------------------------------------------------------------------------

    @property
    def value(self):
        return self.cursor

    @property
    def flags(self):
        return self.cursor >> 56

    @property
    def address(self):
        return sext56(self.cursor)

    @property
    def base(self):
        return self._base

    @property
    def top(self):
        return u128_to_int(self._top)

    @property
    def length(self):
        if self._top >= self._base:
            return u128_to_int(self._top - <u128>self._base)
        return u128_to_int(self._top) - self._base  # a malformed encoding: negative, as in the twin

    @property
    def offset(self):
        return sext56(self.cursor) - self._base

    @property
    def perms(self):
        return self._perms

    @property
    def otype(self):
        return self._otype

    @property
    def sealed(self):
        return self._otype != 0

    @property
    def exponent(self):
        return self._exponent

    @property
    def bounds_valid(self):
        return self._bounds_valid

    # -- bounds ----------------------------------------------------------------------------------

    def set_bounds(self, length, bint exact=False):
        """SCBNDS (or SCBNDSE with ``exact``): narrow the bounds to ``length`` bytes from here."""
        cdef u128 n
        check_length(length, &n)
        return _set_bounds(self, n, exact)

    def set_bounds_exact(self, length):
        cdef u128 n
        check_length(length, &n)
        return _set_bounds(self, n, True)

    # -- moving the address ----------------------------------------------------------------------

    def fast_representable(self, value):
        """CapAdd's check for moving to ``value``: cheap, and conservative outside the bounds."""
        return _fast_representable(self, check_u64("value", value))

    def precise_representable(self, value):
        """SCVALUE's check: the bounds decoded around ``value`` must be the current ones."""
        return _precise_representable(self, check_u64("value", value))

    def add(self, increment):
        """CapAdd (ADD/SUB): move the address by ``increment`` with the fast check."""
        cdef int overflow = 0
        cdef long long small
        cdef unsigned long long inc
        if not _is_int(increment):
            raise TypeError(f"increment must be an int, not {type(increment).__name__}")
        small = _as_i64_overflow(increment, &overflow)  # cannot fail for an int
        if overflow == 0:
            inc = <unsigned long long>small
        else:
            wrapped = increment + _TWO64_PY if overflow < 0 else increment
            inc = _as_u64(wrapped)
            if inc == <unsigned long long>-1 and PyErr_Occurred() != NULL:
                PyErr_Clear()
                raise ValueError(f"increment must be in [-2**64, 2**64), got {increment:#x}")
        cdef uint64_t value = self.cursor + <uint64_t>inc
        return make_capability(self.tag and self._otype == 0 and _fast_representable(self, value),
                               self.pesbt, value)

    def set_address(self, value):
        """SCVALUE: set the whole 64-bit value (flags included) with the precise check."""
        cdef uint64_t v = check_u64("value", value)
        return make_capability(self.tag and self._otype == 0 and _precise_representable(self, v),
                               self.pesbt, v)

    # -- permissions -----------------------------------------------------------------------------

    def clear_permissions(self, mask):
        """CLRPERM: clear the permission bits set in ``mask``."""
        return _clear_permissions(self, check_perm_mask(mask))

    def and_permissions(self, mask):
        """Keep only the permission bits set in ``mask``."""
        return _clear_permissions(self, ~check_perm_mask(mask) & ALL_PERMS_C)

    # -- sealing ---------------------------------------------------------------------------------

    def seal(self, key):
        """SEAL with a sealing key: the object type becomes the key's address."""
        cdef Capability k = check_cap(key)
        cdef uint64_t address = sext56(k.cursor)
        cdef bint ok = (self.tag and k.tag and self._otype == 0 and k._otype == 0
                        and (k._perms & PERM_SEAL) != 0 and _key_in_bounds(k) and address <= OTYPE_MASK)
        return _with_otype(self, ok, <uint32_t>(address & OTYPE_MASK))

    def seal_entry(self, otype=OTYPE_RB):
        """SEAL with RB / LPB / LB: make a sentry (object type 1, 2 or 3)."""
        if not _is_int(otype):
            raise TypeError(f"otype must be an int, not {type(otype).__name__}")
        if not OTYPE_RB <= otype <= OTYPE_LB:
            raise ValueError(f"sentry object types are 1 (RB), 2 (LPB) and 3 (LB), got {otype}")
        if not self.tag or self._otype != 0:
            return _detagged(self)
        return _with_otype(self, True, <uint32_t>otype)

    def unseal(self, key):
        """UNSEAL with a key whose address is this capability's object type."""
        cdef Capability k = check_cap(key)
        cdef Capability result
        cdef bint ok = (self.tag and k.tag and self._otype != 0 and k._otype == 0
                        and (k._perms & PERM_UNSEAL) != 0 and _key_in_bounds(k)
                        and sext56(k.cursor) == self._otype)
        if not ok:
            return _detagged(self)
        result = _with_otype(self, True, 0)
        if not (k._perms & PERM_GLOBAL) and (result._perms & PERM_GLOBAL):
            result = make_capability(result.tag, result.pesbt & ~(<uint64_t>PERM_GLOBAL << PERM_SHIFT),
                                     result.cursor)
        return result

    def branch(self):
        """What a branch to this capability installs as PCC: RB sentries unseal, sealed targets detag."""
        if self._otype == OTYPE_RB:
            return _with_otype(self, self.tag, 0)
        return _detagged(self) if self._otype != 0 else self

    def build(self, key):
        """BUILD: re-tag this (data) capability if ``key`` is a valid authority covering it."""
        cdef Capability k = check_cap(key)
        cdef bint ok = (k.tag and k._otype == 0 and self._bounds_valid and k._bounds_valid
                        and k._base <= self._base and self._top <= k._top
                        and (self._perms & ~k._perms) == 0)
        return _with_otype(self, True, 0) if ok else _detagged(self)

    def copy_type(self, key):
        """CPYTYPE: ``key`` with its value set to this capability's object type."""
        cdef Capability k = check_cap(key)
        cdef uint64_t v = self._otype if self._otype != 0 else MASK64_C
        return make_capability(k.tag and k._otype == 0 and _precise_representable(k, v), k.pesbt, v)

    # -- comparison ------------------------------------------------------------------------------

    def is_subset_of(self, other):
        """CHKSS: same tag, valid bounds, and bounds and permissions within ``other``'s."""
        cdef Capability o = check_cap(other)
        return (self.tag == o.tag and self._bounds_valid and o._bounds_valid
                and o._base <= self._base and self._top <= o._top
                and (self._perms & ~o._perms) == 0)

    def __eq__(self, other):
        if not isinstance(other, Capability):
            return NotImplemented
        cdef Capability o = <Capability>other
        return self.tag == o.tag and self.pesbt == o.pesbt and self.cursor == o.cursor

    def __ne__(self, other):
        if not isinstance(other, Capability):
            return NotImplemented
        cdef Capability o = <Capability>other
        return not (self.tag == o.tag and self.pesbt == o.pesbt and self.cursor == o.cursor)

    def __hash__(self):
        return hash((self.tag, self.pesbt, self.cursor))

    def __reduce__(self):
        return (Capability, (self.tag, self.pesbt, self.cursor))

    def __repr__(self):
        perms = "|".join(p.name for p in Perm if self._perms & p) or "none"
        sealed = f" otype={self._otype:#x}" if self._otype != 0 else ""
        valid = "" if self._bounds_valid else " invalid-bounds"
        return (f"<Capability tag={int(self.tag)} address={self.cursor:#x} "
                f"bounds=[{self.base:#x}, {self.top:#x}){valid} perms={perms}{sealed}>")
