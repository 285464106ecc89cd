"""Backbone of both tracks: load a released checkpoint, or pretrain one on the base classes;
extract features.

Pretraining follows what the SSR/SIB authors did for tiered-ImageNet: a cosine classifier
over the base (train) classes, cross-entropy, SGD. Each epoch is checkpointed, so an
interrupted pretraining resumes. Plain code, with the ``get_backbone`` Prefect task at the
end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from prefect import get_run_logger, task

from ssr_model.backbones import BACKBONE_NAMES, CosineClassifier, build_backbone
from ssr_tasks.config import BackboneParams, Device
from ssr_tasks.device import local_device
from ssr_tasks.handoffs import Backbone
from ssr_tasks.resume import LoopState, TrainingCheckpoint
from ssr_tasks.taskkit import CACHE, Progress, short_hash
from storage.checkpoints import file_sha256, load_state_dict, released_backbone, save_checkpoint
from storage.features import write_features
from storage.fewshot import DATASET_SPECS, DatasetSpec, SplitIndex, data_identity, list_split, load_images
from storage.image_folder import folder_spec

log = logging.getLogger(__name__)


def _image_cache(index: SplitIndex, spec, limit_bytes: int = 2 << 30) -> np.ndarray | None:
    """All images of a split in memory when they fit in ``limit_bytes`` (the built-in data does)."""
    size = len(index.paths) * spec.channels * spec.image_size * spec.image_size * 4
    if size > limit_bytes:
        return None
    return load_images(index, index.paths, spec)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 4 px (pad + crop), the usual few-shot pretraining augmentation."""
    B, C, H, W = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    dx, dy = torch.randint(0, 9, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + H, dx : dx + W]


def pretrain_backbone(
    data_root: Path,
    dataset: str,
    backbone: str,
    out_path: Path,
    epochs: int = 12,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, float, float], None] | None = None,
) -> Path:
    """Train ``backbone`` + cosine classifier on ``<data_root>/train``; saves the backbone state dict."""
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    device = torch.device(device)
    spec = dataset_spec(dataset)
    index = list_split(Path(data_root), "train")
    cache = _image_cache(index, spec)
    torch.manual_seed(seed)
    net = build_backbone(backbone, spec.image_size, in_channels=spec.channels).to(device)
    head = CosineClassifier(cast(int, net.out_dim), len(index.classes)).to(device)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    ckpt = TrainingCheckpoint(out_path.with_suffix(".last.pt"), net=net, head=head, optim=opt, sched=sched)
    state = ckpt.restore() or LoopState()
    start = state.done
    if start:
        log.info("backbone pretraining: resuming after epoch %d", start)
    labels = torch.from_numpy(index.labels)
    for epoch in range(start, epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(labels), generator=gen)
        net.train()
        head.train()
        total, correct, loss_sum = 0, 0, 0.0
        for start_b in range(0, len(order), batch_size):
            idx = order[start_b : start_b + batch_size]
            if cache is not None:
                x = torch.from_numpy(cache[idx.numpy()])
            else:
                x = torch.from_numpy(load_images(index, [index.paths[i] for i in idx.tolist()], spec))
            x, y = _augment(x, gen).to(device), labels[idx].to(device)
            logits = head(net(x))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
        sched.step()
        acc, mean_loss = correct / total, loss_sum / total
        log.info(
            "backbone %s epoch %d/%d: loss %.3f, train acc %.1f%%", backbone, epoch + 1, epochs, mean_loss, 100 * acc
        )
        ckpt.save(LoopState(done=epoch + 1))
        if progress is not None:
            progress(epoch + 1, epochs, mean_loss, acc)
    save_checkpoint(out_path, {k: v.cpu() for k, v in net.state_dict().items()})
    ckpt.remove()
    return out_path


def _mismatch(net: torch.nn.Module, state: dict) -> str | None:
    """What keeps ``state`` from loading into ``net`` strictly, or None when it fits."""
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        return f"{len(missing)} missing keys, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}"
    return next(
        (
            f"{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            for k, v in state.items()
            if tuple(v.shape) != tuple(own[k].shape)
        ),
        None,
    )


def backbone_from_state(state: dict, backbone: str, dataset: str, source: str) -> torch.nn.Module:
    """``backbone`` for images of ``dataset`` with ``state`` loaded (eval mode), or a
    ValueError naming ``source``, what does not fit and which backbone the keys fit instead."""
    spec = dataset_spec(dataset)

    def build(name: str) -> torch.nn.Module:
        return build_backbone(name, spec.image_size, in_channels=spec.channels)

    net = build(backbone)
    what = _mismatch(net, state)
    if what is None:
        net.load_state_dict(state)
        return net.eval()
    fits = [name for name in BACKBONE_NAMES if name != backbone and _mismatch(build(name), state) is None]
    hint = (
        f"the keys fit {fits[0]}: set backbone={fits[0]}"
        if fits
        else f"the keys fit none of {', '.join(BACKBONE_NAMES)} for {dataset} images"
    )
    raise ValueError(f"{source}: not a {backbone} state dict for {dataset} ({what}); {hint}")


def load_backbone(backbone: str, dataset: str, checkpoint: Path, device="cpu") -> torch.nn.Module:
    """The backbone with the state dict at ``checkpoint`` (SIB / SSR key names), eval mode."""
    return backbone_from_state(load_state_dict(Path(checkpoint)), backbone, dataset, str(checkpoint)).to(device)


