#!/usr/bin/env python
"""Train the small shapes text-to-image model: `python train.py --help` (see diffusion_tf/train.py)."""

import sys

from diffusion_tf.train import main

if __name__ == "__main__":
    sys.exit(main())
