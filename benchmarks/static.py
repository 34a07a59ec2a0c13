"""Static performance model of the Triton kernels (compiled for sm_80/90/100, no GPU); same as
``heal bench static``.

    python benchmarks/static.py [--arch 80 90 100] [--jobs 2] [--measured benchmarks/results/eda-<gpu>.json]
"""

import argparse
import sys

from heal.bench import static

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=static.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    static.add_arguments(parser)
    sys.exit(static.run(parser.parse_args()))
