"""The authors' released SSR model (``netSSRBest.pth``: ``{"netFeat", "SSR", "nbStep"}``)
unpacked into the pipeline's own files: a backbone state dict and SSR weights (plain code,
no services).

Nothing in the checkpoint says which backbone it holds or the DNI step size: the backbone
is ``params.backbone`` (checked key by key; the error names the backbone the keys do fit),
the hidden width is read from the DNI weights and checked against the episode shape, and
the step size is the one the model is run with (the authors' test script: 1e-3 unless told).
"""

from __future__ import annotations

import os
from pathlib import Path

from ssr_model import FewShotSSR
from ssr_model.fewshot import fewshot_dni_input_dim
from ssr_tasks.backbone import backbone_from_state
from ssr_tasks.fewshot.handoffs import ReleasedModel
from ssr_tasks.handoffs import Backbone
from storage.checkpoints import file_sha256, load_ssr_checkpoint, save_checkpoint

_HIDDEN_KEY = "dni_support.layer1.1.weight"  # Linear(d_in, hidden) of the support DNI


def check_ssr_state(state: dict, n_way: int, n_query: int, steps: int, source: str) -> int:
    """The DNI hidden width of an SSR state dict made for ``n_way``-way episodes with
    ``n_query`` queries per class; a ValueError naming ``source`` when it is not one."""
    weight = state.get(_HIDDEN_KEY)
    if weight is None or weight.dim() != 2:
        raise ValueError(
            f"{source}: SSR has no 2-D {_HIDDEN_KEY} (expected the authors' SSR state dict: scale_cls, "
            "dni_support.*, dni_query.*)"
        )
    hidden, d_in = weight.shape
    want = fewshot_dni_input_dim(n_way, n_way * n_query)
    if d_in != want:
        raise ValueError(
            f"{source}: SSR's DNI takes {d_in} inputs; n_way={n_way} with n_query={n_query} per class "
            f"needs {want} (the authors' models: 5-way, 15 queries per class)"
        )
    own = FewShotSSR(1, n_way, n_way * n_query, steps, hidden=int(hidden)).state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(
            f"{source}: SSR does not fit FewShotSSR(hidden={hidden}): missing {missing[:2]}, "
            f"unexpected {unexpected[:2]}, other shapes {bad[:2]}"
        )
    return int(hidden)


def check_released(
    checkpoint: str | os.PathLike, backbone: str, dataset: str, n_way: int, n_query: int
) -> tuple[dict, int]:
    """The checkpoint's parts and DNI hidden width; ValueError (naming the file, the part and
    what was expected) when its netFeat is no ``backbone`` or its SSR no model for the episodes."""
    source = os.fspath(checkpoint)
    ck = load_ssr_checkpoint(checkpoint)
    backbone_from_state(ck["netFeat"], backbone, dataset, f"{source} (netFeat)")
    return ck, check_ssr_state(ck["SSR"], n_way, n_query, ck["nbStep"], f"{source} (SSR)")


def unpack_released(
    checkpoint: str | os.PathLike, backbone: str, dataset: str, n_way: int, n_query: int, out_dir: Path
) -> ReleasedModel:
    """Check ``checkpoint`` against ``backbone`` (for ``dataset`` images) and the episode
    shape, and write its two parts under ``out_dir/released-<hash>/`` (atomic writes)."""
    ck, hidden = check_released(checkpoint, backbone, dataset, n_way, n_query)
    out = Path(out_dir) / f"released-{file_sha256(Path(checkpoint))[:12]}"
    backbone_path, ssr_path = out / f"{backbone}.pt", out / "ssr.pt"
    if not backbone_path.exists():
        save_checkpoint(backbone_path, ck["netFeat"])
    if not ssr_path.exists():
        save_checkpoint(ssr_path, ck["SSR"])
    return ReleasedModel(
        str(Path(checkpoint).resolve()),
        Backbone(str(backbone_path), backbone, dataset),
        str(ssr_path),
        int(ck["nbStep"]),
        hidden,
    )
