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
    data, bb, train = params.data, params.backbone, params.train
    spec = spec_name(data.dataset)
    root = None
    if data.dataset != "glyphs":  # the built-in data is made by the run itself
        root = Path(data.data_root).expanduser()
        val = [list_split(root, split) for split in ("train", "val", "test")][1]
        episodes = (Path(data.val_episodes_json) if data.val_episodes_json
                    else find_val_episodes(root, train.n_way, train.n_shot, train.n_query))
        if episodes is not None:
            read_episode_json(episodes, val)
    if bb.released_checkpoint:
        check_released(bb.released_checkpoint, bb.name, spec, train.n_way, train.n_query)
    elif bb.checkpoint == "released":
        if root is None:
            raise ValueError("backbone_checkpoint: 'released' needs a real dataset (the authors released no glyph "
                             "backbones); give a path or leave it empty")
        load_backbone(bb.name, spec, released_backbone(root.resolve().parent / "backbones", spec, bb.name))
    elif bb.checkpoint:
        load_backbone(bb.name, spec, Path(bb.checkpoint))
