"""Entropy + log-probs straight from hidden states and a linear head: heal vs the unfused path,
verl's FusedLinearForPPO / linear_cross_entropy and Liger; same as ``heal bench linear``.

    python benchmarks/linear.py [--shape 4096x896x151936 ...] [--dtype bfloat16] [--iters N] ...
"""

import argparse
import os
import sys

from heal.bench import linear

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=linear.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    linear.add_arguments(parser)
    # the committed tables the README quotes (an --output-dir given on the command line comes later and wins)
    sys.exit(linear.run(parser.parse_args(["--output-dir", RESULTS, *sys.argv[1:]])))
