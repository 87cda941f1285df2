"""What the installed torch offers, for the few places that depend on its version."""

from __future__ import annotations

import torch

TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])  # (major, minor)
