"""Properties that must hold for every input, not just the reference rows."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capfaas.core.faults import SealedFault, TagFault

from .conftest import load_hotpath

u64 = st.integers(0, (1 << 64) - 1)
lengths = st.one_of(st.integers(0, 1 << 20), st.integers(0, 1 << 64))
perm_masks = st.integers(0, 0x3FFFF)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

operation = st.one_of(
    st.tuples(st.just("set_bounds"), lengths),
    st.tuples(st.just("set_bounds_exact"), lengths),
    st.tuples(st.just("add"), st.integers(-(1 << 64), (1 << 64) - 1)),
    st.tuples(st.just("add"), st.integers(-(1 << 16), 1 << 16)),
    st.tuples(st.just("set_address"), u64),
    st.tuples(st.just("clear_permissions"), perm_masks),
    st.tuples(st.just("and_permissions"), perm_masks),
    st.tuples(st.just("seal_entry"), st.integers(1, 3)),
)


def within(child, parent) -> bool:
    return parent.base <= child.base and child.top <= parent.top and child.perms & ~parent.perms == 0


@SETTINGS
@given(start=u64, length=lengths, ops=st.lists(operation, max_size=8))
def test_derivation_is_monotonic(impl, start: int, length: int, ops) -> None:
    origin = impl.Capability.root().set_address(start).set_bounds(length)
    cap = origin
    for name, arg in ops:
        derived = getattr(cap, name)(arg)
        if derived.tag:
            assert cap.tag, f"{name} tagged an untagged capability"
            assert within(derived, cap) and within(derived, origin), (name, arg, cap, derived)
        cap = derived


@SETTINGS
@given(tag=st.booleans(), pesbt=u64, cursor=u64)
def test_encode_decode_round_trip(impl, tag: bool, pesbt: int, cursor: int) -> None:
    cap = impl.Capability(tag, pesbt, cursor)
    again = impl.Capability.from_bytes(cap.to_bytes(), tag)
    assert again == cap
    assert (again.base, again.top, again.perms, again.otype) == (cap.base, cap.top, cap.perms, cap.otype)


@SETTINGS
@given(pesbt=u64, offset=st.integers(0, (1 << 20) - 16), size=st.integers(1, 16), sealed=st.booleans())
def test_untagged_or_sealed_never_grants_access(impl, memory, pesbt: int, offset: int, size: int, sealed: bool) -> None:
    address = memory.base + offset
    if sealed:
        cap = memory.root_capability().seal_entry()
        expected = SealedFault
    else:
        cap = impl.Capability(False, pesbt, address)
        expected = TagFault
    with pytest.raises(expected):
        memory.load(cap, address, size)
    with pytest.raises(expected):
        memory.store(cap, address, b"\0" * size)


@SETTINGS
@given(slots=st.sets(st.integers(0, 63)), start=st.integers(0, 1023), size=st.integers(0, 1024))
def test_data_store_clears_exactly_the_overlapping_tags(impl, memory, slots, start: int, size: int) -> None:
    root = memory.root_capability()
    memory.store(root, root.base, bytes(1024 + 16))
    for slot in slots:
        memory.store_capability(root, root.base + 16 * slot, root)
    memory.store(root, root.base + start, b"\xff" * size)
    touched = set(range(start // 16, (start + size - 1) // 16 + 1)) if size else set()
    for slot in range(64):
        assert memory.tag_at(root.base + 16 * slot) == (slot in slots and slot not in touched)


@SETTINGS
@given(tag=st.booleans(), pesbt=u64, cursor=u64, length=lengths, value=u64, mask=perm_masks)
def test_compiled_and_pure_agree(tag: bool, pesbt: int, cursor: int, length: int, value: int, mask: int) -> None:
    compiled, pure = load_hotpath("cython").Capability, load_hotpath("python").Capability
    a, b = compiled(tag, pesbt, cursor), pure(tag, pesbt, cursor)

    def same(x, y) -> None:
        assert (x.tag, x.pesbt, x.cursor, x.base, x.top, x.exponent, x.bounds_valid) == (
            y.tag, y.pesbt, y.cursor, y.base, y.top, y.exponent, y.bounds_valid)

    same(a, b)
    for name, arg in [("set_bounds", length), ("set_bounds_exact", length), ("add", value),
                      ("set_address", value), ("clear_permissions", mask), ("seal_entry", 1)]:
        same(getattr(a, name)(arg), getattr(b, name)(arg))
    assert a.fast_representable(value) == b.fast_representable(value)
    assert a.precise_representable(value) == b.precise_representable(value)
