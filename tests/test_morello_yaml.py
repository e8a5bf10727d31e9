"""Intravisor configurations: golden output, every rule of its parser, and refusals that say which rule,
also for the CAP_Files a deployment declares.

The generated text is also read back with the stand-in monitor's port of Intravisor's parser, and
that port is checked on configurations from Intravisor's own examples, so a parser too lenient to
catch a mistake would show up here.
"""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from capfaas.backends.morello.cvm_yaml import CVM, CapFile, IntravisorConfigError, render
from capfaas.backends.morello.declared import CapFilesUnsupported, capfiles_for
from capfaas.core.spec import FunctionSpec, SpecError
from capfaas.registry import DeploymentRecord

from .fake_intravisor import Spin, YamlError, consume, events, strtol

SIZE = 0x40000000
BASE = 0x400000000
AGENT = ("/usr/bin/python3", "-m", "capfaas.backends.morello.agent", "--connect", "127.0.0.1:40123",
         "--token", "0123456789abcdef0123456789abcdef", "--bundles", "/var/lib/capfaas/bundles")

GOLDEN = """\
---
capfiles:
- name: inbox
  size: 0x1000
  data: "Hello world\\n"
- name: results
  size: 0x100000

---
cVMs:
- name: capfaas7
  disk: disk.img
  runtime: libmusl-lkl.so
  args: "/ld.so /usr/bin/python3 -m capfaas.backends.morello.agent --connect 127.0.0.1:40123 \
--token 0123456789abcdef0123456789abcdef --bundles /var/lib/capfaas/bundles"
  isolation:
  - base: 0x400000000
    size: 0x40000000
    begin: 0x400000000
    end: 0x440000000
"""

INTRAVISOR_CAP_FILE_EXAMPLE = """\
---
capfiles:
- name: test1
  size: 0x20
  data: "Hello world\\n"

---
cVMs:
- name: cap_file_test
  disk: disk_cap_file.img
  runtime: libmusl-lkl.so
  args: /ld.so /app/cap_file
  callback_out: monitor
  isolation:
  - base:  0x400000000
    size:  0x040000000
    begin: 0x400000000
    end:   0x440000000
"""
"""runtime/musl-lkl/apps/cap_file/musl-lkl-cap_file.yaml in Intravisor's repository."""


def agent_cvm(**changes: object) -> CVM:
    fields = {"name": "capfaas7", "runtime": "libmusl-lkl.so", "disk": "disk.img", "program": AGENT,
              "base": BASE, "size": SIZE}
    fields.update(changes)
    return CVM(**fields)  # type: ignore[arg-type]


def test_golden_configuration() -> None:
    text = render([agent_cvm()], [CapFile("inbox", 0x1000, "Hello world\n"), CapFile("results", 0x100000)],
                  max_size=SIZE)
    assert text == GOLDEN


def test_the_parser_reads_it_back_as_written() -> None:
    cvms, capfiles = consume(events(GOLDEN))
    assert capfiles == [{"name": "inbox", "size": 0x1000, "data": "Hello world\n"}, {"name": "results", "size": 0x100000}]
    (cvm,) = cvms
    assert cvm["isol"] == {"base": BASE, "size": SIZE, "begin": BASE, "end": BASE + SIZE}
    assert cvm["args"].split(" ") == ["/ld.so", *AGENT]
    assert (cvm["name"], cvm["disk"], cvm["runtime"]) == ("capfaas7", "disk.img", "libmusl-lkl.so")


def test_the_parser_port_reads_intravisors_own_example() -> None:
    cvms, capfiles = consume(events(INTRAVISOR_CAP_FILE_EXAMPLE))
    assert capfiles == [{"name": "test1", "size": 0x20, "data": "Hello world\n"}]
    assert cvms[0]["isol"]["size"] == SIZE and cvms[0]["cb_out"] == "monitor"


def test_wait_and_callback_out_are_written_when_asked() -> None:
    text = render([agent_cvm(wait=-1, callback_out="monitor")], max_size=SIZE)
    assert "  wait: -1\n  callback_out: monitor\n" in text
    assert consume(events(text))[0][0]["wait"] == -1


