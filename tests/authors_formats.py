"""Small files in the published formats of the SSR/SIB authors and the data sets'
maintainers, built byte by byte the way the originals are (tests/storage, tests/tasks):

- CIFAR-100 python pickles: written by Python 2 (protocol 2, ``str`` as BINSTRING, numpy
  arrays through ``numpy.core.multiarray._reconstruct``), in ``cifar-100-python.tar.gz``;
- ``cifar-fs-splits.zip``: ``cifar-fs-splits/{train,val,test}.txt`` and ``val1000Episode_*``
  JSON files (SIB format);
- ``Mini-ImageNet.zip``: ``Mini-ImageNet/{train_train,train_val,train_test,val,test}/``;
- ``netSSRBest.pth``: ``{"netFeat": state_dict, "SSR": state_dict, "nbStep": int}``.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The standard library's member checks where this Python has them (3.11.4+); these
# archives are made by the tests themselves.
TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickles as Python 2 wrote them: every str/bytes is a byte string
    (SHORT_BINSTRING / BINSTRING) and numpy globals live in ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "builtins").replace("numpy._core", "numpy.core")
        module = "__builtin__" if module == "builtins" else module
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode("ascii"))
        self.memoize(obj)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _zip(members: dict[str, bytes | str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@dataclass(frozen=True)
class CifarFixture:
    """A tiny CIFAR-100: ``names`` fine labels, ``per_class`` train and test images each.

    rows[part] = (data (N, 3072) uint8, fine_labels, filenames) as written in the pickles.
    """

    names: tuple[str, ...]
    rows: dict

    def filenames(self, cls: str) -> list[str]:
        """``<name>.jpg`` of the images of class ``cls`` (test pickle first)."""
        label = self.names.index(cls)
        out = []
        for part in ("test", "train"):
            _, labels, files = self.rows[part]
            out += [f.rsplit(".", 1)[0] + ".jpg" for f, lb in zip(files, labels) if lb == label]
        return out

    def picture(self, part: str, row: int) -> np.ndarray:
        """(32, 32, 3) uint8 of one row."""
        return self.rows[part][0][row].reshape(3, 32, 32).transpose(1, 2, 0)

    def tarball(self) -> bytes:
        meta = {"fine_label_names": list(self.names), "coarse_label_names": ["all"]}
        members = {"cifar-100-python/meta": py2_pickle(meta)}
        for part, (data, labels, files) in self.rows.items():
            members[f"cifar-100-python/{part}"] = py2_pickle(
                {
                    "filenames": list(files),
                    "batch_label": f"{part} batch",
                    "fine_labels": list(labels),
                    "coarse_labels": [0] * len(labels),
                    "data": data,
                }
            )
        return _tar_gz(members)


def cifar_fixture(names: tuple[str, ...], per_class: int = 6, seed: int = 0) -> CifarFixture:
    """Smooth random pictures (JPEG-friendly), labels interleaved as in CIFAR-100."""
    rng = np.random.default_rng(seed)
    rows = {}
    for part, offset in (("train", 0), ("test", 500)):
        labels = [c for _ in range(per_class) for c in range(len(names))]
        coarse = rng.integers(0, 256, (len(labels), 3, 4, 4)).astype(np.uint8)
        data = np.stack(
            [
                np.asarray(Image.fromarray(c.transpose(1, 2, 0), "RGB").resize((32, 32), Image.BILINEAR))
                .transpose(2, 0, 1)
                .reshape(-1)
                for c in coarse
            ]
        )
        files = [f"{names[lb]}_s_{offset + i:06d}.png" for i, lb in enumerate(labels)]
        rows[part] = (data, labels, files)
    return CifarFixture(tuple(names), rows)


def episodes_json(
    split_classes: dict[str, list[str]], n_episodes: int, n_way: int, n_shot: int, n_query: int, seed: int = 0
) -> str:
    """SIB fixed episodes: ``[{"Support": [[<class>/<file>] * n_shot] * n_way, "Query": ...}]``."""
    rng = np.random.default_rng(seed)
    classes = sorted(split_classes)
    out = []
    for _ in range(n_episodes):
        ways = rng.choice(len(classes), n_way, replace=False)
        sup, qry = [], []
        for w in ways:
            cls = classes[w]
            pick = rng.choice(len(split_classes[cls]), n_shot + n_query, replace=False)
            files = [f"{cls}/{split_classes[cls][i]}" for i in pick]
            sup.append(files[:n_shot])
            qry.append(files[n_shot:])
        out.append({"Support": sup, "Query": qry})
    return json.dumps(out)


def cifar_fs_splits_zip(splits: dict[str, list[str]], episode_files: dict[str, str]) -> bytes:
    """``cifar-fs-splits/{train,val,test}.txt`` (one class per line) and episode JSONs."""
    members: dict[str, bytes | str] = {f"cifar-fs-splits/{s}.txt": "\n".join(c) + "\n" for s, c in splits.items()}
    members.update({f"cifar-fs-splits/{name}": text for name, text in episode_files.items()})
    return _zip(members)


def mini_imagenet_zip(
    n_classes: dict[str, int], per_class: int = 4, size: int = 84, seed: int = 0, extra: dict[str, str] | None = None
) -> bytes:
    """``Mini-ImageNet/<folder>/n0XXXXXXX/<8 digits>.jpg`` for each folder in ``n_classes``
    (train_train, train_val, train_test, val, test), ``size`` square RGB JPEGs; ``extra``:
    more members (name -> text) under ``Mini-ImageNet/``."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes | str] = {}
    wnid = 1000000
    for folder, n in n_classes.items():
        for _ in range(n):
            wnid += 1
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(buf, format="JPEG")
                members[f"Mini-ImageNet/{folder}/n0{wnid}/{wnid * 100 + i:08d}.jpg"] = buf.getvalue()
    for name, text in (extra or {}).items():
        members[f"Mini-ImageNet/{name}"] = text
    return _zip(members)


