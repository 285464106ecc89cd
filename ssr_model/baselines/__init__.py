"""Baselines of the SSR evaluation: k-reciprocal re-ranking and query expansion, and their grids; the
transductive few-shot peers (SimpleShot, BD-CSPN, TIM-GD, alpha-TIM, PT-MAP, LaplacianShot) and their registry; the
retrieval shortlist re-rankers (alpha-DBA + alpha-QE, diffusion, GNN re-ranking, SuperGlobal) and theirs."""

from .alpha_dba import alpha_dba_qe
from .alpha_tim import alpha_tim
from .bd_cspn import bd_cspn
from .diffusion import diffusion_rerank
from .gnn_rerank import gnn_rerank
from .grids import QE_N, RETRIEVAL_KRECIP_K, RETRIEVAL_KRECIP_LAMBDA, KReciprocalPoint, best_point, krecip_grid
from .k_reciprocal import fewshot_k_reciprocal, k_reciprocal
from .laplacianshot import laplacianshot
from .neighbours import CandidateNeighbours, candidate_neighbours, topk_search
from .peers import PEER_METHODS, PeerMethod, peer_method
from .pt_map import pt_map
from .query_expansion import alpha_qe, aqe, aqe_wd, dqe, hard_margin_dual
from .shortlist_methods import (
    BASELINE_METHODS,
    RETRIEVAL_METHODS,
    SHORTLIST_METHODS,
    ShortlistMethod,
    ShortlistPoint,
    shortlist_grids,
    shortlist_method,
)
from .simpleshot import simpleshot
from .superglobal import superglobal_rerank
from .tim import tim_gd

__all__ = [
    "BASELINE_METHODS",
    "PEER_METHODS",
    "QE_N",
    "RETRIEVAL_KRECIP_K",
    "RETRIEVAL_KRECIP_LAMBDA",
    "RETRIEVAL_METHODS",
    "SHORTLIST_METHODS",
    "CandidateNeighbours",
    "KReciprocalPoint",
    "PeerMethod",
    "ShortlistMethod",
    "ShortlistPoint",
    "alpha_dba_qe",
    "alpha_qe",
    "alpha_tim",
    "aqe",
    "aqe_wd",
    "bd_cspn",
    "best_point",
    "candidate_neighbours",
    "diffusion_rerank",
    "dqe",
    "fewshot_k_reciprocal",
    "gnn_rerank",
    "hard_margin_dual",
    "k_reciprocal",
    "krecip_grid",
    "laplacianshot",
    "peer_method",
    "pt_map",
    "shortlist_grids",
    "shortlist_method",
    "simpleshot",
    "superglobal_rerank",
    "tim_gd",
    "topk_search",
]
