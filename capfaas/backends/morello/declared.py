"""A deployment's CAP_Files (``capFiles``) as Intravisor capfiles, or refused with the rule they break.

Intravisor's capfiles are buffers its monitor allocates at start-up from the YAML (name, size,
text data) and that any cVM of that monitor probes by name and then reads and writes. The
backend runs one monitor per cVM, so a declaration becomes:

- its name, if Intravisor can hold it (1-9 of ``[A-Za-z0-9_]``);
- its size, written in hex;
- its contents as the capfile's data, if they are text shorter than the size (the monitor copies
  the data with ``snprintf``: it ends at a NUL and keeps at most size - 1 bytes);
- for each cVM of the function, a capfile of its own, filled with the declared contents, read-write:
  what one instance writes, no other instance sees, and it ends with the cVM (no monitor outlives
  its cVM, so nothing is kept across instances or versions);
- a grant to another function: nothing can express it, since that function's cVMs run under
  other monitors. It is refused, not dropped. A grant naming the function itself is what it has.

A refusal is a SpecError raised before any monitor starts, so a deploy, which starts a cVM to
check the code, answers 400 with the reason.
"""
from __future__ import annotations

from capfaas.core.spec import FunctionSpec, SpecError

from .cvm_yaml import CapFile, IntravisorConfigError, check_capfiles


class CapFilesUnsupported(SpecError):
    """A function declares CAP_Files that Intravisor's capfiles cannot provide."""


def capfiles_for(spec: FunctionSpec) -> list[CapFile]:
    """The capfiles ``spec``'s declarations become in its cVMs' YAML."""
    where = f"function {spec.name!r} declares CAP_Files that Intravisor's capfiles cannot provide"
    capfiles = []
    for declared in spec.capfiles:
        others = sorted(function for function in declared.grants if function != spec.name)
        if others:
            raise CapFilesUnsupported(
                f"{where}: CAP_File {declared.name!r} is granted to {', '.join(map(repr, others))}, but on "
                "Morello each cVM has its own monitor, so a capfile is reachable only from the cVM whose YAML "
                "declares it")
        try:
            data = declared.contents.decode("utf-8")
        except UnicodeDecodeError:
            raise CapFilesUnsupported(f"{where}: CAP_File {declared.name!r} has binary contents; a capfile's "
                                      "data is text (Intravisor copies it with snprintf)") from None
        capfiles.append(CapFile(declared.name, declared.size, data))
    try:
        check_capfiles(capfiles)
    except IntravisorConfigError as exc:
        raise CapFilesUnsupported(f"{where}: {exc}") from None
    return capfiles
