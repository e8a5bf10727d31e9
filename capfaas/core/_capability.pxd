# cython: language_level=3
# C-level view of the compiled ``Capability``: other Cython modules ``cimport`` it to read the
# decoded fields directly (see ``capfaas/backends/emulated/_memory.pyx``).

cimport cython
from libc.stdint cimport uint32_t, uint64_t

cdef extern from *:
    """
    typedef unsigned __int128 capfaas_u128;
    #define CAPFAAS_TWO64 (((capfaas_u128)1) << 64)
    #define CAPFAAS_MASK65 ((((capfaas_u128)1) << 65) - 1)
    """
    # Cython has no 128-bit type: declare it under a 64-bit name and never hand it to Python
    # directly (``Capability.top`` converts it explicitly).
    ctypedef unsigned long long u128 "capfaas_u128"
    const u128 U128_TWO64 "CAPFAAS_TWO64"
    const u128 U128_MASK65 "CAPFAAS_MASK65"


@cython.final
cdef class Capability:
    cdef readonly bint tag
    cdef readonly uint64_t pesbt
    cdef readonly uint64_t cursor
    # Decoded once at construction (the value is immutable).
    cdef uint64_t _base
    cdef u128 _top          # 65 bits
    cdef uint32_t _perms    # 18 bits
    cdef uint32_t _otype    # 15 bits
    cdef int _exponent
    cdef bint _bounds_valid
    cdef bint _ready        # set once by make_capability: __init__ cannot re-run


cdef Capability make_capability(bint tag, uint64_t pesbt, uint64_t cursor)
