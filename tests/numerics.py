"""Shared numeric helpers for the tests."""

import numpy as np


def rel_err(a, b) -> float:
    """``max|a − b| / max|b|`` in fp32 (denominator floored at 1e-6)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))
