"""Rollouts + exact entropies, three ways; same as ``heal bench rollout`` (needs vLLM).

    python benchmarks/rollout.py [--samples 4] [--max-new-tokens 64] ...
"""

import argparse
import sys

from heal.bench import rollout

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=rollout.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    rollout.add_arguments(parser)
    sys.exit(rollout.run(parser.parse_args()))
