"""The parity tolerance check shared by the tests that compare against the reference."""

import numpy as np

TOL = 1e-4


def assert_close(actual, expected, what, tol=TOL):
    """Max abs error relative to the expected output's scale (where larger than 1) within `tol`."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max()) / scale
    assert err <= tol, f"{what}: max error {err:.2e} (relative to scale {scale:.2f}) > {tol}"
