"""Token entropy + log-probs from logits: heal vs PyTorch / torch.compile / verl; same as
``heal bench entropy``.

    python benchmarks/entropy.py [--rows N] [--vocab V] [--dtype bfloat16] [--temperature 0.7] ...
"""

import argparse
import os
import sys

from heal.bench import entropy

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=entropy.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    entropy.add_arguments(parser)
    # the committed tables the README quotes (an --output-dir given on the command line comes later and wins)
    sys.exit(entropy.run(parser.parse_args(["--output-dir", RESULTS, *sys.argv[1:]])))
