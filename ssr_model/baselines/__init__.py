"""Baselines of the SSR evaluation: k-reciprocal re-ranking and query expansion, and their grids."""

from .grids import QE_N, RETRIEVAL_KRECIP_K, RETRIEVAL_KRECIP_LAMBDA, KReciprocalPoint, best_point, krecip_grid
from .k_reciprocal import fewshot_k_reciprocal, k_reciprocal
from .query_expansion import alpha_qe, aqe, aqe_wd, dqe, hard_margin_dual

__all__ = ["QE_N", "RETRIEVAL_KRECIP_K", "RETRIEVAL_KRECIP_LAMBDA", "KReciprocalPoint", "alpha_qe", "aqe", "aqe_wd",
           "best_point", "dqe", "fewshot_k_reciprocal", "hard_margin_dual", "k_reciprocal", "krecip_grid"]
