"""Entropy + log-probs straight from hidden states and a linear head: heal vs the unfused path,
verl's FusedLinearForPPO / linear_cross_entropy and Liger; same as ``heal bench linear``.

    python benchmarks/linear.py [--shape 4096x896x151936 ...] [--dtype bfloat16] [--iters N] ...
"""

import argparse
import sys

from heal.bench import linear

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=linear.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    linear.add_arguments(parser)
    sys.exit(linear.run(parser.parse_args()))
