"""Emulated memory: checked access, faults with their Morello codes, tags, and sharing across processes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from capfaas.core.faults import (
    AlignmentFault,
    BoundsFault,
    CapabilityFault,
    PermissionFault,
    SealedFault,
    TagFault,
    UnmappedFault,
)
from capfaas.core.perms import Perm


def window(memory, offset: int, length: int, drop: int = 0):
    return memory.root_capability().add(offset).set_bounds_exact(length).clear_permissions(drop)


def test_root_capability_covers_exactly_the_segment(memory) -> None:
    root = memory.root_capability()
    assert root.tag and (root.base, root.top) == (memory.base, memory.base + memory.size)


def test_segment_arguments_are_validated(impl) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        impl.TaggedMemory(1000)
    with pytest.raises(TypeError, match="size"):
        impl.TaggedMemory("1")
    with pytest.raises(ValueError, match="2\\*\\*55"):
        impl.TaggedMemory(1 << 20, base=(1 << 55) - 4096)


def test_data_round_trip(memory) -> None:
    cap = window(memory, 0x100, 0x100)
    memory.store(cap, cap.base, b"hello capabilities")
    assert memory.load(cap, cap.base, 5) == b"hello"
    memory.store_u64(cap, cap.base + 0x20, 0x0102030405060708)
    assert memory.load_u64(cap, cap.base + 0x20) == 0x0102030405060708
    assert memory.load(cap, cap.base + 0x20, 1) == b"\x08"
    assert memory.load(cap, cap.top, 0) == b""


@pytest.mark.parametrize("size", [1, 8, 17, 4096, 65536 + 3])
def test_copy_and_view(memory, size: int) -> None:
    src = window(memory, 0x10000, 0x20000, drop=Perm.STORE)
    dst = window(memory, 0x40000, 0x20000, drop=Perm.LOAD)
    payload = os.urandom(size)
    memory.store(memory.root_capability(), src.base + 5, payload)
    memory.copy(dst, dst.base + 3, src, src.base + 5, size)
    view = memory.view(memory.root_capability(), dst.base + 3, size)
    assert view.readonly and bytes(view) == payload
    with pytest.raises(TypeError):
        view[0] = 1


def test_overlapping_copy_is_memmove(memory) -> None:
    root = memory.root_capability()
    memory.store(root, root.base, bytes(range(32)))
    memory.copy(root, root.base + 4, root, root.base, 16)
    assert memory.load(root, root.base, 24) == bytes(range(4)) + bytes(range(16)) + bytes(range(20, 24))


def test_view_is_zero_copy(memory) -> None:
    root = memory.root_capability()
    view = memory.view(root, root.base + 64, 4)
    memory.store(root, root.base + 64, b"abcd")
    assert bytes(view) == b"abcd"


def untagged(memory):
    cap = window(memory, 0, 0x100)
    return type(cap)(False, cap.pesbt, cap.cursor)


@pytest.mark.parametrize(
    ("make", "fault", "code", "si_code"),
    [
        (untagged, TagFault, 0x28, 10),
        (lambda m: window(m, 0, 0x100).seal_entry(), SealedFault, 0x29, 11),
        (lambda m: window(m, 0, 0x100, drop=Perm.LOAD), PermissionFault, 0x2B, 13),
        (lambda m: window(m, 0, 0x8), BoundsFault, 0x2A, 12),
    ],
    ids=["tag", "sealed", "permission", "bounds"],
)
def test_faults_carry_codes_and_context(memory, make, fault, code, si_code) -> None:
    cap = make(memory)
    with pytest.raises(fault) as info:
        memory.load(cap, memory.base, 16)
    err = info.value
    assert isinstance(err, CapabilityFault)
    assert (err.code, err.si_code, err.address, err.size, err.access) == (code, si_code, memory.base, 16, "load")
    assert err.capability == cap
    assert f"{code:#04x}" in str(err) and "load of 16 byte(s)" in str(err)


def test_fault_order_is_tag_seal_permission_bounds(memory) -> None:
    cap = window(memory, 0, 0x10, drop=Perm.LOAD).seal_entry()
    with pytest.raises(SealedFault):
        memory.load(cap, memory.base + 0x100, 8)
    with pytest.raises(PermissionFault, match="lacks LOAD"):
        memory.load(window(memory, 0, 0x10, drop=Perm.LOAD), memory.base + 0x100, 8)


def test_store_needs_store_permission(memory) -> None:
    with pytest.raises(PermissionFault, match="STORE"):
        memory.store(window(memory, 0, 0x100, drop=Perm.STORE), memory.base, b"x")
    with pytest.raises(PermissionFault):
        memory.store_u64(window(memory, 0, 0x100, drop=Perm.STORE), memory.base, 1)


def test_access_outside_segment_is_unmapped(impl, memory) -> None:
    wide = impl.Capability.root().set_address(memory.base - 0x1000).set_bounds(0x4000)
    with pytest.raises(UnmappedFault, match="segment"):
        memory.load(wide, memory.base - 0x10, 4)


def test_capability_store_and_load_keep_the_tag(memory) -> None:
    root = memory.root_capability()
    child = window(memory, 0x400, 0x40)
    memory.store_capability(root, root.base + 0x20, child)
    assert memory.tag_at(root.base + 0x20)
    assert memory.load_capability(root, root.base + 0x20) == child


def test_data_store_clears_overlapping_tags_only(memory) -> None:
    root = memory.root_capability()
    for slot in range(4):
        memory.store_capability(root, root.base + 16 * slot, root)
    memory.store(root, root.base + 16 + 15, b"ab")  # touches granules 1 and 2
    assert [memory.tag_at(root.base + 16 * s) for s in range(4)] == [True, False, False, True]
    loaded = memory.load_capability(root, root.base + 16)
    assert not loaded.tag


def test_store_u64_and_copy_clear_tags(memory) -> None:
    root = memory.root_capability()
    memory.store_capability(root, root.base, root)
    memory.store_u64(root, root.base + 8, 0)
    assert not memory.tag_at(root.base)
    memory.store_capability(root, root.base + 0x100, root)
    memory.copy(root, root.base + 0x100, root, root.base + 0x200, 1)
    assert not memory.tag_at(root.base + 0x100)


def test_large_store_clears_every_tag_in_range(memory) -> None:
    root = memory.root_capability()
    for slot in range(0, 64):
        memory.store_capability(root, root.base + 16 * slot, root)
    memory.store(root, root.base + 16 * 3 + 1, bytes(16 * 50))
    tags = [memory.tag_at(root.base + 16 * s) for s in range(64)]
    assert tags == [True] * 3 + [False] * 51 + [True] * 10


def test_load_without_load_cap_strips_tag(memory) -> None:
    root = memory.root_capability()
    memory.store_capability(root, root.base, root)
    loaded = memory.load_capability(root.clear_permissions(Perm.LOAD_CAP), root.base)
    assert not loaded.tag and loaded.pesbt == root.pesbt


def test_load_without_mutable_load_loses_store_rights(memory) -> None:
    root = memory.root_capability()
    memory.store_capability(root, root.base, root)
    loaded = memory.load_capability(root.clear_permissions(Perm.MUTABLE_LOAD), root.base)
    assert loaded.tag and loaded.perms & Perm.LOAD
    assert not loaded.perms & (Perm.STORE | Perm.STORE_CAP | Perm.STORE_LOCAL_CAP | Perm.MUTABLE_LOAD)
    sentry = root.seal_entry()
    memory.store_capability(root, root.base + 16, sentry)
    assert memory.load_capability(root.clear_permissions(Perm.MUTABLE_LOAD), root.base + 16) == sentry


def test_capability_store_rules(memory) -> None:
    root = memory.root_capability()
    with pytest.raises(PermissionFault, match="STORE_CAP"):
        memory.store_capability(root.clear_permissions(Perm.STORE_CAP), root.base, root)
    local = root.clear_permissions(Perm.GLOBAL)
    with pytest.raises(PermissionFault, match="STORE_LOCAL_CAP"):
        memory.store_capability(root.clear_permissions(Perm.STORE_LOCAL_CAP), root.base, local)
    memory.store_capability(root.clear_permissions(Perm.STORE_LOCAL_CAP), root.base, root)
    untagged = root.add(1 << 50)
    memory.store_capability(root.clear_permissions(Perm.STORE_CAP), root.base + 16, untagged)
    assert not memory.tag_at(root.base + 16)
    with pytest.raises(AlignmentFault) as info:
        memory.store_capability(root, root.base + 8, root)
    assert info.value.code == 0x21
    with pytest.raises(AlignmentFault):
        memory.load_capability(root, root.base + 4)


def test_segment_is_sparse(impl) -> None:
    mem = impl.TaggedMemory(1 << 30)
    try:
        root = mem.root_capability()
        mem.store(root, root.base + (1 << 29), b"x" * 4096)
        assert os.fstat(mem.fd).st_blocks * 512 < 1 << 20
    finally:
        mem.close()


CHILD = """
import os, sys
from {module} import TaggedMemory
fd, size, base = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
mem = TaggedMemory(size, base=base, fd=fd)
root = mem.root_capability()
assert mem.load(root, base, 5) == b"hello"
assert mem.tag_at(base + 16)
mem.store(root, base + 32, b"child")
"""


def test_segment_is_shared_with_a_child_process(impl, memory) -> None:
    root = memory.root_capability()
    memory.store(root, root.base, b"hello")
    memory.store_capability(root, root.base + 16, root)
    os.set_inheritable(memory.fd, True)
    subprocess.run([sys.executable, "-c", CHILD.format(module=impl.memory.__name__),
                    str(memory.fd), str(memory.size), str(memory.base)],
                   check=True, pass_fds=[memory.fd], timeout=60)
    assert memory.load(root, root.base + 32, 5) == b"child"


def test_attach_checks_fd_size(impl) -> None:
    fd = os.memfd_create("small")
    try:
        with pytest.raises(ValueError, match="needs"):
            impl.TaggedMemory(1 << 20, fd=fd)
    finally:
        os.close(fd)


def test_window_maps_only_its_own_region(impl) -> None:
    whole = impl.TaggedMemory(4 << 20)
    try:
        root = whole.root_capability()
        offset, size = 1 << 20, 512 << 10
        region_base = whole.base + offset
        window = impl.TaggedMemory(size, base=region_base, fd=os.dup(whole.fd), offset=offset,
                                   segment_size=whole.size)
        try:
            whole.store(root, region_base + 32, b"shared")
            whole.store_capability(root, region_base + 64, root)
            assert window.load(root, region_base + 32, 6) == b"shared"
            assert window.tag_at(region_base + 64) and not window.tag_at(region_base + 32)
            window.store(root, region_base + 64, b"x")
            assert not whole.tag_at(region_base + 64)
            with pytest.raises(UnmappedFault):
                window.load(root, region_base - 16, 16)
            with pytest.raises(UnmappedFault):
                window.load(root, region_base + size, 1)
        finally:
            window.close()
        with pytest.raises(ValueError, match="multiples of"):
            impl.TaggedMemory(4096, base=region_base, fd=whole.fd, offset=4096, segment_size=whole.size)
    finally:
        whole.close()


def test_writable_view_writes_in_place_and_clears_tags(memory) -> None:
    root = memory.root_capability()
    memory.store_capability(root, root.base + 32, root)
    view = memory.writable_view(root, root.base + 16, 64)
    assert not view.readonly and not memory.tag_at(root.base + 32)
    view[:5] = b"bytes"
    assert memory.load(root, root.base + 16, 5) == b"bytes"
    with pytest.raises(PermissionFault, match="STORE"):
        memory.writable_view(root.clear_permissions(Perm.STORE), root.base, 16)
