"""``python -m recsys.cli``: the ``recsys`` command line (what torchrun and torchx launch)."""

import sys

from recsys.cli import main

sys.exit(main())
