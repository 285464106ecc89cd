"""The checks a few-shot run would fail on, done before it starts (``ssr run`` exits 2 on
them with one line): the dataset layout, the fixed validation episodes, and the backbone or
released checkpoint against ``backbone``. Plain code; each check raises ValueError naming
the file, the field and what was expected.
"""

from __future__ import annotations

from pathlib import Path

from ssr_tasks.backbone import load_backbone, spec_name
from ssr_tasks.config import FewShotParams, default_run_dir
from ssr_tasks.fewshot.episodes import load_split
from ssr_tasks.fewshot.released import check_released
from ssr_tasks.handoffs import required
from storage.checkpoints import released_backbone
from storage.fewshot import find_val_episodes, list_split, read_episode_json
from storage.image_folder import list_image_folder, verify_images
from storage.own_data import check_usable, import_fewshot_table


def check_inputs(params: FewShotParams, run_dir: Path | None = None) -> None:
    """Raise ValueError on the first input of ``params`` a run would refuse.

    An embeddings table (``dataset: features``) is imported here, once, into
    ``<run_dir>/fewshot`` (the run reuses the import) and its splits are checked for n_way
    usable classes; every image of an image folder is opened."""
    data, bb, train = params.data, params.backbone, params.train
    if data.entry.loader == "features":
        imported = import_fewshot_table(
            required(data.data_root, "data.data_root"), Path(run_dir or default_run_dir()) / "data" / "features"
        )
        need = {
            "train": train.n_shot + train.n_query,
            "val": train.n_shot + train.n_query,
            "test": max(params.evaluation.eval_shots) + train.n_query,
        }
        for split, min_count in need.items():
            if imported.counts.get(split, 0) == 0:
                raise ValueError(f"{data.data_root}: split: no rows of split {split!r} (expected train, val and test)")
            table = load_split(imported.path, split)
            check_usable(split, [table.classes[c] for c in table.labels], train.n_way, min_count, str(data.data_root))
        return
    if data.dataset == "image-folder":
        for index in list_image_folder(required(data.data_root, "data.data_root")).values():
            verify_images(index)
    spec = spec_name(data.dataset)
    root = None
    if data.dataset != "glyphs":  # the built-in data is made by the run itself
        root = Path(required(data.data_root, "data.data_root")).expanduser()
        val = [list_split(root, split) for split in ("train", "val", "test")][1]
        episodes = (
            Path(data.val_episodes_json)
            if data.val_episodes_json
            else find_val_episodes(root, train.n_way, train.n_shot, train.n_query)
        )
        if episodes is not None:
            read_episode_json(episodes, val)
    if bb.released_checkpoint:
        check_released(bb.released_checkpoint, bb.name, spec, train.n_way, train.n_query)
    elif bb.checkpoint == "released" and data.dataset != "image-folder":
        if root is None:
            raise ValueError(
                "backbone_checkpoint: 'released' needs a real dataset (the authors released no glyph "
                "backbones); give a path or leave it empty"
            )
        load_backbone(bb.name, spec, released_backbone(root.resolve().parent / "backbones", spec, bb.name))
    elif bb.checkpoint:
        load_backbone(bb.name, spec, Path(bb.checkpoint))
