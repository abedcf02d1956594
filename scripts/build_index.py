#!/usr/bin/env python
"""Build an index (no arguments: the built-in offline demo into index/demo + weights/demo).

Same options as `saefe build --help`.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from saefe.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
