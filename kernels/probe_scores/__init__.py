from .reference import probe_scores

__all__ = ["probe_scores"]
