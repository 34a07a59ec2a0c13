"""All-pairs entropy-dynamics similarity + EDA reductions vs the reference loop; same as ``heal bench eda``.

    python benchmarks/eda.py [--batch 1024] [--max-len 3072] [--device cuda] ...
"""

import argparse
import os
import sys

from heal.bench import eda

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=eda.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    eda.add_arguments(parser)
    # the committed tables the README quotes (an --output-dir given on the command line comes later and wins)
    sys.exit(eda.run(parser.parse_args(["--output-dir", RESULTS, *sys.argv[1:]])))
