"""dtype -> (rtol, atol) used by parity tests of exact fast paths against their references."""

from __future__ import annotations

import torch

EXACT = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-6, 1e-7)}
