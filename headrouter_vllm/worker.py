"""HeadRouterCPUWorker: vLLM's CPU worker with the HeadRouter model runner (``--worker-cls``)."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from headrouter_vllm.patch.cpu_worker import cpu_model_runner_class
from headrouter_vllm.runner import HeadRouterCPUModelRunner


class HeadRouterCPUWorker(CPUWorker):
    def init_device(self):
        if self.use_v2_model_runner:
            raise RuntimeError("HeadRouter supports vLLM's V1 model runner only: set VLLM_USE_V2_MODEL_RUNNER=0")
        with cpu_model_runner_class(HeadRouterCPUModelRunner):
            super().init_device()

    def headrouter_log(self):
        return self.model_runner.headrouter_log()
