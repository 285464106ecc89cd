"""Few-shot SSR training with the steps curriculum (SSR_METHOD.md section 5).

Plain code, no services: ``train_curriculum`` runs stage steps=1, then steps=2 from the
steps=1 best model, ... up to ``max_steps``. Each stage checkpoints every validation so an
interrupted trial resumes exactly where it stopped (model, optimiser and RNG state), and
a finished stage is skipped on rerun.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ssr_model import FewShotSSR
from ssr_model.losses import fewshot_cross_entropy
from ssr_tasks.episodes import EpisodeIndices, SplitFeatures, gather

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    feat_dim: int
    n_way: int = 5
    n_shot: int = 1
    n_query: int = 15
    hidden: int = 1024
    lr_dni: float = 1e-3
    max_steps: int = 3
    iterations_first: int = 1500
    iterations_next: int = 500
    lr_first: float = 0.1
    lr_next: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_episodes: int = 4
    val_every: int = 250
    seed: int = 0

    def build(self, steps: int) -> FewShotSSR:
        return FewShotSSR(self.feat_dim, self.n_way, self.n_way * self.n_query, steps, lr_dni=self.lr_dni, hidden=self.hidden)

    def stage_schedule(self, steps: int) -> tuple[int, float, int | None]:
        """(iterations, lr, decay iteration) of a stage: lr x0.1 after 1/6 of stage 1 (5k of 30k)."""
        if steps == 1:
            return self.iterations_first, self.lr_first, max(1, self.iterations_first // 6)
        return self.iterations_next, self.lr_next, None


@torch.no_grad()
def evaluate(model: FewShotSSR, split: SplitFeatures, episodes: EpisodeIndices, device, batch: int = 64) -> np.ndarray:
    """Per-episode accuracy (fractions) of ``model`` on fixed episodes."""
    model.eval()
    accs = []
    for start in range(0, len(episodes), batch):
        support, query, labels = gather(split, episodes.chunk(start, start + batch), device)
        scores = model(support, query)
        accs.append((scores.argmax(-1) == labels).float().mean(-1).cpu().numpy())
    return np.concatenate(accs)


def _save(path: Path, obj: dict) -> None:
    from storage.checkpoints import save_checkpoint

    save_checkpoint(path, obj)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def train_stage(
    cfg: TrainConfig,
    steps: int,
    train: SplitFeatures,
    val: SplitFeatures,
    val_episodes: EpisodeIndices,
    stage_dir: Path,
    init_state: dict | None,
    device: torch.device,
    report: Callable[[dict], None] | None = None,
) -> dict:
    """Train one curriculum stage; returns {"best_val", "best_path", "history"}."""
    from ssr_tasks.episodes import sample_episodes

    stage_dir.mkdir(parents=True, exist_ok=True)
    done = stage_dir / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    iterations, lr, decay_at = cfg.stage_schedule(steps)
    model = cfg.build(steps).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    start, best_val, history = 0, -1.0, []
    episode_seed = cfg.seed * 1000 + steps
    last = stage_dir / "last.pt"
    if last.exists():
        state = _load(last)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, best_val = int(state["iteration"]), float(state["best_val"])
        history = json.loads(state["history"])
        log.info("steps=%d: resuming at iteration %d (best val %.2f%%)", steps, start, 100 * best_val)
    for it in range(start, iterations):
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 if decay_at is not None and it >= decay_at else 1.0)
        model.train()
        # Episodes are a pure function of (seed, iteration): resume reproduces them exactly.
        batch = sample_episodes(train, cfg.batch_episodes, cfg.n_way, cfg.n_shot, cfg.n_query, seed=episode_seed * 10_000_000 + it)
        support, query, labels = gather(train, batch, device)
        loss = fewshot_cross_entropy(model(support, query), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (it + 1) % cfg.val_every == 0 or it + 1 == iterations:
            accs = evaluate(model, val, val_episodes, device)
            val_acc = float(accs.mean())
            row = {"iteration": it + 1, "steps": steps, "loss": loss.item(), "val_acc": val_acc}
            history.append(row)
            if val_acc > best_val:
                best_val = val_acc
                _save(stage_dir / "best.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
            _save(last, {"model": model.state_dict(), "optim": opt.state_dict(), "iteration": it + 1,
                         "best_val": best_val, "history": json.dumps(history)})
            log.info("steps=%d iteration %d/%d loss %.4f val acc %.2f%% (best %.2f%%)",
                     steps, it + 1, iterations, loss.item(), 100 * val_acc, 100 * best_val)
            if report is not None:
                report({**row, "best_val_acc": best_val})
    result = {"steps": steps, "best_val": best_val, "best_path": str(stage_dir / "best.pt"), "history": history}
    from storage.atomic import atomic_write_text

    atomic_write_text(done, json.dumps(result))
    return result


def train_curriculum(
    cfg: TrainConfig,
    train: SplitFeatures,
    val: SplitFeatures,
    val_episodes: EpisodeIndices,
    out_dir: Path,
    device: torch.device | str = "cpu",
    report: Callable[[dict], None] | None = None,
) -> dict:
    """steps 1 -> ... -> max_steps, each stage from the previous best; returns the summary.

    The summary's ``best`` is the stage with the best validation accuracy (model selection
    on validation episodes only).
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    stages, init_state = [], None
    for steps in range(1, cfg.max_steps + 1):
        res = train_stage(cfg, steps, train, val, val_episodes, out_dir / f"steps{steps}", init_state, device, report)
        stages.append(res)
        init_state = _load(Path(res["best_path"]))
    best = max(stages, key=lambda r: r["best_val"])
    return {"stages": stages, "best_steps": best["steps"], "best_val": best["best_val"], "best_path": best["best_path"]}
