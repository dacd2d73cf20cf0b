#!/usr/bin/env python
"""Command line text-to-image with diffusion_tf: `python text2image.py --prompt "..."`.

The program lives in `diffusion_tf/cli.py` (run with --help for every option).
"""

import sys

from diffusion_tf.cli import *  # noqa: F401,F403
from diffusion_tf.cli import main

if __name__ == "__main__":
    sys.exit(main())
