from .reference import paged_probe_scores, probe_scores

__all__ = ["paged_probe_scores", "probe_scores"]
