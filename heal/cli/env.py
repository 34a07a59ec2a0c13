"""``heal env``: what a bug report needs (versions, devices, op backends, C++ build state, switches)."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "print versions, CUDA devices, the backend each op will use, the C++ build state and HEAL_* switches"

DESCRIPTION = """\
Prints what a bug report needs and what to check before a long run: the versions of python, torch,
triton, transformers, accelerate, verl, trl and vllm (or "not installed"), the CUDA devices and their
compute capability, which implementation each op runs on CPU and CUDA tensors, whether the C++
extensions are built or can be built (compiler, cache folder), and the HEAL_* / Triton / torch
switches in the environment. Nothing is compiled unless --build is given; with --build each
extension's progress (loaded from the cache, or compiled now and how long that took) goes to stderr."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.add_argument("--build", action="store_true",
                        help="build (or load) the C++ extensions now and report whether that worked")


def run(args) -> int:
    from heal.environment import collect, format_report

    def progress(line: str) -> None:
        print(f"heal env: C++ extension {line}", file=sys.stderr, flush=True)

    info = collect(build=args.build, log=progress)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0
