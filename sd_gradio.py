"""The diffusion_tf web UI, as the Stable Diffusion projects before it started it:

    python sd_gradio.py [--model MODEL] [--port 7860] ...

the same as `python -m diffusion_tf.app` (see `python sd_gradio.py --help`)."""

import sys

from diffusion_tf.app import main

if __name__ == "__main__":
    sys.exit(main())
