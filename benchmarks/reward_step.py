"""The trainer's whole EDA reward step for a full batch; same as ``heal bench reward``.

    python benchmarks/reward_step.py [--batch 1024] [--max-len 3072] ...
"""

import argparse
import os
import sys

from heal.bench import reward_step

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=reward_step.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    reward_step.add_arguments(parser)
    # the committed tables the README quotes (an --output-dir given on the command line comes later and wins)
    sys.exit(reward_step.run(parser.parse_args(["--output-dir", RESULTS, *sys.argv[1:]])))
