"""Resuming training loops: one checkpoint format and one finished-marker for all of them.

The few-shot curriculum stages, retrieval SSR training and backbone pretraining each save
a ``TrainingCheckpoint`` (their modules' and optimisers' states plus a ``LoopState``) at
their checkpoint points, and write a JSON summary as a finished-marker when done. A rerun
returns the summary of a finished loop, resumes an interrupted one from its checkpoint,
and starts the others from scratch. All writes are atomic (temp file + rename).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from storage.atomic import atomic_write_text
from storage.checkpoints import save_checkpoint

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


@dataclass
class LoopState:
    """Progress of a loop: ``done`` iterations (or epochs), the best validation score so far
    and the validation history (one JSON-able row per validation)."""

    done: int = 0
    best: float = float("-inf")
    history: list[dict] = field(default_factory=list)


class TrainingCheckpoint:
    """``path`` holds the states of ``stateful`` (by name) and a LoopState."""

    def __init__(self, path: Path, **stateful: Stateful):
        self.path = Path(path)
        self.stateful = stateful

    def restore(self) -> LoopState | None:
        """Load the saved states into the objects; None when there is no usable checkpoint."""
        if not self.path.exists():
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or set(saved.get("states", {})) != set(self.stateful):
            log.warning("%s: not a checkpoint of %s; starting over", self.path, sorted(self.stateful))
            return None
        for name, obj in self.stateful.items():
            obj.load_state_dict(saved["states"][name])
        return LoopState(int(saved["done"]), float(saved["best"]), json.loads(saved["history"]))

    def save(self, state: LoopState) -> None:
        save_checkpoint(
            self.path,
            {
                "states": {name: obj.state_dict() for name, obj in self.stateful.items()},
                "done": state.done,
                "best": state.best,
                "history": json.dumps(state.history),
            },
        )

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def finished(marker: Path) -> dict | None:
    """The summary a finished loop left at ``marker``, or None."""
    marker = Path(marker)
    return json.loads(marker.read_text()) if marker.exists() else None


def mark_finished(marker: Path, summary: dict) -> dict:
    atomic_write_text(Path(marker), json.dumps(summary))
    return summary


def stalled(history: list[dict], key: str, patience: int) -> bool:
    """Whether the last ``patience`` validations of ``history`` brought no new best ``key``
    (0: never). Computed from the history, so a resumed loop decides the same way."""
    if patience <= 0 or not history:
        return False
    best_at = max(range(len(history)), key=lambda i: (history[i][key], -i))
    return len(history) - 1 - best_at >= patience
