"""Baselines of the SSR evaluation: k-reciprocal re-ranking and query expansion."""

from .k_reciprocal import fewshot_k_reciprocal, k_reciprocal
from .query_expansion import alpha_qe, aqe, aqe_wd, dqe

__all__ = ["alpha_qe", "aqe", "aqe_wd", "dqe", "fewshot_k_reciprocal", "k_reciprocal"]
