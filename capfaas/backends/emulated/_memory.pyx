# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Emulated Morello memory, compiled: the hot-path twin of ``_memory_py``.

One sparse memfd holds the segment's data followed by its tag bitmap (one bit per 16-byte
granule), mapped shared, so every process given the fd sees the same bytes and the same tags.
Every access is checked through a capability whose decoded fields are read as C fields
(``cimport``ed from ``capfaas.core._capability``): one combined check on the fast path, and the
shared ``diagnose_access`` only when it fails.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove, memset

from capfaas.core._capability cimport Capability, make_capability, u128

import mmap
import os

from capfaas.backends.emulated.layout import DEFAULT_SEGMENT_BASE, GRANULE, check_segment, tag_bytes_for
from capfaas.core.faults import AlignmentFault, UnmappedFault, diagnose_access

cdef extern from "<endian.h>" nogil:
    uint64_t le64toh(uint64_t)
    uint64_t htole64(uint64_t)

cdef extern from "Python.h":
    bint PyLong_CheckExact(object)
    bint PyBytes_CheckExact(object)
    bint PyByteArray_CheckExact(object)

cdef enum:
    GRANULE_C = 16
    PERM_GLOBAL = 1 << 0
    PERM_MUTABLE_LOAD = 1 << 6
    PERM_STORE_LOCAL_CAP = 1 << 12
    PERM_STORE_CAP = 1 << 13
    PERM_LOAD_CAP = 1 << 14
    PERM_STORE = 1 << 16
    PERM_LOAD = 1 << 17
    LOSES_WITHOUT_MUTABLE_LOAD = PERM_STORE | PERM_STORE_CAP | PERM_STORE_LOCAL_CAP | PERM_MUTABLE_LOAD
    PERM_SHIFT = 46

cdef str ACCESS_LOAD = "load"
cdef str ACCESS_STORE = "store"
cdef str ACCESS_LOAD_CAP = "load capability"
cdef str ACCESS_STORE_CAP = "store capability"


cdef inline bint fast_u64(object value, uint64_t *out) noexcept:
    """Convert an exact int in [0, 2**64); False (and no error) for anything the slow path must judge."""
    cdef uint64_t result
    if not PyLong_CheckExact(value):
        return False
    try:
        result = value
    except OverflowError:
        return False
    out[0] = result
    return True


