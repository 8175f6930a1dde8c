"""Checks the method tests share, against a spec matrix computed independently."""

import numpy as np


def assert_factored_and_inverse(adapter, w, params, expected, x, buffers=None):
  """The factored form is ``x @ W'ᵀ`` and ``unapply`` inverts ``apply``.

  Args:
    adapter: the per-leaf adapter under test.
    w: the frozen kernel ``(d_in, d_out)``.
    params, buffers: its parameters.
    expected: the spec's ``W' : (d_out, d_in)`` (PyTorch layout), computed
      independently in float64.
    x: inputs ``(..., d_in)``.
  """
  np.testing.assert_allclose(
    adapter.linear.factored(np.float32(x), w, params, buffers),
    x @ expected.T,
    rtol=1e-4,
    atol=1e-4,
  )
  np.testing.assert_allclose(
    adapter.unapply(adapter.apply(w, params, buffers), params, buffers),
    w,
    rtol=1e-5,
    atol=1e-5,
  )
