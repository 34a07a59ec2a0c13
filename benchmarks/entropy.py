"""Token entropy + log-probs from logits: heal vs PyTorch / torch.compile / verl; same as
``heal bench entropy``.

    python benchmarks/entropy.py [--rows N] [--vocab V] [--dtype bfloat16] [--temperature 0.7] ...
"""

import argparse
import sys

from heal.bench import entropy

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=entropy.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    entropy.add_arguments(parser)
    sys.exit(entropy.run(parser.parse_args()))
