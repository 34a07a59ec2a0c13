"""All-pairs entropy-dynamics similarity + EDA reductions vs the reference loop; same as ``heal bench eda``.

    python benchmarks/eda.py [--batch 1024] [--max-len 3072] [--device cuda] ...
"""

import argparse
import sys

from heal.bench import eda

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=eda.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    eda.add_arguments(parser)
    sys.exit(eda.run(parser.parse_args()))
