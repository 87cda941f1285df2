"""Peak memory of a step without running it: the step traced on fake tensors, live storages counted at every op.

Under `FakeTensorMode` no memory is allocated and nothing is computed, so a `dbrx-132b` step can be traced on a
laptop in seconds. Every tensor an op creates is counted from its creation until its storage is freed; the
peak of that sum, plus the parameters (and the input tensors), is the estimate. It follows the eager kernels
of the tracing machine's backend (the CPU's: flash attention saves the same (B, H, T) statistics as CUDA's,
torch's grouped matmul the same outputs), so it models what a step keeps alive, not what torch.compile fuses
away, the CUDA caching allocator's rounding and fragmentation, or cuBLAS workspaces: expect the GPU's
`max_memory_allocated` a little higher in eager and lower compiled.

Fake tensors hold no values, so a step that reads one on the host (`.tolist()`, `bool(t)`: the quantized
experts' per-expert loop reads its row counts) cannot be traced as it is; `scalar` answers such reads instead
(dbrx.bench's QLoRA estimate: balanced routing).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveMemory(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode that are still alive; remembers the peak."""

    def __init__(self, top: int = 8, scalar: Callable[[torch.Tensor], object] | None = None):
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}  # storage id -> (bytes, what made it)
        self.current = self.peak = 0
        self.top, self.at_peak = top, []
        self.scalar = scalar  # 0-d tensor -> the Python value a host read of it gives (fake tensors have none)

    def ignore(self, tensors) -> None:
        """Storages that exist before the step (parameters, inputs): never counted, even through views."""
        for t in tensors:
            self.live.setdefault(id(t.untyped_storage()), (0, "external"))

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.scalar is not None:
            return self.scalar(args[0])  # `.item()`, `.tolist()`, `bool(t)`: one element each
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live:
                    nbytes = storage.nbytes()
                    self.live[key] = (nbytes, f"{func.overloadpacket.__name__}{tuple(t.shape)} {t.dtype}")
                    self.current += nbytes
                    weakref.finalize(storage, self._free, key)
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = sorted((v for v in self.live.values() if v[0]), reverse=True)[: self.top]
        return out


def estimate_peak(build: Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]],
                  step: Callable[..., object], scalar: Callable[[torch.Tensor], object] | None = None) -> dict:
    """Trace `step(model, *inputs)` on fake CPU tensors; `build()` makes the model and inputs (also faked).
    `scalar(t)`: the value of a host read of the 0-d fake tensor t (without it such a read fails the trace).

    Returns bytes: params, peak (params + inputs + the step's peak of live tensors) and the largest tensors
    alive at the peak; and the number of trainable parameters (requires_grad).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model, inputs = build()
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        input_bytes = sum(t.numel() * t.element_size() for t in inputs)
        tracker = LiveMemory(scalar=scalar)
        tracker.ignore([*model.parameters(), *model.buffers(), *inputs])
        with tracker:
            step(model, *inputs)
        return dict(params=params, buffers=buffers, inputs=input_bytes, trainable_params=trainable,
                    peak=params + buffers + input_bytes + tracker.peak,
                    at_peak=[dict(bytes=b, tensor=what) for b, what in tracker.at_peak])
