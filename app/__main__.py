"""``python -m app``: the same as ``flushline`` (with no command, ``flushline serve``)."""

import sys

from app.cli import main

sys.exit(main(sys.argv[1:]))
