"""The kernels before this change (HEAD), timed with bench_route_ops' configurations in the same run."""
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd() / "benchmarks" / "kernels"))
import bench_route_ops as b  # noqa: E402


def load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


old_compact, old_probe = load("old_compact"), load("old_probe")


class Probe:  # the old signature: no row-group / tile / rows arguments
    @staticmethod
    def paged_probe_scores(*args, block_m=None, tile_slots=None, max_rows_per_seq=None):
        return old_probe.paged_probe_scores(*args)


class Compact:
    @staticmethod
    def compact_kv(*args, tile=None, max_suffix_len=None):
        return old_compact.compact_kv(*args)


b.load_kernels = lambda smoke: (Compact, Probe)
b.main(sys.argv[1:])
