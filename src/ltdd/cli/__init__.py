"""The ``ltdd`` command line: the command group and its entry point; each command group lives in its own module.

User errors (``LtddError``) print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import sys

import click

from ..errors import LtddError
from . import data_cmds, export_cmds, pipeline_cmds, result_cmds  # noqa: F401  (importing them registers their commands)
from . import label_cmds  # noqa: F401,E402  (ltdd calibrate, ltdd teacher)
from ..experiments.command import reproduce_cmd
from .analysis_cmds import register as _register_analysis
from .common import LtddGroup, cli

_register_analysis(cli)
cli.add_command(reproduce_cmd)

__all__ = ["LtddGroup", "cli", "main"]


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="ltdd", standalone_mode=True)
    except LtddError as e:  # errors raised while parsing
        click.echo(f"ltdd: error: {e}", err=True)
        sys.exit(2)
