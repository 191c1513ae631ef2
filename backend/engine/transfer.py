"""Device → host copies that cost one wait, however many tensors and images they carry.

A blocking ``.cpu()``, ``.item()`` or ``.tolist()`` makes the host wait for the device to drain its
queue, and the device then idles while the host does Python work. The engine instead gathers what a
batch needs on the host, issues every copy at once (CUDA: into pinned memory, ``non_blocking``, an
event recorded after them) and waits once, on that event, when it needs the values. The CPU runs the
same code; there the copies are views and the wait is nothing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class HostCopy:
    """Copies of ``tensors`` on the host, ready after :meth:`result`'s one wait.

    CUDA: each tensor goes into freshly allocated pinned memory (torch's caching host allocator
    reuses it across batches) with a non-blocking copy on the current stream. Tensors whose dtype
    numpy lacks (bfloat16) must be converted on the device first.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self._event = None
        devices = {t.device.type for t in tensors}
        if devices - {"cpu", "cuda"} or len(devices) > 1:
            raise ValueError(f"tensors on {sorted(devices)}: pass tensors of one device, CPU or CUDA")
        if devices == {"cuda"}:
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, tensor in zip(self._host, tensors):
                host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = [t.detach() for t in tensors]

    def result(self) -> list[np.ndarray]:
        """The host arrays, in the order given (waits for the copies once)."""
        if self._event is not None:
            self._event.synchronize()
        return [host.numpy() for host in self._host]
