"""Runs per second of the code sandbox; same as ``heal bench sandbox``.

    python benchmarks/sandbox.py [--runs 40] [--workers 1,2,4] [--pool 4]
"""

import argparse
import sys

from heal.bench import sandbox

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=sandbox.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sandbox.add_arguments(parser)
    sys.exit(sandbox.run(parser.parse_args()))
