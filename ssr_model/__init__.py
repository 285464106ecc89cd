"""SSR (similarity subgraph re-ranking), pure PyTorch/numpy.

Public API: ``FewShotSSR``, ``RetrievalSSR``, ``DNI``, the losses, ``accuracy_ci95`` and
``revisited_map``; backbones in ``ssr_model.backbones``, baselines in
``ssr_model.baselines``, registry-ready wrappers in ``ssr_model.packaged``.
"""

from ssr_model.dni import DNI
from ssr_model.fewshot import FewShotSSR
from ssr_model.losses import fewshot_cross_entropy, info_bce
from ssr_model.metrics import accuracy_ci95, revisited_map
from ssr_model.retrieval import RetrievalSSR

__all__ = ["DNI", "FewShotSSR", "RetrievalSSR", "accuracy_ci95", "fewshot_cross_entropy", "info_bce", "revisited_map"]
