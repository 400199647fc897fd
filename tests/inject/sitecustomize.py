"""Test-only fault injection into real worker processes.

Tests put this directory on a worker's ``PYTHONPATH`` and set ``BEN2Q_TEST_FAULT``; Python
imports this module when the interpreter starts, before the worker's own code. The faults
are raised where the hardware would raise them, below ben2q's own code (torch's
exceptions from the network's forward, a process killed by the kernel), so what is tested
is ben2q's handling of them, end to end:

- ``warmup_oom``: the first forward (the warm-up) raises ``torch.OutOfMemoryError`` as a
  GPU that is too small does;
- ``device_error``: every forward after the warm-up raises ``torch.AcceleratorError``
  ("CUDA error: an illegal memory access was encountered"), as a failed GPU does;
- ``crash_on_job``: every forward after the warm-up kills its process with SIGKILL (a
  segfault or the kernel's OOM killer);
- ``slow_warmup:S``: the warm-up forward takes S seconds longer;
- ``slow_forward:S``: every forward after the warm-up takes S seconds longer (a worker
  that holds its jobs for a while, as a busy GPU worker does).
"""

from __future__ import annotations

import os

_FAULT = os.environ.get("BEN2Q_TEST_FAULT", "")

if _FAULT:
    import signal
    import time

    import torch

    from ben2q.model.network import BEN2

    _forward = BEN2.forward
    _calls = {"n": 0}

    def _faulty_forward(self, x):  # type: ignore[no-untyped-def]
        _calls["n"] += 1
        first = _calls["n"] == 1
        if _FAULT == "warmup_oom" and first:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1.95 GiB total)"
            )
        if _FAULT == "device_error" and not first:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        if _FAULT == "crash_on_job" and not first:
            os.kill(os.getpid(), signal.SIGKILL)
        if _FAULT.startswith("slow_warmup:") and first:
            time.sleep(float(_FAULT.split(":", 1)[1]))
        if _FAULT.startswith("slow_forward:") and not first:
            time.sleep(float(_FAULT.split(":", 1)[1]))
        return _forward(self, x)

    BEN2.forward = _faulty_forward  # type: ignore[method-assign]
