"""``python -m recsys.cli``: the ``recsys`` command line (what torchrun and torchx launch)."""

import sys

from recsys.cli import main

if __name__ == "__main__":  # not when a worker process imports it as its parent's main
    sys.exit(main())
