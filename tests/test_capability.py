"""The capability value: construction, encoding, and every manipulation rule beyond the vectors."""
from __future__ import annotations

import pickle

import pytest

from capfaas.core.perms import ALL_PERMS, OTYPE_LB, OTYPE_LPB, OTYPE_RB, Perm

ROOT_PESBT = 0xFFFFC00000010005


def data_cap(impl, address: int = 0x10000, length: int = 0x1000, perms: int = ALL_PERMS):
    return impl.Capability.root().set_address(address).set_bounds_exact(length).and_permissions(perms)


def test_null_and_root(impl) -> None:
    null, root = impl.Capability.null(), impl.Capability.root()
    assert (null.tag, null.base, null.top, null.perms, null.otype, null.exponent) == (False, 0, 1 << 64, 0, 0, 63)
    assert null.bounds_valid
    assert (root.tag, root.pesbt, root.base, root.top, root.perms, root.exponent) == (
        True, ROOT_PESBT, 0, 1 << 64, ALL_PERMS, 50)
    assert root.length == 1 << 64 and not root.sealed


def test_bytes_round_trip_is_little_endian_value_first(impl) -> None:
    cap = data_cap(impl).add(0x10)
    raw = cap.to_bytes()
    assert len(raw) == 16
    assert int.from_bytes(raw[:8], "little") == cap.cursor
    assert int.from_bytes(raw[8:], "little") == cap.pesbt
    assert impl.Capability.from_bytes(raw, tag=True) == cap
    assert impl.Capability.from_bytes(bytearray(raw)) == cap.__class__(False, cap.pesbt, cap.cursor)


def test_bad_arguments_raise_clear_errors(impl) -> None:
    C = impl.Capability
    with pytest.raises(TypeError, match="pesbt must be an int"):
        C(True, "1", 0)
    with pytest.raises(ValueError, match=r"cursor must be in \[0, 2\*\*64\)"):
        C(True, 0, 1 << 64)
    with pytest.raises(ValueError, match="cursor"):
        C(True, 0, -1)
    with pytest.raises(ValueError, match="16 bytes"):
        C.from_bytes(b"\0" * 15)
    with pytest.raises(TypeError):
        C.from_bytes("not bytes")
    root = C.root()
    with pytest.raises(ValueError, match="length"):
        root.set_bounds((1 << 64) + 1)
    with pytest.raises(TypeError, match="length"):
        root.set_bounds(1.5)
    with pytest.raises(ValueError, match="permission mask"):
        root.clear_permissions(1 << 18)
    with pytest.raises(TypeError, match="Capability"):
        root.seal(42)
    with pytest.raises(ValueError, match="sentry"):
        root.seal_entry(4)


def test_immutable_and_hashable(impl) -> None:
    cap = data_cap(impl)
    with pytest.raises(AttributeError):
        cap.tag = False
    with pytest.raises(AttributeError):
        cap.cursor = 0
    assert cap == data_cap(impl) and hash(cap) == hash(data_cap(impl))
    assert cap != cap.add(1)
    assert pickle.loads(pickle.dumps(cap)) == cap


def test_fields(impl) -> None:
    cap = data_cap(impl, 0x20000, 0x100).add(0x10).set_address((0xAB << 56) | 0x20010)
    assert cap.tag
    assert cap.flags == 0xAB and cap.address == 0x20010 and cap.value == (0xAB << 56) | 0x20010
    assert (cap.base, cap.top, cap.length, cap.offset) == (0x20000, 0x20100, 0x100, 0x10)
    assert "tag=1" in repr(cap) and "0x20000" in repr(cap)


def test_set_bounds_inexact_rounds_outward_and_exact_detags(impl) -> None:
    parent = data_cap(impl, 0x100000, 0x100000)
    cap = parent.add(0x7).set_bounds(0x12345)
    assert cap.tag and cap.base <= parent.base + 7 and cap.top >= parent.base + 7 + 0x12345
    assert (cap.base, cap.top) != (parent.base + 7, parent.base + 7 + 0x12345)
    assert not parent.add(0x7).set_bounds_exact(0x12345).tag
    assert parent.set_bounds_exact(0x1000).tag


