"""Rollouts + exact entropies, three ways; same as ``heal bench rollout`` (needs vLLM).

    python benchmarks/rollout.py [--samples 4] [--max-new-tokens 64] ...
"""

import argparse
import os
import sys

from heal.bench import rollout

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=rollout.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    rollout.add_arguments(parser)
    # the committed tables the README quotes (an --output-dir given on the command line comes later and wins)
    sys.exit(rollout.run(parser.parse_args(["--output-dir", RESULTS, *sys.argv[1:]])))
