"""``python -m flows.cli``: the ``harmonize`` command without the installed console script."""

import sys

from .main import main

sys.exit(main())
