"""Build the optional Cython hot path; everything else is declared in pyproject.toml.

The two extensions are optional, the msgpack/aiohttp way: when Cython or the C compiler fails,
the build warns and the package installs with its pure-Python twins. Set
``CAPFAAS_REQUIRE_EXTENSION=1`` to make such a failure fatal (CI does).
"""
from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

REQUIRE_EXTENSION = os.environ.get("CAPFAAS_REQUIRE_EXTENSION", "") not in ("", "0")


def hot_path(name: str, pyx: str) -> Extension:
    return Extension(name, [pyx], extra_compile_args=["-O3"], optional=not REQUIRE_EXTENSION)


class cythonize_build_ext(build_ext):
    """Cythonize each extension as it is built, so a Cython error is a build error too.

    Calling ``cythonize()`` up front would lose ``optional`` (it returns new Extensions), and
    setuptools forgives only a failed optional extension, and only ``CompileError`` and its kin.
    So translate here, keep the original Extension, and turn any Cython failure into a
    ``CompileError``.
    """

    def run(self) -> None:
        if self.inplace:  # an editable install: a failed rebuild must not leave the old build in use
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        super().run()

    def build_extension(self, ext: Extension) -> None:
        try:
            from Cython.Build import cythonize

            (translated,) = cythonize(
                [ext], force=self.force, quiet=not self.verbose,
                compiler_directives={"language_level": "3"},
            )
        except Exception as exc:  # Cython missing, or the .pyx did not translate
            raise CompileError(f"Cython could not translate {ext.name}: {exc}") from exc
        ext.sources = translated.sources
        super().build_extension(ext)


setup(
    ext_modules=[
        hot_path("capfaas.core._capability", "capfaas/core/_capability.pyx"),
        hot_path("capfaas.backends.emulated._memory", "capfaas/backends/emulated/_memory.pyx"),
    ],
    cmdclass={"build_ext": cythonize_build_ext},
)