def save_ssr_checkpoint(path, net_feat: dict, ssr: dict, nb_step: int) -> None:
    """``netSSRBest.pth`` as the authors' few_shot_train.py saves it."""
    import torch

    torch.save({"netFeat": net_feat, "SSR": ssr, "nbStep": nb_step}, path)


def build_authors_cifar_fs(base):
    """A CIFAR-FS built from authors'-format CIFAR-100 pickles by ``storage.cifar_fs`` under
    ``base`` (5 train, 5 val, 5 test classes of 8 JPEGs), with the authors' fixed validation
    episodes ``val1000Episode_5_way_1_shot_3_query.json`` (4 episodes), and a
    ``netSSRBest.pth``: a conv4-64 with moved BatchNorm statistics and a 2-step SSR (hidden
    24) for 5-way, 3-query episodes. Returns (data root, checkpoint path, netFeat state, SSR state)."""
    import torch

    from ssr_model import FewShotSSR
    from ssr_model.backbones import build_backbone
    from storage.cifar_fs import build_cifar_fs

    splits = {
        "train": ["apple", "bear", "cattle", "crab", "dog"],
        "val": ["butterfly", "lion", "shark", "tiger", "whale"],
        "test": ["bus", "plain", "rose", "television", "tulip"],
    }
    fixture = cifar_fixture(tuple(sorted(sum(splits.values(), []))), per_class=4)
    with tarfile.open(fileobj=io.BytesIO(fixture.tarball())) as tf:
        tf.extractall(base, **TAR_FILTER)
    (base / "splits").mkdir()
    for split, classes in splits.items():
        (base / "splits" / f"{split}.txt").write_text("\n".join(classes) + "\n")
    val = {c: fixture.filenames(c) for c in splits["val"]}
    (base / "splits" / "val1000Episode_5_way_1_shot_3_query.json").write_text(episodes_json(val, 4, 5, 1, 3))
    root = build_cifar_fs(base / "cifar-100-python", base / "splits", base / "data" / "cifar-fs")

    torch.manual_seed(0)
    net = build_backbone("conv4-64", 32)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    ssr = FewShotSSR(256, 5, 15, steps=2, lr_dni=1e-3, hidden=24)
    checkpoint = base / "netSSRBest.pth"
    save_ssr_checkpoint(checkpoint, net.state_dict(), ssr.state_dict(), 2)
    return root, checkpoint, net.state_dict(), ssr.state_dict()
