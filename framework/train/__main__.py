"""``python -m framework.train``: the training entry point (``framework.train.cli``)."""
import sys

from framework.train.cli import main

sys.exit(main())
