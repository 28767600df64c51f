"""``python -m safecode_kernels``: the same command line as ``safecode-kernels``."""

import sys

from .cli import main

sys.exit(main())