def test_set_bounds_beyond_parent_detags(impl) -> None:
    parent = data_cap(impl, 0x10000, 0x1000)
    assert not parent.set_bounds(0x1001).tag
    assert not parent.add(0x800).set_bounds(0x801).tag
    assert parent.add(0x800).set_bounds(0x800).tag


def test_permissions_only_clear(impl) -> None:
    cap = data_cap(impl).clear_permissions(Perm.STORE | Perm.STORE_CAP)
    assert cap.tag and not cap.perms & Perm.STORE and cap.perms & Perm.LOAD
    assert data_cap(impl).and_permissions(Perm.LOAD).perms == Perm.LOAD


def test_moving_the_address(impl) -> None:
    cap = data_cap(impl, 0x100000, 0x1000)
    assert cap.add(0x800).tag and cap.add(-0x10).tag  # near the bounds stays representable
    far = cap.add(1 << 40)
    assert not far.tag and far.address == 0x100000 + (1 << 40)
    assert not cap.set_address(1 << 40).tag
    assert cap.set_address((0x5A << 56) | 0x100000).tag  # flags only


def test_seal_and_unseal(impl) -> None:
    C = impl.Capability
    data = data_cap(impl)
    key = C.root().set_address(0x1234).set_bounds_exact(0x10).and_permissions(Perm.SEAL | Perm.UNSEAL | Perm.GLOBAL)
    sealed = data.seal(key)
    assert sealed.tag and sealed.sealed and sealed.otype == 0x1234
    assert not sealed.add(0).tag and not sealed.set_bounds(1).tag and not sealed.clear_permissions(0).tag
    assert sealed.unseal(key) == data
    wrong = key.add(1)
    assert not sealed.unseal(wrong).tag
    no_seal = key.clear_permissions(Perm.SEAL)
    assert not data.seal(no_seal).tag
    assert not sealed.seal(key).tag  # already sealed
    local_key = key.clear_permissions(Perm.GLOBAL)
    unsealed = sealed.unseal(local_key)
    assert unsealed.tag and not unsealed.perms & Perm.GLOBAL


def test_sentries_and_branch(impl) -> None:
    code = data_cap(impl)
    for otype in (OTYPE_RB, OTYPE_LPB, OTYPE_LB):
        sentry = code.seal_entry(otype)
        assert sentry.tag and sentry.otype == otype
    rb = code.seal_entry()
    assert rb.branch() == code
    assert not code.seal_entry(OTYPE_LB).branch().tag
    assert code.branch() == code
    assert not rb.seal_entry().tag


def test_build_and_copy_type(impl) -> None:
    key = data_cap(impl, 0x10000, 0x10000)
    forged = impl.Capability(False, key.set_bounds(0x100).pesbt, key.cursor)
    rebuilt = forged.build(key)
    assert rebuilt.tag and (rebuilt.base, rebuilt.top) == (0x10000, 0x10100)
    too_big = impl.Capability(False, impl.Capability.root().pesbt, 0)
    assert not too_big.build(key).tag
    assert not forged.build(key.seal_entry()).tag
    sealing = impl.Capability.root().set_address(0x40).set_bounds_exact(0x10)
    sealed = key.seal(sealing)
    typed = sealed.copy_type(impl.Capability.root())
    assert typed.tag and typed.address == 0x40
    assert key.copy_type(impl.Capability.root()).cursor == (1 << 64) - 1


def test_subset(impl) -> None:
    parent = data_cap(impl, 0x10000, 0x1000)
    child = parent.add(0x100).set_bounds(0x100).clear_permissions(Perm.STORE)
    assert child.is_subset_of(parent) and not parent.is_subset_of(child)
    assert not child.clear_permissions(0).is_subset_of(parent.clear_permissions(Perm.LOAD))
    assert not impl.Capability.null().is_subset_of(parent)


def test_representable_length_and_mask(impl) -> None:
    m = impl.capability
    assert m.representable_length(0x1000) == 0x1000
    assert m.representable_alignment_mask(0x10) == (1 << 64) - 1
    length = 0x12345678
    rounded = m.representable_length(length)
    mask = m.representable_alignment_mask(length)
    assert rounded >= length and rounded & ~mask & ((1 << 64) - 1) == 0
    cap = impl.Capability.root().set_address(0x1000_0000 & mask).set_bounds_exact(rounded)
    assert cap.tag
    assert m.representable_length(1 << 64) == 0  # wraps, as CHERI C does
