"""The emulator's hot path: compiled against pure Python, and checked copies against raw ones.

Run: ``python bench/emulator.py`` (``--quick`` for a short run). Prints, for each implementation
that imports: checked bulk copy throughput next to a raw ``memoryview`` copy of the same bytes in
the same segment, ns per small checked load and store, and decode / set-bounds operations per
second; then the compiled-to-pure ratios. Figures, never pass/fail.
"""
from __future__ import annotations

import argparse
import importlib
import mmap
import timeit
from collections.abc import Callable
from types import ModuleType

SEGMENT = 256 << 20
COPY_SIZES = [(4 << 10, "4 KiB"), (1 << 20, "1 MiB"), (64 << 20, "64 MiB")]
IMPLEMENTATIONS = {
    "cython": ("capfaas.core._capability", "capfaas.backends.emulated._memory"),
    "python": ("capfaas.core._capability_py", "capfaas.backends.emulated._memory_py"),
}


def best_seconds(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Fastest of ``repeat`` runs, per call: the least disturbed measurement on a shared machine."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def calls_for(size: int, quick: bool) -> int:
    budget = (64 << 20) if quick else (512 << 20)
    return max(1, min(20000, budget // size))


def bench_raw_copies(quick: bool) -> dict[str, float]:
    """GB/s of a plain memoryview slice copy inside a shared mapping of the same size: the floor."""
    with mmap.mmap(-1, SEGMENT) as mapping:
        view = memoryview(mapping)
        view[:] = b"\x5a" * SEGMENT
        half = SEGMENT // 2
        results = {}
        for size, label in COPY_SIZES:
            seconds = best_seconds(lambda: view.__setitem__(slice(half, half + size), view[:size]),
                                   calls_for(size, quick), 3 if quick else 5)
            results[label] = size / seconds / 1e9
        view.release()
    return results


def bench_copies(mem_module: ModuleType, quick: bool) -> dict[str, float]:
    """GB/s of checked ``copy`` between two halves of a segment, per size."""
    results = {}
    mem = mem_module.TaggedMemory(SEGMENT)
    try:
        root = mem.root_capability()
        half = SEGMENT // 2
        mem.store(root, root.base, b"\x5a" * SEGMENT)  # fault in every page before timing
        src = root.set_bounds_exact(half)
        dst = root.add(half).set_bounds_exact(half)
        for size, label in COPY_SIZES:
            seconds = best_seconds(lambda: mem.copy(dst, dst.base, src, src.base, size),
                                   calls_for(size, quick), 3 if quick else 5)
            results[label] = size / seconds / 1e9
    finally:
        mem.close()
    return results


def bench_small(cap_module: ModuleType, mem_module: ModuleType, quick: bool) -> dict[str, float]:
    number = 100_000 if quick else 1_000_000
    mem = mem_module.TaggedMemory(1 << 20)
    try:
        cap = mem.root_capability().add(0x100).set_bounds_exact(0x100)
        address = cap.base + 8
        names = {"load": mem.load_u64, "store": mem.store_u64, "C": cap_module.Capability,
                 "cap": cap, "address": address, "pesbt": cap.pesbt, "cursor": cap.cursor,
                 "set_bounds": cap.set_bounds}

        def per_call(statement: str) -> float:
            timer = timeit.Timer(statement, globals=names)  # no wrapper call: just the operation
            return min(timer.repeat(repeat=5, number=number)) / number

        figures = {
            "load ns": per_call("load(cap, address)") * 1e9,
            "store ns": per_call("store(cap, address, 42)") * 1e9,
            "decode ops/s": 1 / per_call("C(True, pesbt, cursor)"),
            "set-bounds ops/s": 1 / per_call("set_bounds(0x40)"),
        }
    finally:
        mem.close()
    return figures


def load(name: str) -> tuple[ModuleType, ModuleType] | None:
    cap_name, mem_name = IMPLEMENTATIONS[name]
    try:
        return importlib.import_module(cap_name), importlib.import_module(mem_name)
    except ImportError as exc:
        print(f"{name}: not available ({exc})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (for a smoke run)")
    args = parser.parse_args()
    small: dict[str, dict[str, float]] = {}
    raw = bench_raw_copies(args.quick)
    for name in IMPLEMENTATIONS:
        modules = load(name)
        if modules is None:
            continue
        cap_module, mem_module = modules
        print(f"\n== {name}")
        for label, checked in bench_copies(mem_module, args.quick).items():
            print(f"copy {label:>7}: checked {checked:6.2f} GB/s   raw memoryview {raw[label]:6.2f} GB/s"
                  f"   ratio {checked / raw[label]:5.2f}x")
        small[name] = bench_small(cap_module, mem_module, args.quick)
        for label, value in small[name].items():
            print(f"{label:>17}: {value:,.1f}")
    if len(small) == 2:
        fast, slow = small["cython"], small["python"]
        print("\n== compiled vs pure")
        print(f"load:       {slow['load ns'] / fast['load ns']:5.1f}x faster")
        print(f"store:      {slow['store ns'] / fast['store ns']:5.1f}x faster")
        print(f"decode:     {fast['decode ops/s'] / slow['decode ops/s']:5.1f}x faster")
        print(f"set-bounds: {fast['set-bounds ops/s'] / slow['set-bounds ops/s']:5.1f}x faster")


if __name__ == "__main__":
    main()