@torch.no_grad()
def extract_split_features(net: torch.nn.Module, index: SplitIndex, spec, device, batch_size: int = 256) -> np.ndarray:
    """(N, D) float32 features of every image of a split, in ``index.paths`` order."""
    out = []
    for start in range(0, len(index.paths), batch_size):
        x = torch.from_numpy(load_images(index, index.paths[start : start + batch_size], spec)).to(device)
        out.append(net(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, getattr(net, "out_dim", 0)), np.float32)


def extract_features(
    data_root: Path,
    dataset: str,
    backbone: str,
    checkpoint: Path,
    out_path: Path,
    splits: tuple[str, ...] = ("train", "val", "test"),
    device="cpu",
    batch_size: int = 256,
) -> Path:
    """Features of all splits into one Parquet features table (ids are global row numbers)."""
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    spec = dataset_spec(dataset)
    net = load_backbone(backbone, dataset, checkpoint, device)
    labels, split_col, paths, embs = [], [], [], []
    for split in splits:
        index = list_split(Path(data_root), split)
        feats = extract_split_features(net, index, spec, device, batch_size)
        log.info("features: %s split, %d images, dim %d", split, len(feats), feats.shape[1])
        embs.append(feats)
        labels += [index.classes[c] for c in index.labels]
        split_col += [split] * len(feats)
        paths += list(index.paths)
    emb = np.concatenate(embs)
    ids = np.arange(len(emb), dtype=np.int64)
    meta = {
        "dataset": dataset,
        "backbone": backbone,
        "checkpoint_hash": file_sha256(Path(checkpoint)),
        "dim": str(emb.shape[1]),
    }
    write_features(out_path, ids=ids, labels=labels, splits=split_col, embeddings=emb, paths=paths, metadata=meta)
    return out_path


def spec_name(dataset: str) -> str:
    """The image spec (``storage.fewshot.DATASET_SPECS``) of a paper dataset: the glyph sets share one."""
    return "glyphs" if dataset.startswith("glyphs") else dataset


FOLDER_SPEC = "image-folder:"  # + JSON {"image_size", "mean", "std"}: the spec of a user's image folder


def encode_spec(spec: DatasetSpec) -> str:
    """A user image folder's spec as the string hand-offs carry (Ray trials and Prefect
    results take strings): ``image-folder:{"image_size": .., "mean": [..], "std": [..]}``."""
    return FOLDER_SPEC + json.dumps({"image_size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std)})


def dataset_spec(spec: str) -> DatasetSpec:
    """The DatasetSpec a spec string names: a paper dataset's (``DATASET_SPECS``) or a user
    image folder's (``encode_spec``)."""
    if spec.startswith(FOLDER_SPEC):
        fields = json.loads(spec.removeprefix(FOLDER_SPEC))
        return folder_spec(int(fields["image_size"]), tuple(fields["mean"]), tuple(fields["std"]))
    return DATASET_SPECS[spec]


def spec_params(spec: str) -> dict[str, str]:
    """What a user image folder's spec computed (``data.mean``, ``data.std``, on the [0, 1]
    scale) as run parameters; nothing for a paper dataset's fixed spec."""
    if not spec.startswith(FOLDER_SPEC):
        return {}
    s = dataset_spec(spec)
    return {"data.mean": str([round(m, 6) for m in s.mean]), "data.std": str([round(v, 6) for v in s.std])}


def spec_label(spec: str) -> str:
    """A file-name-safe name of a spec string."""
    return f"image-folder-{short_hash(spec)[:8]}" if spec.startswith(FOLDER_SPEC) else spec


# data_identity(data_root) in the file name: the built-in data is re-rendered in place under the same path.
@task(name="backbone", cache_policy=CACHE, persist_result=True)
def get_backbone(
    backbone: BackboneParams, spec: str, seed: int, data_root: str, work_dir: str, device: Device = "auto"
) -> Backbone:
    """A released checkpoint when given (checked against the architecture; ``"released"``:
    the authors' file for the dataset and backbone under ``<data_root>/../backbones``), else
    pretrain on ``<data_root>/train`` into ``work_dir`` (seeded by ``seed``). spec: the image
    spec of the data (``dataset_spec``)."""
    logger = get_run_logger()
    if backbone.checkpoint:
        path = Path(backbone.checkpoint)
        if backbone.checkpoint == "released":  # the authors' file for (dataset, backbone)
            path = released_backbone(Path(data_root).parent / "backbones", spec, backbone.name)
        load_backbone(backbone.name, spec, path)
        logger.info("backbone: using released checkpoint %s", path)
        return Backbone(str(path.resolve()), backbone.name, spec)
    batch_size, lr = backbone.pretrain_batch_size, backbone.pretrain_lr
    recipe = short_hash([data_identity(data_root), backbone.pretrain_epochs, batch_size, lr, seed])
    out = Path(work_dir) / f"{spec_label(spec)}-{backbone.name}-{recipe}.pt"
    logger.info("backbone: pretraining %s on the base classes for %d epochs", backbone.name, backbone.pretrain_epochs)
    progress = Progress(f"pretrain-{short_hash([work_dir, backbone.name])}", "Backbone pretraining (epochs)")
    path = pretrain_backbone(
        Path(data_root),
        spec,
        backbone.name,
        out,
        epochs=backbone.pretrain_epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=local_device(device),
        progress=progress,
    )
    return Backbone(str(path), backbone.name, spec)
