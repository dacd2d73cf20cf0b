"""The pipeline tests' short names for the session's tiny pipelines (tests/conftest.py)."""

import pytest


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def jit_pipe(tiny_jit_pipe):
    return tiny_jit_pipe
