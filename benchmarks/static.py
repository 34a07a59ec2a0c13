"""Static performance model of the Triton kernels (compiled for sm_80/90/100, no GPU); same as
``heal bench static``.

    python benchmarks/static.py [--arch 80 90 100] [--jobs 2] [--measured benchmarks/results/eda-<gpu>.json]
"""

import argparse
import os
import sys

from heal.bench import static

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=static.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    static.add_arguments(parser)
    # the committed tables the README quotes (an --output-dir given on the command line comes later and wins)
    sys.exit(static.run(parser.parse_args(["--output-dir", RESULTS, *sys.argv[1:]])))
