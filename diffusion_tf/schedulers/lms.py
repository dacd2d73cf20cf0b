"""LMS: the linear multistep method of order 4 on the sigma schedule (k-diffusion's
`sample_lms`; Karras et al. 2022 notation): x_{i+1} = x_i + sum_j c_ij d_{i-j}, where
c_ij integrates the Lagrange basis polynomial through sigma_i .. sigma_{i-order+1}
from sigma_i to sigma_{i+1}. The coefficients are computed once per `set_timesteps`
by Gauss-Legendre quadrature (exact for these polynomials; diffusers integrates the
same polynomials with scipy's adaptive `quad` at every step).
"""

import numpy as np
from keras import ops

from diffusion_tf.schedulers.scheduler import SigmaScheduler, as_float

ORDER = 4


def lms_coefficients(sigmas, order=ORDER):
    """[len(sigmas) - 1, order] float32: row i weighs d_i, d_{i-1}, ..., by the integral from
    sigma_i to sigma_{i+1} of the Lagrange basis polynomial of each node (0 where i < j)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    nodes, weights = np.polynomial.legendre.leggauss(order + 2)
    out = np.zeros((len(sigmas) - 1, order), dtype=np.float64)
    for i in range(len(sigmas) - 1):
        cur = min(i + 1, order)
        a, b = sigmas[i], sigmas[i + 1]
        tau = (b - a) / 2 * nodes + (a + b) / 2
        for j in range(cur):
            basis = np.ones_like(tau)
            for k in range(cur):
                if k != j:
                    basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
            out[i, j] = (b - a) / 2 * np.dot(weights, basis)
    return out.astype(np.float32)


class LMSDiscreteScheduler(SigmaScheduler):
    """The state carries the last three derivatives d = (x - x0) / sigma."""

    name = "lms"
    karras = True

    def _schedule(self, num_steps):
        timesteps, sigmas = self._sigma_schedule(num_steps)
        tables = self._input_tables(sigmas[:-1])
        tables["coeffs"] = lms_coefficients(sigmas)
        return timesteps, tables

    def init_state(self, sample):
        z = ops.zeros_like(as_float(sample))
        return (z, z, z)

    def step_fn(self, model_output, i, sample, state, noise=None, tables=None):
        model_output, sample = as_float(model_output), as_float(sample)
        d1, d2, d3 = state
        x0 = self._x0(model_output, sample, i, tables)
        derivative = (sample - x0) / self.table("sigma", i, tables)
        c = self.table("coeffs", i, tables)
        # unused orders (the first steps) have coefficient 0
        update = c[0] * derivative + c[1] * d1 + c[2] * d2 + c[3] * d3
        return sample + update, (derivative, d1, d2)

    def step(self, model_output, timestep, sample, noise=None, order=ORDER):
        """As diffusers' `step(..., order=4)`; only order 4 is implemented (the coefficients
        are tabulated per `set_timesteps`)."""
        if order != ORDER:
            raise ValueError(f"order={order!r}; only {ORDER} is implemented.")
        return super().step(model_output, timestep, sample, noise)
