"""Runs per second of the code sandbox; same as ``heal bench sandbox``.

    python benchmarks/sandbox.py [--runs 40] [--workers 1,2,4] [--pool 4]
"""

import argparse
import os
import sys

from heal.bench import sandbox

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=sandbox.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sandbox.add_arguments(parser)
    # the committed tables the README quotes (an --output-dir given on the command line comes later and wins)
    sys.exit(sandbox.run(parser.parse_args(["--output-dir", RESULTS, *sys.argv[1:]])))
