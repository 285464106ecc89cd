"""Loading trained weights into a model with errors that say what does not fit.

``load_weights`` puts a state dict into a model and, when the file does not fit, names the
file, what it holds and what the model expects (architecture, hidden width...).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from storage.checkpoints import load_state_dict


def load_weights(model: torch.nn.Module, path: str | os.PathLike, what: str) -> None:
    """Load the state dict at ``path`` into ``model``; ``what`` describes the model expected.

    Raises ValueError naming the file and the mismatch (missing/unexpected keys or the
    first tensor whose shape differs, e.g. a checkpoint of another hidden width).
    """
    state = load_state_dict(Path(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a state dict of {what}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, {what} expects {tuple(own[key].shape)}")
    model.load_state_dict(state)
