import sys

from heal.cli import main

sys.exit(main())