def _check_int(str name, value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


@cython.final
cdef class TaggedMemory:
    """The shared segment: data bytes plus one tag bit per granule, reached only through capabilities."""

    cdef readonly object fd
    cdef readonly object size
    cdef readonly object base
    cdef uint64_t _size
    cdef uint64_t _base
    cdef object _data_map
    cdef object _tag_map
    cdef object _view             # memoryview of the data mapping: view() slices it
    cdef Py_buffer _data_buffer
    cdef Py_buffer _tag_buffer
    cdef bint _has_data_buffer
    cdef bint _has_tag_buffer
    cdef unsigned char *_data     # NULL once closed
    cdef unsigned char *_tags
    cdef object __weakref__

    def __init__(self, size, *, base=DEFAULT_SEGMENT_BASE, fd=None, offset=0, segment_size=None):
        if self._view is not None:
            raise RuntimeError("TaggedMemory is already initialised")
        segment_size = size if segment_size is None else segment_size
        check_segment(size, base, offset, segment_size)
        self.size = size
        self.base = base
        self._size = size
        self._base = base
        needed = segment_size + tag_bytes_for(segment_size)
        if fd is None:
            if offset or segment_size != size:
                raise ValueError("a window (offset, segment_size) needs the fd of an existing segment")
            fd = os.memfd_create("capfaas-segment", os.MFD_CLOEXEC)
            os.ftruncate(fd, needed)
        elif os.fstat(fd).st_size < needed:
            raise ValueError(f"fd {fd} holds {os.fstat(fd).st_size} bytes; a {segment_size}-byte segment needs {needed}")
        self.fd = fd
        protection = mmap.PROT_READ | mmap.PROT_WRITE
        self._data_map = mmap.mmap(fd, size, mmap.MAP_SHARED, protection, offset=offset)
        self._tag_map = mmap.mmap(fd, tag_bytes_for(size), mmap.MAP_SHARED, protection,
                                  offset=segment_size + offset // (GRANULE * 8))
        self._acquire_buffers()

    cdef int _acquire_buffers(self) except -1:
        """Take the raw pointers of both mappings (held until close)."""
        self._view = memoryview(self._data_map)
        PyObject_GetBuffer(self._data_map, &self._data_buffer, PyBUF_WRITABLE)
        self._has_data_buffer = True
        PyObject_GetBuffer(self._tag_map, &self._tag_buffer, PyBUF_WRITABLE)
        self._has_tag_buffer = True
        self._data = <unsigned char *>self._data_buffer.buf
        self._tags = <unsigned char *>self._tag_buffer.buf
        return 0

    cdef void _release_buffers(self) noexcept:
        self._data = NULL
        self._tags = NULL
        if self._has_data_buffer:
            PyBuffer_Release(&self._data_buffer)
            self._has_data_buffer = False
        if self._has_tag_buffer:
            PyBuffer_Release(&self._tag_buffer)
            self._has_tag_buffer = False

    def __dealloc__(self):
        self._release_buffers()

    def close(self):
        """Unmap the segment and close its fd; idempotent.

        While a ``view()`` is still alive the data cannot be unmapped: ``BufferError`` is raised
        and the segment stays open and usable (release the views, then close again).
        """
        if self._view is not None:
            self._release_buffers()
            self._view.release()
            self._view = None
            try:
                self._data_map.close()
            except BufferError:
                self._acquire_buffers()
                raise
            self._tag_map.close()  # only ever exported to this object
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def root_capability(self):
        """A capability with every permission over exactly this segment."""
        cap = Capability.root().set_address(self.base).set_bounds_exact(self.size)
        if not cap.tag:
            raise ValueError(f"a {self.size:#x}-byte segment at {self.base:#x} is not exactly representable")
        return cap

    # -- checks ----------------------------------------------------------------------------------

    cdef inline int64_t _access(self, object cap, object address, bint fixed, object size_obj,
                                uint64_t size, uint32_t required, str access) except -1:
        """Check one access the hardware's way and return its offset into the segment.

        With ``fixed`` the size is the C ``size``; otherwise it is the Python argument ``size_obj``.
        The fast path is one combined test on C fields; anything else goes to ``_slow_access``.
        """
        cdef uint64_t a
        cdef Capability c
        if (type(cap) is Capability and fast_u64(address, &a)
                and (fixed or fast_u64(size_obj, &size))):
            c = <Capability>cap
            if (c.tag and c._otype == 0 and (c._perms & required) == required
                    and a >= c._base and <u128>a + size <= c._top
                    and a >= self._base and <u128>(a - self._base) + size <= self._size
                    and self._data != NULL):
                return <int64_t>(a - self._base)
        if fixed:
            size_obj = size
        return self._slow_access(cap, address, size_obj, required, access)

    cdef int64_t _slow_access(self, object cap, object address, object size, uint32_t required,
                              str access) except -1:
        """The full check, on Python ints: raises the fault the twin raises, in the same order."""
        cdef Capability c
        if not isinstance(cap, Capability):
            raise TypeError(f"expected a Capability, not {type(cap).__name__}")
        _check_int("address", address)
        _check_int("size", size)
        c = <Capability>cap
        if not (c.tag and c._otype == 0 and (c._perms & required) == required
                and c.base <= address and address + size <= c.top):
            raise diagnose_access(cap, address, size, required, access)
        offset = address - self.base
        if offset < 0 or offset + size > self.size:
            raise UnmappedFault(cap, address, size, access,
                                f"the segment is [{self.base:#x}, {self.base + self.size:#x})")
        self._check_open()
        return offset

    cdef inline int _check_open(self) except -1:
        if self._data == NULL:
            raise ValueError("I/O operation on a closed TaggedMemory")
        return 0

    cdef inline void _clear_tags(self, uint64_t offset, uint64_t size) noexcept nogil:
        """Clear the tag of every granule that [offset, offset + size) touches."""
        cdef uint64_t first, last, first_byte, last_byte
        cdef uint8_t mask
        cdef unsigned char *tags = self._tags
        if size == 0:
            return
        first = offset >> 4
        last = (offset + size - 1) >> 4
        first_byte = first >> 3
        last_byte = last >> 3
        if first_byte == last_byte:
            mask = <uint8_t>((((1 << (last - first + 1)) - 1) << (first & 7)) & 0xFF)
            if tags[first_byte] & mask:  # leave untouched tag pages unallocated
                tags[first_byte] &= ~mask
            return
        mask = <uint8_t>((0xFF << (first & 7)) & 0xFF)
        if tags[first_byte] & mask:
            tags[first_byte] &= ~mask
        mask = <uint8_t>((2 << (last & 7)) - 1)
        if tags[last_byte] & mask:
            tags[last_byte] &= ~mask
        if last_byte > first_byte + 1:
            memset(tags + first_byte + 1, 0, last_byte - first_byte - 1)

    cdef inline int _aligned(self, object cap, object address, str access) except -1:
        if address % GRANULE_C:
            raise AlignmentFault(cap, address, GRANULE_C, access,
                                 "capabilities live on 16-byte aligned granules")
        return 0

    # -- data ------------------------------------------------------------------------------------

    def load(self, cap, address, size):
        cdef uint64_t n = 0
        cdef int64_t offset = self._access(cap, address, False, size, 0, PERM_LOAD, ACCESS_LOAD)
        if not fast_u64(size, &n):
            n = <uint64_t>int(size)  # an int subclass the slow path accepted
        return PyBytes_FromStringAndSize(<char *>(self._data + offset), <Py_ssize_t>n)

    def load_u64(self, cap, address):
        cdef uint64_t word
        cdef int64_t offset = self._access(cap, address, True, None, 8, PERM_LOAD, ACCESS_LOAD)
        memcpy(&word, self._data + offset, 8)
        return le64toh(word)

    def store(self, cap, address, data):
        cdef Py_buffer buffer
        cdef int64_t offset
        cdef uint64_t n
        if PyBytes_CheckExact(data):
            n = <uint64_t>PyBytes_GET_SIZE(data)
            offset = self._access(cap, address, True, None, n, PERM_STORE, ACCESS_STORE)
            memmove(self._data + offset, PyBytes_AS_STRING(data), n)
        elif PyByteArray_CheckExact(data):
            n = <uint64_t>PyByteArray_GET_SIZE(data)
            offset = self._access(cap, address, True, None, n, PERM_STORE, ACCESS_STORE)
            memmove(self._data + offset, PyByteArray_AS_STRING(data), n)
        else:
            data = memoryview(data).cast("B")
            PyObject_GetBuffer(data, &buffer, PyBUF_SIMPLE)
            try:
                n = <uint64_t>buffer.len
                offset = self._access(cap, address, True, None, n, PERM_STORE, ACCESS_STORE)
                memmove(self._data + offset, buffer.buf, n)
            finally:
                PyBuffer_Release(&buffer)
        self._clear_tags(<uint64_t>offset, n)

    def store_u64(self, cap, address, value):
        cdef uint64_t word
        cdef int64_t offset
        if not fast_u64(value, &word):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"value must be an int, not {type(value).__name__}")
            if not 0 <= value < 1 << 64:
                raise ValueError(f"value must be in [0, 2**64), got {value:#x}")
            word = value
        offset = self._access(cap, address, True, None, 8, PERM_STORE, ACCESS_STORE)
        word = htole64(word)
        memcpy(self._data + offset, &word, 8)
        self._clear_tags(<uint64_t>offset, 8)

    def copy(self, dst, dst_address, src, src_address, size):
        """memmove through two capabilities; the destination's tags are cleared."""
        cdef uint64_t n = 0
        cdef int64_t src_offset = self._access(src, src_address, False, size, 0, PERM_LOAD, ACCESS_LOAD)
        cdef int64_t dst_offset = self._access(dst, dst_address, False, size, 0, PERM_STORE, ACCESS_STORE)
        if not fast_u64(size, &n):
            n = <uint64_t>int(size)  # an int subclass the slow path accepted
        # The GIL stays held: another thread's close() must not unmap under the memmove.
        memmove(self._data + dst_offset, self._data + src_offset, n)
        self._clear_tags(<uint64_t>dst_offset, n)

    def view(self, cap, address, size):
        """A read-only, zero-copy window on ``size`` bytes, checked once."""
        cdef uint64_t n = 0
        cdef int64_t offset = self._access(cap, address, False, size, 0, PERM_LOAD, ACCESS_LOAD)
        if not fast_u64(size, &n):
            n = <uint64_t>int(size)  # an int subclass the slow path accepted
        return self._view[offset:offset + <int64_t>n].toreadonly()

    def writable_view(self, cap, address, size):
        """A writable, zero-copy window, checked once for Load and Store; its tags are cleared now,
        as any data store would, so bytes written through it can never pass for a capability."""
        cdef uint64_t n = 0
        cdef int64_t offset = self._access(cap, address, False, size, 0, PERM_LOAD | PERM_STORE,
                                           ACCESS_STORE)
        if not fast_u64(size, &n):
            n = <uint64_t>int(size)  # an int subclass the slow path accepted
        self._clear_tags(<uint64_t>offset, n)
        return self._view[offset:offset + <int64_t>n]

    # -- capabilities ----------------------------------------------------------------------------

    cdef inline bint _tag_bit(self, uint64_t offset) noexcept nogil:
        cdef uint64_t granule = offset >> 4
        return (self._tags[granule >> 3] >> (granule & 7)) & 1

    def tag_at(self, address):
        """The tag of the granule holding ``address`` (inspection only, no authority needed)."""
        cdef uint64_t a
        if fast_u64(address, &a) and a >= self._base and a - self._base < self._size and self._data != NULL:
            return self._tag_bit(a - self._base)
        offset = _check_int("address", address) - self.base
        if not 0 <= offset < self.size:
            raise ValueError(f"address {address:#x} is outside the segment")
        self._check_open()
        return self._tag_bit(<uint64_t>offset)

    def load_capability(self, auth, address):
        cdef int64_t offset = self._access(auth, address, True, None, GRANULE_C, PERM_LOAD, ACCESS_LOAD_CAP)
        cdef Capability a = <Capability>auth
        cdef uint64_t words[2]
        cdef uint64_t cursor, pesbt
        cdef bint tag
        if offset & (GRANULE_C - 1):  # the segment base is page-aligned: same as the address
            self._aligned(auth, address, ACCESS_LOAD_CAP)
        tag = self._tag_bit(<uint64_t>offset) and (a._perms & PERM_LOAD_CAP) != 0
        memcpy(words, self._data + offset, 16)
        cursor = le64toh(words[0])
        pesbt = le64toh(words[1])
        if tag and ((pesbt >> 31) & 0x7FFF) == 0 and not (a._perms & PERM_MUTABLE_LOAD):
            pesbt &= ~(<uint64_t>LOSES_WITHOUT_MUTABLE_LOAD << PERM_SHIFT)
        return make_capability(tag, pesbt, cursor)

    def store_capability(self, auth, address, cap):
        cdef Capability c
        cdef uint32_t required = PERM_STORE
        cdef int64_t offset
        cdef uint64_t words[2]
        cdef uint64_t granule
        if not isinstance(cap, Capability):
            raise TypeError(f"expected a Capability to store, not {type(cap).__name__}")
        c = <Capability>cap
        if c.tag:
            required |= PERM_STORE_CAP
            if not (c._perms & PERM_GLOBAL):
                required |= PERM_STORE_LOCAL_CAP
        offset = self._access(auth, address, True, None, GRANULE_C, required, ACCESS_STORE_CAP)
        if offset & (GRANULE_C - 1):
            self._aligned(auth, address, ACCESS_STORE_CAP)
        words[0] = htole64(c.cursor)
        words[1] = htole64(c.pesbt)
        memcpy(self._data + offset, words, 16)
        granule = <uint64_t>offset >> 4
        if c.tag:
            self._tags[granule >> 3] |= <uint8_t>(1 << (granule & 7))
        else:
            self._tags[granule >> 3] &= <uint8_t>~(1 << (granule & 7))

