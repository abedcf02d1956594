#!/usr/bin/env python
"""Train the demo's tiny SigLIP on the demo world into saefe/demo/model (~10 min on 2 cores).

Same options as `saefe train-demo-model --help`.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from saefe.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-demo-model", *sys.argv[1:]]))
