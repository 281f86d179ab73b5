"""HeadRouter's workers (``--worker-cls``): vLLM's CPU and GPU workers, building HeadRouter's model runner."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from headrouter_vllm.patch.cpu_worker import cpu_model_runner_class
from headrouter_vllm.runner import HeadRouterCPUModelRunner, HeadRouterGPUModelRunner

V2_REFUSED = "HeadRouter supports vLLM's V1 model runner only: set VLLM_USE_V2_MODEL_RUNNER=0"


class HeadRouterCPUWorker(CPUWorker):
    def init_device(self):
        if self.use_v2_model_runner:
            raise RuntimeError(V2_REFUSED)
        with cpu_model_runner_class(HeadRouterCPUModelRunner):
            super().init_device()

    def headrouter_log(self):
        return self.model_runner.headrouter_log()


class HeadRouterGPUWorker(Worker):
    """vLLM 0.32's GPU worker builds its runner in ``_make_model_runner``: ours instead (V1 only)."""

    def _make_model_runner(self):
        if self.use_v2_model_runner:
            raise RuntimeError(V2_REFUSED)
        return HeadRouterGPUModelRunner(self.vllm_config, self.device)

    def headrouter_log(self):
        return self.model_runner.headrouter_log()
