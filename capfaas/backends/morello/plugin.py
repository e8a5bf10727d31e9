"""Registers the Morello backend and the ``capfaas morello`` command (``prepare``, ``check``)."""
from __future__ import annotations

import argparse

from capfaas.hookspecs import hookimpl

from .backend import MorelloBackend


@hookimpl
def capfaas_backends() -> list[type[MorelloBackend]]:
    return [MorelloBackend]


def morello(args: argparse.Namespace) -> int:
    """Prepare the files a Morello board needs, or check this host for the Morello backend."""
    if args.morello_command == "prepare":
        from .prepare import prepare, report

        print(report(prepare(args)))
        return 0
    from .check import run_checks

    return run_checks()


@hookimpl
def capfaas_register_commands(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("morello", help="the Morello backend: prepare the board's files, check this host",
                              description=morello.__doc__)
    parser.set_defaults(verb=morello)
    actions = parser.add_subparsers(dest="morello_command", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="lay out the agent (and build the disk image with --rootfs)",
                                 description="Lay out what a cVM's disk image needs (the capfaas agent, msgpack, "
                                             "pluggy), build the image from a Python root file system with "
                                             "--rootfs, and write a capfaas.toml with a [morello] section.")
    from .prepare import add_arguments

    add_arguments(prepare)
    actions.add_parser("check", help="run every check of the Morello backend and say what is missing",
                       description="Each host and installation check, passed or failed, with what to install.")
