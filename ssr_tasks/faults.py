"""Loading trained weights with clear errors, and a test-only fault-injection hook.

``load_weights`` puts a state dict into a model and, when the file does not fit, says
which file, what it holds and what the model expects (architecture, hidden width...).

``maybe_kill`` is inert unless ``SSR_FAULT_DIR`` is set (tests set it before Ray starts,
so Ray workers inherit it): when the marker file ``$SSR_FAULT_DIR/<point>`` exists, the
first process to reach ``point`` removes the marker and SIGKILLs itself, like an
out-of-memory kill or a lost node would. It lets the reliability tests kill a Ray actor or
a Tune trial at an exact point, once.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

FAULT_DIR_ENV = "SSR_FAULT_DIR"


def maybe_kill(point: str) -> None:
    """SIGKILL this process once if ``$SSR_FAULT_DIR/<point>`` exists (test-only)."""
    root = os.environ.get(FAULT_DIR_ENV)
    if not root:
        return
    try:
        (Path(root) / point).unlink()  # only one process wins the unlink
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def load_weights(model, path: str | os.PathLike, what: str) -> None:
    """Load the state dict at ``path`` into ``model``; ``what`` describes the model expected.

    Raises ValueError naming the file and the mismatch (missing/unexpected keys or the
    first tensor whose shape differs, e.g. a checkpoint of another hidden width).
    """
    from storage.checkpoints import load_state_dict

    state = load_state_dict(Path(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: not a state dict of {what}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, {what} expects {tuple(own[key].shape)}")
    model.load_state_dict(state)
