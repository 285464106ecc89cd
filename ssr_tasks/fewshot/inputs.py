"""The checks a few-shot run would fail on, done before it starts (``ssr run`` exits 2 on
them with one line): the dataset layout, the fixed validation episodes, and the backbone or
released checkpoint against ``backbone``. Plain code; each check raises ValueError naming
the file, the field and what was expected.
"""
from __future__ import annotations

from pathlib import Path

from ssr_tasks.backbone import load_backbone, spec_name
from ssr_tasks.config import FewShotParams
from ssr_tasks.fewshot.released import check_released
from storage.checkpoints import released_backbone
from storage.fewshot import find_val_episodes, list_split, read_episode_json


def check_inputs(params: FewShotParams) -> None:
    """Raise ValueError on the first input of ``params`` a run would refuse."""
    spec = spec_name(params.dataset)
    root = None
    if params.dataset != "glyphs":  # the built-in data is made by the run itself
        root = Path(params.data_root).expanduser()
        val = [list_split(root, split) for split in ("train", "val", "test")][1]
        episodes = (Path(params.val_episodes_json) if params.val_episodes_json
                    else find_val_episodes(root, params.n_way, params.n_shot_train, params.n_query))
        if episodes is not None:
            read_episode_json(episodes, val)
    if params.released_checkpoint:
        check_released(params.released_checkpoint, params.backbone, spec, params.n_way, params.n_query)
    elif params.backbone_checkpoint == "released":
        if root is None:
            raise ValueError("backbone_checkpoint: 'released' needs a real dataset (the authors released no glyph "
                             "backbones); give a path or leave it empty")
        load_backbone(params.backbone, spec, released_backbone(root.resolve().parent / "backbones", spec, params.backbone))
    elif params.backbone_checkpoint:
        load_backbone(params.backbone, spec, Path(params.backbone_checkpoint))
