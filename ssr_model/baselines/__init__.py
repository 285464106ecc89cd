"""Baselines of the SSR evaluation: k-reciprocal re-ranking and query expansion, and their grids; the
transductive few-shot peers (SimpleShot, BD-CSPN, TIM-GD, PT-MAP, LaplacianShot) and their registry."""

from .grids import QE_N, RETRIEVAL_KRECIP_K, RETRIEVAL_KRECIP_LAMBDA, KReciprocalPoint, best_point, krecip_grid
from .bd_cspn import bd_cspn
from .k_reciprocal import fewshot_k_reciprocal, k_reciprocal
from .laplacianshot import laplacianshot
from .peers import PEER_METHODS, PeerMethod, peer_method
from .pt_map import pt_map
from .query_expansion import alpha_qe, aqe, aqe_wd, dqe, hard_margin_dual
from .simpleshot import simpleshot
from .tim import tim_gd

__all__ = ["PEER_METHODS", "QE_N", "RETRIEVAL_KRECIP_K", "RETRIEVAL_KRECIP_LAMBDA", "KReciprocalPoint", "PeerMethod", "alpha_qe",
           "aqe", "aqe_wd", "bd_cspn", "best_point", "dqe", "fewshot_k_reciprocal", "hard_margin_dual", "k_reciprocal",
           "krecip_grid", "laplacianshot", "peer_method", "pt_map", "simpleshot", "tim_gd"]
