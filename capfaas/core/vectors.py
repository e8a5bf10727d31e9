"""Check a capability implementation against Morello reference vectors.

Usage: ``python -m capfaas.core.vectors FILE...``. Each file holds tab-separated rows in the
format of the reference vectors (``decode``, ``setbounds``, ``setaddr`` or ``crrl`` rows); one line
is printed per file, ``FILE: N passed, N failed``, followed by its first mismatches. The
implementation is the one ``CAPFAAS_PUREPYTHON`` selects. Exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .hotpath import choose


@dataclass
class Mismatch:
    line: int
    row: str
    expected: list[str]
    got: list[str]

    def __str__(self) -> str:
        return f"  line {self.line}: {self.row}\n    expected {' '.join(self.expected)}\n    got      {' '.join(self.got)}"


def _hex(value: int) -> str:
    return format(value, "x")


def _flag(value: Any) -> str:
    return "1" if value else "0"


def _decode(impl: ModuleType, pesbt: str, cursor: str) -> list[str]:
    cap = impl.Capability(False, int(pesbt, 16), int(cursor, 16))
    return [_hex(cap.base), _hex(cap.top), _hex(cap.perms), _hex(cap.otype),
            _hex(cap.exponent), _flag(cap.bounds_valid)]


def _setbounds(impl: ModuleType, pesbt: str, cursor: str, tag: str, length: str, exact: str) -> list[str]:
    cap = impl.Capability(tag == "1", int(pesbt, 16), int(cursor, 16))
    n = int(length, 16)
    new = cap.set_bounds(n, exact == "1")
    # Exact means base and length are both aligned as CRAM demands for this length.
    req_base = cap.cursor if cap.exponent >= 48 else cap.address
    unaligned = ~impl.representable_alignment_mask(n) & ((1 << 64) - 1)
    is_exact = not (req_base & unaligned or n & unaligned)
    return [_hex(new.pesbt), _flag(new.tag), _hex(new.base), _hex(new.top), _flag(is_exact)]


def _setaddr(impl: ModuleType, pesbt: str, cursor: str, tag: str, new_addr: str) -> list[str]:
    cap = impl.Capability(tag == "1", int(pesbt, 16), int(cursor, 16))
    value = int(new_addr, 16)
    moved = cap.add((value - cap.cursor) % (1 << 64))
    return [_flag(cap.fast_representable(value)), _flag(cap.precise_representable(value)),
            _flag(moved.tag), _flag(cap.set_address(value).tag), _hex(moved.base), _hex(moved.top)]


def _crrl(impl: ModuleType, length: str) -> list[str]:
    n = int(length, 16)
    return [_hex(impl.representable_length(n)), _hex(impl.representable_alignment_mask(n))]


CHECKS: dict[str, tuple[int, Callable[..., list[str]]]] = {
    "decode": (2, _decode),
    "setbounds": (5, _setbounds),
    "setaddr": (4, _setaddr),
    "crrl": (1, _crrl),
}


def check_rows(impl: ModuleType, lines: Iterable[str]) -> Iterator[tuple[int, str, Mismatch | None]]:
    """Yield (line number, row, mismatch or None) for each non-blank, non-comment row."""
    for number, raw in enumerate(lines, 1):
        row = raw.rstrip("\n")
        if not row.strip() or row.startswith("#"):
            continue
        fields = row.split("\t")
        op = fields[0]
        if op not in CHECKS:
            yield number, row, Mismatch(number, row, ["a known operation (" + ", ".join(CHECKS) + ")"], [op])
            continue
        arity, check = CHECKS[op]
        args, expected = fields[1:1 + arity], fields[1 + arity:]
        try:
            got = check(impl, *args)
        except Exception as exc:  # a malformed row or a crash is a failure, not an abort
            got = [f"{type(exc).__name__}: {exc}"]
        yield number, row, None if got == expected else Mismatch(number, row, expected, got)


def check_file(impl: ModuleType, path: str) -> tuple[int, list[Mismatch]]:
    passed, failed = 0, []
    with open(path, encoding="utf-8") as f:
        for _, _, mismatch in check_rows(impl, f):
            if mismatch is None:
                passed += 1
            else:
                failed.append(mismatch)
    return passed, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capfaas.core.vectors",
                                     description="Check capfaas's capability model against Morello reference vectors.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="vector files (.tsv)")
    parser.add_argument("--show", type=int, default=5, metavar="N", help="mismatches to show per file (default 5)")
    args = parser.parse_args(argv)
    impl, name = choose("capfaas.core._capability", "capfaas.core._capability_py")
    print(f"implementation: {name}")
    status = 0
    for path in args.files:
        try:
            passed, failed = check_file(impl, path)
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror}")
            status = 1
            continue
        print(f"{path}: {passed} passed, {len(failed)} failed")
        for mismatch in failed[:args.show]:
            print(mismatch)
        if failed:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
