"""Packaging for diffusion_tf (Stable Diffusion for Keras 3 on TensorFlow) and weights_port."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="diffusion_tf",
    version="0.1.0",
    description="Stable Diffusion 1.x/2.x in Keras 3 on TensorFlow, with the reference implementation's numbers.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["diffusion_tf", "diffusion_tf.*", "weights_port", "weights_port.*"]),
    package_data={
        "diffusion_tf": ["data/clip/*", "data/shapes_model/*", "presets/*.json", "presets/vae/*.json"],
    },
    py_modules=["text2image"],
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0,<4",
        "numpy",
        "pillow",
        "ftfy",
        "regex",
        "h5py",
        "safetensors",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "nbformat", "nbclient", "ipykernel"],
        "app": ["gradio>=5,<7"],
        "e2e": ["playwright"],
        "parity": ["torch==2.13.0", "diffusers==0.42.1", "transformers==5.23.0", "peft==0.21.2"],
        "bench": ["torch==2.13.0", "diffusers==0.42.1", "transformers==5.23.0", "peft==0.21.2", "openvino==2026.4.1"],
    },
    entry_points={
        "console_scripts": [
            "text2image=diffusion_tf.cli:main",
            "weights-port=weights_port.__main__:main",
            "diffusion-tf-app=diffusion_tf.app:main",
        ]
    },
)
