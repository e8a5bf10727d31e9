"""Intravisor's start-up YAML, written so its parser accepts it, or refused with the rule it breaks.

The rules come from Intravisor's parser and monitor (``src/libyaml/intra_parser.c``,
``host_cap_files.c``, the deploy loop), where a violation is rarely an error message: a decimal
size is read as hex, an eleventh CAP_File or a long name is truncated or makes the monitor spin,
an extra argument is dropped. So every rule is checked here, before a monitor is started:

- only the keys the parser knows; ``isolation`` fields, capfile ``size`` in hex (``strtol(…, 16)``);
- ``isolation.size`` equal to the build's CVM_MAX_SIZE, ``base`` a multiple of it (the monitor
  numbers cVMs ``base / CVM_MAX_SIZE``), ``begin == base``, ``end == base + size``;
- ``args`` split on single spaces with no quoting: at most 15 (the parser keeps 15 of 16 slots),
  each at most 128 bytes, no spaces or quotes inside one, and argv[0] is always ``/ld.so``;
- at most 10 CAP_Files, names of at most 9 characters, text data shorter than the size (it is
  copied with ``snprintf``);
- capfiles and cVMs in separate YAML documents: after a ``capfiles`` list the parser spins on any
  further key of the same mapping, and it fails on any key after ``cVMs``.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from capfaas.core.backend import BackendError

LD_SO = "/ld.so"
MAX_ARGS = 15
MAX_ARG_BYTES = 128
MAX_CAPFILES = 10
MAX_CAPFILE_NAME = 9
MAX_CAPFILE_SIZE = (1 << 31) - 1
"""The monitor stores a CAP_File's size in an ``int``."""
CVM_KEYS = ("name", "disk", "runtime", "args", "wait", "callback_out", "isolation")
"""The keys this generator writes: a subset of what the parser accepts (it also knows ``net``,
``callback_in`` and, in some versions, ``clean_room``), chosen to match every Intravisor release."""

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,63}")
_FILE = re.compile(r"[A-Za-z0-9_.+/-]{1,255}")
_ARG = re.compile(r"[!#-&(-\[\]-~]+")
"""Printable ASCII except space, ``"``, ``'`` and backslash: what survives strtok and YAML quoting alike."""
_CAPFILE_NAME = re.compile(r"[A-Za-z0-9_]{1,%d}" % MAX_CAPFILE_NAME)


class IntravisorConfigError(BackendError):
    """What capfaas asked for cannot be expressed in Intravisor's configuration."""


@dataclass(frozen=True)
class CapFile:
    """A CAP_File declared at start-up: a named buffer the monitor allocates and advertises."""

    name: str
    size: int
    data: str = ""


@dataclass(frozen=True)
class CVM:
    """One cVM entry. ``program`` is the command line after argv[0], which is always ``/ld.so``."""

    name: str
    runtime: str
    disk: str
    program: tuple[str, ...]
    base: int
    size: int
    wait: int | None = None
    callback_out: str | None = None

    @property
    def argv(self) -> tuple[str, ...]:
        return (LD_SO, *self.program)


def _hex(value: int) -> str:
    return f"0x{value:x}"


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar (libyaml decodes these escapes)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def check_cvm(cvm: CVM, max_size: int) -> None:
    """Refuse, with the rule named, a cVM entry Intravisor would misread or reject."""
    where = f"cVM {cvm.name!r}"
    if not _NAME.fullmatch(cvm.name):
        raise IntravisorConfigError(f"{where}: a cVM name must be 1-63 of [A-Za-z0-9_.-]")
    for key in ("runtime", "disk"):
        value = getattr(cvm, key)
        if not _FILE.fullmatch(value):
            raise IntravisorConfigError(f"{where}: {key} {value!r} must be a plain path without spaces or quotes")
    argv = cvm.argv
    if len(argv) > MAX_ARGS:
        raise IntravisorConfigError(f"{where}: {len(argv)} arguments (argv[0] {LD_SO} included); Intravisor "
                                    f"keeps at most {MAX_ARGS} and silently drops the rest")
    for arg in argv:
        if len(arg.encode()) > MAX_ARG_BYTES:
            raise IntravisorConfigError(f"{where}: argument {arg[:40]!r}… is {len(arg.encode())} bytes; "
                                        f"Intravisor takes at most {MAX_ARG_BYTES}")
        if not _ARG.fullmatch(arg):
            raise IntravisorConfigError(f"{where}: argument {arg!r} cannot be passed: Intravisor splits args on "
                                        "spaces without quoting, so an argument must be printable ASCII "
                                        "without spaces, quotes or backslashes")
    if cvm.size != max_size:
        raise IntravisorConfigError(f"{where}: isolation size {_hex(cvm.size)} must equal the build's "
                                    f"CVM_MAX_SIZE {_hex(max_size)} (the monitor exits otherwise)")
    if cvm.base <= 0 or cvm.base % max_size:
        raise IntravisorConfigError(f"{where}: isolation base {_hex(cvm.base)} must be a positive multiple of "
                                    f"CVM_MAX_SIZE {_hex(max_size)}")
    if cvm.wait is not None and (not isinstance(cvm.wait, int) or cvm.wait < -1):
        raise IntravisorConfigError(f"{where}: wait must be -1 (wait for this cVM) or a number of seconds")
    if cvm.callback_out is not None and not _NAME.fullmatch(cvm.callback_out):
        raise IntravisorConfigError(f"{where}: callback_out must name a cVM or 'monitor'")


