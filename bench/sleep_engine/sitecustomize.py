"""bench/fleet.py's stand-in for a GPU: ``Engine.predict`` sleeps instead of computing.

A worker started with this directory on its ``PYTHONPATH`` imports it before its own code.
Every pass of at most ``BEN2Q_MAX_BATCH`` images sleeps ``BEN2Q_BENCH_SLEEP_MS`` (a GPU
forward's time, without its CPU cost) and returns each image with an opaque mask, so what
a fleet of such workers spends is the queue's and the task layer's own work: Redis, Celery,
the job records, decoding and writing the (tiny) images. Never used outside bench/.
"""

from __future__ import annotations

import os
import time

_SLEEP = os.environ.get("BEN2Q_BENCH_SLEEP_MS")

if _SLEEP:
    import numpy as np

    from ben2q.engine import Engine, Prediction

    def _sleeping_predict(self, images, *, refine=False):  # type: ignore[no-untyped-def]
        results = []
        for idx in self.chunks(len(images)):
            time.sleep(float(_SLEEP) / 1000.0)
            for i in idx:
                rgb = np.asarray(images[i])
                alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
                results.append(Prediction(rgb=rgb, alpha=alpha))
        return results

    Engine.predict = _sleeping_predict  # type: ignore[method-assign]
