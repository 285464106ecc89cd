"""Few-shot SSR training with the steps curriculum (SSR_METHOD.md section 5).

Plain code, no services: ``train_curriculum`` runs stage steps=1, then steps=2 from the
steps=1 best model, ... up to ``max_steps``. Each stage checkpoints every validation so an
interrupted trial resumes exactly where it stopped (model, optimiser and RNG state), and
a finished stage is skipped on rerun.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ssr_model import FewShotSSR
from ssr_model.losses import fewshot_cross_entropy
from ssr_tasks.config import FewShotTrainParams, query_balance_alpha
from ssr_tasks.fewshot.episodes import EpisodeIndices, SplitFeatures, gather, sample_balanced_or_dirichlet
from ssr_tasks.fewshot.train_features import EpisodeFeatures, TableFeatures
from ssr_tasks.resume import LoopState, TrainingCheckpoint, finished, mark_finished, stalled
from storage.checkpoints import load_state_dict, save_checkpoint

log = logging.getLogger(__name__)


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


def _source(train: SplitFeatures | EpisodeFeatures) -> EpisodeFeatures:
    return TableFeatures(train) if isinstance(train, SplitFeatures) else train


def train_stage(
    cfg: FewShotTrainParams,
    steps: int,
    train: SplitFeatures | EpisodeFeatures,
    val: SplitFeatures,
    val_episodes: EpisodeIndices,
    stage_dir: Path,
    init_state: dict | None,
    device: torch.device,
    report: Callable[[dict], None] | None = None,
) -> dict:
    """Train one curriculum stage; returns {"steps", "best_val", "best_path", "history"}.

    train: the train split's features, or a source of episode features (``train_augment``,
    ``ssr_tasks.fewshot.train_features``) whose ``split`` the episodes are drawn from.
    """
    train = _source(train)
    stage_dir.mkdir(parents=True, exist_ok=True)
    done = stage_dir / "done.json"
    summary = finished(done)
    if summary is not None:  # its folder may have moved (a restored Tune checkpoint): the path is the folder's
        return {**summary, "best_path": str(stage_dir / "best.pt")}
    iterations, lr, decay_at = cfg.stage_schedule(steps)
    model = cfg.build(val.dim, steps).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )
    episode_seed = cfg.seed * 1000 + steps
    alpha = query_balance_alpha(cfg.trained_balance)  # imbalanced training queries, as the test's (train.query_balance)
    ckpt = TrainingCheckpoint(stage_dir / "last.pt", model=model, optim=opt)
    state = ckpt.restore()
    if state is None:
        state = LoopState(best=-1.0)
    else:
        log.info("steps=%d: resuming at iteration %d (best val %.2f%%)", steps, state.done, 100 * state.best)
    for it in range(state.done, iterations):
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 if decay_at is not None and it >= decay_at else 1.0)
        model.train()
        # Episodes are a pure function of (seed, iteration): resume reproduces them exactly.
        batch = sample_balanced_or_dirichlet(
            train.split,
            cfg.batch_episodes,
            cfg.n_way,
            cfg.n_shot,
            cfg.n_query,
            alpha,
            seed=episode_seed * 10_000_000 + it,
        )
        support, query, labels = train.gather(batch, episode_seed * 10_000_000 + it, device)
        loss = fewshot_cross_entropy(model(support, query), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (it + 1) % cfg.val_every == 0 or it + 1 == iterations:
            accs = evaluate(model, val, val_episodes, device)
            val_acc = float(accs.mean())
            row = {"iteration": it + 1, "steps": steps, "loss": loss.item(), "val_acc": val_acc}
            state.history.append(row)
            if val_acc > state.best:
                state.best = val_acc
                save_checkpoint(stage_dir / "best.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
            state.done = it + 1
            ckpt.save(state)
            log.info(
                "steps=%d iteration %d/%d loss %.4f val acc %.2f%% (best %.2f%%)",
                steps,
                it + 1,
                iterations,
                loss.item(),
                100 * val_acc,
                100 * state.best,
            )
            if report is not None:
                report({**row, "best_val_acc": state.best})
            if stalled(state.history, "val_acc", cfg.patience):
                log.info(
                    "steps=%d: no new best validation accuracy for %d validations; stage stops at iteration %d",
                    steps,
                    cfg.patience,
                    it + 1,
                )
                break
    summary = mark_finished(
        done,
        {"steps": steps, "best_val": state.best, "best_path": str(stage_dir / "best.pt"), "history": state.history},
    )
    ckpt.remove()  # a finished stage keeps its best weights only (Tune checkpoints copy the folder)
    return summary


def train_curriculum(
    cfg: FewShotTrainParams,
    train: SplitFeatures | EpisodeFeatures,
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
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    stages, init_state = [], None
    for steps in range(1, cfg.max_steps + 1):
        res = train_stage(cfg, steps, train, val, val_episodes, out_dir / f"steps{steps}", init_state, device, report)
        stages.append(res)
        init_state = load_state_dict(Path(res["best_path"]))
    best = max(stages, key=lambda r: r["best_val"])
    return {"stages": stages, "best_steps": best["steps"], "best_val": best["best_val"], "best_path": best["best_path"]}
