"""Patch: let ``CPUWorker.init_device`` build our model runner.

vLLM 0.32 ``vllm/v1/worker/cpu_worker.py`` constructs ``CPUModelRunner(...)`` by its module-global name
(no factory hook). We rebind that global only while ``init_device`` runs.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def cpu_model_runner_class(runner_cls):
    import vllm.v1.worker.cpu_worker as cpu_worker

    original = cpu_worker.CPUModelRunner
    cpu_worker.CPUModelRunner = runner_cls
    try:
        yield
    finally:
        cpu_worker.CPUModelRunner = original
