"""The ``heal`` command.

Each subcommand lives in its own module of this package and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs (or for ``--help``), and keep heavy imports (torch, transformers) inside ``run``
so that ``heal --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> module implementing it, in the order a user meets them
SUBCOMMANDS = {
    "demo": "heal.cli.demo",
    "prepare": "heal.cli.prepare",
    "mix": "heal.cli.mix",
    "select": "heal.cli.select",
    "plot": "heal.cli.plot",
    "bench": "heal.cli.bench",
    "env": "heal.cli.env",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heal",
        description="HEAL: hybrid-domain entropy dynamics alignment for few-shot RLVR "
        "(fused entropy / EDA kernels, data selection, trainer integrations).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from heal.rollout.vllm import EntropyCaptureError, VLLMUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, VLLMUnavailableError, EntropyCaptureError) as exc:
        # bad input / bad config: one clear line, no traceback
        print(f"heal {args.command}: error: {exc}", file=sys.stderr)
        return 2


