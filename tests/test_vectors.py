"""The reference vectors, row for row, on both hot paths, and the checker's command line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from capfaas.core.vectors import check_file

from .conftest import VECTORS

VECTOR_FILES = sorted(VECTORS.glob("*.tsv"))


def test_vectors_are_present() -> None:
    assert {p.name for p in VECTOR_FILES} >= {"decode.tsv", "setbounds.tsv", "setaddr.tsv", "crrl.tsv"}


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_every_row_reproduced(impl, path: Path) -> None:
    passed, failed = check_file(impl.capability, str(path))
    assert not failed, f"{len(failed)} mismatches, first:\n" + "\n".join(map(str, failed[:3]))
    assert passed == 5000


def _run_checker(*files: Path, pure: bool) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("CAPFAAS_PUREPYTHON", None)
    if pure:
        env["CAPFAAS_PUREPYTHON"] = "1"
    return subprocess.run([sys.executable, "-m", "capfaas.core.vectors", *map(str, files)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_checker_reports_failures_and_exits_nonzero(tmp_path: Path) -> None:
    good = tmp_path / "good.tsv"
    bad = tmp_path / "bad.tsv"
    rows = (VECTORS / "crrl.tsv").read_text().splitlines()[:3]
    good.write_text("\n".join(rows) + "\n")
    wrong = rows[0].split("\t")
    wrong[2] = "1"
    bad.write_text("\t".join(wrong) + "\n" + rows[1] + "\nnonsense\t1\n")
    result = _run_checker(good, bad, pure=True)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "implementation: python" in lines
    assert f"{good}: 3 passed, 0 failed" in lines
    assert f"{bad}: 1 passed, 2 failed" in lines
    assert "line 1:" in result.stdout and "line 3:" in result.stdout


def test_checker_passes_reference_file_on_selected_implementation(impl) -> None:
    result = _run_checker(VECTORS / "decode.tsv", pure=impl.name == "python")
    assert result.returncode == 0, result.stdout
    assert f"implementation: {impl.name}" in result.stdout
    assert "5000 passed, 0 failed" in result.stdout
