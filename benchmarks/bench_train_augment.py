"""Cost of one SSR training iteration under each ``train_augment`` mode. Prints a Markdown
table. Not a test.

    python benchmarks/bench_train_augment.py                 # CPU, 2 threads
    python benchmarks/bench_train_augment.py --device cuda

One iteration = one 5-way 1-shot episode with 15 queries per class (80 images, the paper's
batch of one episode): getting its features, then SSR forward + cross-entropy + backward +
SGD step (hidden 4096, steps 1). Features come from

* ``none``: rows of the features table (gather);
* ``views:N``: one of N pre-extracted views per image (gather);
* ``online``: the 80 JPEG images read, augmented as the authors do for CIFAR-FS
  (RandomCrop(32, padding 4), flip, ColorJitter(0.4, 0.4, 0.4)) and passed through the
  frozen backbone (eval mode, no grad).

The images are random 32 x 32 JPEGs in the CIFAR-FS layout (64 classes x 20) written to a
temporary folder; the backbones have random weights (speed does not depend on them).
Median of ``--repeats`` iterations after two warm-up ones.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssr_model.backbones import build_backbone
from ssr_model.losses import fewshot_cross_entropy
from ssr_tasks.config import FewShotTrainParams
from ssr_tasks.fewshot.episodes import SplitFeatures, sample_episodes
from ssr_tasks.fewshot.train_features import OnlineFeatures, TableFeatures, ViewFeatures
from storage.fewshot import list_split


def _images(root: Path, n_classes: int = 64, per_class: int = 20) -> None:
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / "train" / f"class{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")


def _median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn(0)
    times = []
    for it in range(1, repeats + 1):
        t = time.perf_counter()
        fn(it)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--backbones", default="conv4-64,resnet12,wrn-28-10")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _images(root)
        index = list_split(root, "train")
        for name in args.backbones.split(","):
            net = build_backbone(name, 32).to(device).eval()
            D = net.out_dim
            rng = np.random.default_rng(0)
            table = rng.standard_normal((len(index.paths), D)).astype(np.float32)
            split = SplitFeatures(table, index.labels, index.classes, list(index.paths), "bench")
            views = rng.standard_normal((args.views, len(index.paths), D)).astype(np.float32)
            sources = {
                "none": TableFeatures(split),
                f"views:{args.views}": ViewFeatures(split, views, 0),
                "online": OnlineFeatures(split, net, index, "cifar-fs", 0),
            }
            cfg = FewShotTrainParams(hidden=4096, lr_dni=1e-3, max_steps=1, batch_episodes=1)
            model = cfg.build(D, 1).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

            def ssr_step(support, query, labels):
                model.train()
                loss = fewshot_cross_entropy(model(support, query), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            episode = sample_episodes(split, 1, 5, 1, 15, seed=0)
            fixed = sources["none"].gather(episode, 0, device)
            ssr_ms = _median_ms(lambda it: ssr_step(*fixed), args.repeats)
            for mode, source in sources.items():

                def get(it, source=source):
                    out = source.gather(sample_episodes(split, 1, 5, 1, 15, seed=it), it, device)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    return out

                feat_ms = _median_ms(get, args.repeats)
                rows.append((name, D, mode, feat_ms, ssr_ms))
    print(f"device {args.device}, {args.threads} threads, {args.repeats} timed iterations (median)\n")
    print("| backbone (32 px) | D | train_augment | episode features (ms) | SSR step (ms) | iteration (ms) |")
    print("|---|---|---|---|---|---|")
    for name, D, mode, feat_ms, ssr_ms in rows:
        print(f"| {name} | {D} | {mode} | {feat_ms:.1f} | {ssr_ms:.0f} | {feat_ms + ssr_ms:.0f} |")


if __name__ == "__main__":
    main()
