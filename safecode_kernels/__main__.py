"""``python -m safecode_kernels``: the same command line as ``safecode-kernels``."""

import sys

from .app.cli import main

sys.exit(main())