def test_two_cvms_in_one_configuration() -> None:
    text = render([agent_cvm(), agent_cvm(name="inner", base=BASE + SIZE, callback_out="capfaas7")], max_size=SIZE)
    cvms, _ = consume(events(text))
    assert [c["isol"]["base"] for c in cvms] == [BASE, BASE + SIZE] and cvms[1]["cb_out"] == "capfaas7"


# -- what Intravisor would misread, and is refused here ------------------------------------------

@pytest.mark.parametrize(("cvm", "expected"), [
    (agent_cvm(program=("/usr/bin/python3", "x" * 129)), r"is 129 bytes; Intravisor takes at most 128"),
    (agent_cvm(program=("/usr/bin/python3", "/app/my file.py")), r"splits args on spaces without quoting"),
    (agent_cvm(program=("/usr/bin/python3", 'say"hi"')), r"without spaces, quotes or backslashes"),
    (agent_cvm(size=0x10000000), r"isolation size 0x10000000 must equal the build's CVM_MAX_SIZE 0x40000000"),
    (agent_cvm(base=BASE + 0x1000), r"isolation base 0x400001000 must be a positive multiple of CVM_MAX_SIZE"),
    (agent_cvm(name="my cvm"), r"a cVM name must be 1-63 of"),
    (agent_cvm(disk="disk image.img"), r"disk 'disk image.img' must be a plain path"),
    (agent_cvm(wait=-2), r"wait must be -1"),
    (agent_cvm(callback_out="elsewhere"), r"callback_out names 'elsewhere', which is not a cVM"),
])
def test_cvm_rules(cvm: CVM, expected: str) -> None:
    with pytest.raises(IntravisorConfigError, match=expected):
        render([cvm], max_size=SIZE)


def test_fifteen_arguments_are_the_most() -> None:
    render([agent_cvm(program=("/usr/bin/python3",) + ("-v",) * 13)], max_size=SIZE)  # 15 with /ld.so
    with pytest.raises(IntravisorConfigError,
                       match=r"^cVM 'capfaas7': 16 arguments \(argv\[0\] /ld\.so included\); Intravisor keeps at most 15"):
        render([agent_cvm(program=("/usr/bin/python3",) + ("-v",) * 14)], max_size=SIZE)


def test_128_byte_arguments_pass() -> None:
    render([agent_cvm(program=("/usr/bin/python3", "a" * 128))], max_size=SIZE)


@pytest.mark.parametrize(("capfiles", "expected"), [
    ([CapFile(f"cf{i}", 16) for i in range(11)], r"11 CAP_Files requested; Intravisor holds at most 10"),
    ([CapFile("toolongname", 16)], r"name 'toolongname' must be 1-9 of .*truncates the rest"),
    ([CapFile("a-b", 16)], r"name 'a-b' must be 1-9 of \[A-Za-z0-9_\]"),
    ([CapFile("twice", 16), CapFile("twice", 32)], r"'twice' is declared twice"),
    ([CapFile("big", 1 << 31)], r"size must be 1 to 0x7fffffff bytes"),
    ([CapFile("full", 5, "hello")], r"5 bytes of data do not fit 5 bytes with the terminating NUL"),
    ([CapFile("bin", 16, "a\0b")], r"data must be text"),
])
def test_capfile_rules(capfiles: list[CapFile], expected: str) -> None:
    with pytest.raises(IntravisorConfigError, match=expected):
        render([agent_cvm()], capfiles, max_size=SIZE)


def test_ten_capfiles_with_nine_character_names_pass() -> None:
    text = render([agent_cvm()], [CapFile(f"ninechar{i}", 16) for i in range(10)], max_size=SIZE)
    assert len(consume(events(text))[1]) == 10


def test_two_cvms_may_not_collide() -> None:
    with pytest.raises(IntravisorConfigError, match="two cVMs are named 'capfaas7'"):
        render([agent_cvm(), agent_cvm(base=BASE + SIZE)], max_size=SIZE)
    with pytest.raises(IntravisorConfigError, match="two cVMs share the isolation base 0x400000000"):
        render([agent_cvm(), agent_cvm(name="other")], max_size=SIZE)
    with pytest.raises(IntravisorConfigError, match="at least one cVM"):
        render([], max_size=SIZE)


# -- why the rules: what the parser does with the mistakes they prevent -------------------------