def check_capfiles(capfiles: Sequence[CapFile]) -> None:
    if len(capfiles) > MAX_CAPFILES:
        raise IntravisorConfigError(f"{len(capfiles)} CAP_Files requested; Intravisor holds at most "
                                    f"{MAX_CAPFILES} per monitor (and spins when asked for more)")
    seen: set[str] = set()
    for capfile in capfiles:
        if not _CAPFILE_NAME.fullmatch(capfile.name):
            raise IntravisorConfigError(f"CAP_File name {capfile.name!r} must be 1-{MAX_CAPFILE_NAME} of "
                                        "[A-Za-z0-9_]: Intravisor keeps 9 characters of a name and "
                                        "truncates the rest, so longer names would collide")
        if capfile.name in seen:
            raise IntravisorConfigError(f"CAP_File name {capfile.name!r} is declared twice")
        seen.add(capfile.name)
        if not isinstance(capfile.size, int) or not 0 < capfile.size <= MAX_CAPFILE_SIZE:
            raise IntravisorConfigError(f"CAP_File {capfile.name!r}: size must be 1 to {MAX_CAPFILE_SIZE:#x} bytes")
        data = capfile.data.encode()
        if not all(ch.isprintable() or ch in "\n\t" for ch in capfile.data):
            raise IntravisorConfigError(f"CAP_File {capfile.name!r}: data must be text (Intravisor copies it "
                                        "with snprintf, so it ends at the first NUL)")
        if len(data) >= capfile.size:
            raise IntravisorConfigError(f"CAP_File {capfile.name!r}: {len(data)} bytes of data do not fit "
                                        f"{capfile.size} bytes with the terminating NUL")


def render(cvms: Sequence[CVM], capfiles: Sequence[CapFile] = (), *, max_size: int) -> str:
    """The YAML text for ``intravisor -y``; raises IntravisorConfigError for what cannot be said."""
    if not cvms:
        raise IntravisorConfigError("an Intravisor configuration needs at least one cVM")
    names: set[str] = set()
    bases: set[int] = set()
    for cvm in cvms:
        check_cvm(cvm, max_size)
        if cvm.name in names:
            raise IntravisorConfigError(f"two cVMs are named {cvm.name!r}")
        if cvm.base in bases:
            raise IntravisorConfigError(f"two cVMs share the isolation base {_hex(cvm.base)}")
        names.add(cvm.name)
        bases.add(cvm.base)
    for cvm in cvms:
        if cvm.callback_out not in (None, "monitor") and cvm.callback_out not in names:
            raise IntravisorConfigError(f"cVM {cvm.name!r}: callback_out names {cvm.callback_out!r}, "
                                        "which is not a cVM of this configuration")
    check_capfiles(capfiles)
    lines: list[str] = []
    if capfiles:
        lines += ["---", "capfiles:"]
        for capfile in capfiles:
            lines += [f"- name: {capfile.name}", f"  size: {_hex(capfile.size)}"]
            if capfile.data:
                lines.append(f"  data: {_quoted(capfile.data)}")
        lines.append("")
    lines += ["---", "cVMs:"]
    for cvm in cvms:
        lines += [f"- name: {cvm.name}", f"  disk: {cvm.disk}", f"  runtime: {cvm.runtime}",
                  f"  args: {_quoted(' '.join(cvm.argv))}"]
        if cvm.wait is not None:
            lines.append(f"  wait: {cvm.wait}")
        if cvm.callback_out is not None:
            lines.append(f"  callback_out: {cvm.callback_out}")
        lines += ["  isolation:", f"  - base: {_hex(cvm.base)}", f"    size: {_hex(cvm.size)}",
                  f"    begin: {_hex(cvm.base)}", f"    end: {_hex(cvm.base + cvm.size)}"]
    return "\n".join(lines) + "\n"
