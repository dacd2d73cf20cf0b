#!/usr/bin/env python
"""Train the small shapes text-to-image model: `python train.py --help` (see diffusion_tf/training/)."""

import sys

from diffusion_tf.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