def test_an_unknown_key_fails_the_parse() -> None:
    with pytest.raises(YamlError, match="Unexpected key: env"):
        consume(events(GOLDEN.replace("  disk: disk.img\n", "  disk: disk.img\n  env: PYTHONHOME=/usr\n")))
    with pytest.raises(YamlError, match="Unexpected key: length"):
        consume(events(GOLDEN.replace("    size: 0x40000000\n", "    length: 0x40000000\n")))


def test_a_decimal_size_is_read_as_hex() -> None:
    cvms, _ = consume(events(GOLDEN.replace("size: 0x40000000", "size: 1073741824")))
    assert cvms[0]["isol"]["size"] == 0x1073741824 != SIZE
    assert strtol("0x40000000", 16) == strtol("40000000", 16) == SIZE


def test_capfiles_and_cvms_in_one_mapping_make_the_parser_spin() -> None:
    merged = re.sub(r"\n\n---\n", "\n", GOLDEN)
    with pytest.raises(Spin, match="something is wrong cVMs"):
        consume(events(merged))


def test_a_key_after_cvms_fails() -> None:
    with pytest.raises(YamlError, match="Unexpected event"):
        consume(events(GOLDEN + "capfiles:\n- name: late\n  size: 0x10\n"))


# -- CAP_Files a deployment declares ---------------------------------------------------------------

DECLARED_GOLDEN = """\
---
capfiles:
- name: config
  size: 0x40
  data: "threshold=3\\nmode=\\"fast\\"\\n"
- name: scratch
  size: 0x100000

""" + GOLDEN[GOLDEN.index("---\ncVMs:"):]
"""The declarations below as the YAML's capfiles, before the same cVM as GOLDEN's."""


def declaring(*capfiles: dict) -> FunctionSpec:
    """The spec a deployment with these ``capFiles`` runs under, as the registry makes it."""
    record = DeploymentRecord(name="configured", extra={"capFiles": list(capfiles)})
    return record.spec(Path("/nonexistent"), {})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_declared_capfiles_become_the_yaml_capfiles() -> None:
    spec = declaring({"name": "config", "size": 64, "contents": b64(b'threshold=3\nmode="fast"\n'),
                      "grants": {"configured": "rw"}},  # the function itself: what it has anyway
                     {"name": "scratch", "size": 1 << 20})
    text = render([agent_cvm()], capfiles_for(spec), max_size=SIZE)
    assert text == DECLARED_GOLDEN
    assert consume(events(text))[1] == [{"name": "config", "size": 64, "data": 'threshold=3\nmode="fast"\n'},
                                        {"name": "scratch", "size": 1 << 20}]


def test_no_declared_capfiles_no_capfiles_document() -> None:
    assert capfiles_for(declaring()) == []


@pytest.mark.parametrize(("capfiles", "expected"), [
    ([{"name": "config", "size": 64, "grants": {"reader": "r", "writer": "rw"}}],
     r"CAP_File 'config' is granted to 'reader', 'writer', but on Morello each cVM has its own monitor"),
    ([{"name": "image", "size": 64, "contents": b64(b"\x89PNG\r\n\x1a\n\xff")}],
     r"CAP_File 'image' has binary contents; a capfile's data is text"),
    ([{"name": "nul", "size": 64, "contents": b64(b"a\0b")}], r"CAP_File 'nul': data must be text"),
    ([{"name": "full", "size": 11, "contents": b64(b"threshold=3")}],
     r"CAP_File 'full': 11 bytes of data do not fit 11 bytes with the terminating NUL"),
    ([{"name": "configuration", "size": 64}], r"CAP_File name 'configuration' must be 1-9 of \[A-Za-z0-9_\]"),
    ([{"name": "my.conf", "size": 64}], r"CAP_File name 'my.conf' must be 1-9 of \[A-Za-z0-9_\]"),
    ([{"name": f"cf{i}", "size": 16} for i in range(11)], r"11 CAP_Files requested; Intravisor holds at most 10"),
])
def test_what_capfiles_cannot_express_is_refused_with_the_rule(capfiles: list[dict], expected: str) -> None:
    with pytest.raises(CapFilesUnsupported, match=r"^function 'configured' declares CAP_Files that Intravisor's "
                                                  r"capfiles cannot provide: .*" + expected) as caught:
        capfiles_for(declaring(*capfiles))
    assert isinstance(caught.value, SpecError)  # a deploy answers 400 with it
