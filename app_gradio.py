#!/usr/bin/env python
"""Serve the SAEFE configuration tool (a Gradio Blocks app) over a local index.

    python app_gradio.py                              # the demo: index/demo + weights/demo
    python app_gradio.py --index index/NAME --sae weights/NAME --host 0.0.0.0 --port 7860
    python app_gradio.py --backend http://host:1707   # search a meme-search-engine backend
    python app_gradio.py --clip-server http://host:1708  # embed text/image queries remotely

Same as `saefe app`. Named API endpoints for gradio_client: /search, /search_text, /search_image,
/inspect_feature, /image_features, /bias, /labels (see the page's "Use via API" link).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from saefe.cli.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
