"""The MLflow adapter against a real SQLite tracking store and registry."""

from __future__ import annotations

import os

import mlflow
import pytest
import torch

from ssr_model import FewShotSSR
from ssr_model.packaged import FewShotClassifier
from ssr_tasks.services import ServiceUnreachable, redact_uri
from ssr_tasks.tracking import Tracker, flatten, metric_name


@pytest.fixture
def tracker(tmp_path):
    return Tracker("test-exp", tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _model():
    torch.manual_seed(0)
    return FewShotClassifier(FewShotSSR(8, 2, 4, 1, hidden=8).eval())


def test_champion_moves_only_when_better_for_same_dataset_and_backbone(tracker):
    tags = {"dataset": "glyphs", "backbone": "conv4-64", "steps": "1"}
    with tracker.run("a"):
        v1 = tracker.log_and_register(_model(), "m", tags, val_metric=50.0)
    assert set(v1.aliases) == {"champion", "champion-glyphs-conv4-64"}
    with tracker.run("b"):
        v2 = tracker.log_and_register(_model(), "m", tags, val_metric=40.0)
    assert v2.aliases == ()
    with tracker.run("c"):
        v3 = tracker.log_and_register(_model(), "m", {**tags, "dataset": "cifar-fs"}, val_metric=90.0)
    assert v3.aliases == ("champion-cifar-fs-conv4-64",)  # another dataset never takes "champion"
    with tracker.run("d"):
        v4 = tracker.log_and_register(_model(), "m", tags, val_metric=60.0)
    assert set(v4.aliases) == {"champion", "champion-glyphs-conv4-64"}
    champ = tracker.client.get_model_version_by_alias("m", "champion")
    assert int(champ.version) == v4.version and champ.tags["val_metric"] == "60.000000"


def test_failed_registration_leaves_no_half_made_version(tracker, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("registry write failed")

    with tracker.run("a"):
        monkeypatch.setattr(tracker.client, "set_registered_model_alias", boom)
        with pytest.raises(RuntimeError, match="registry write failed"):
            tracker.log_and_register(_model(), "m2", {"dataset": "d", "backbone": "b"}, val_metric=1.0)
    assert tracker.client.search_model_versions("name='m2'") == []


def test_registered_model_loads_back_and_classifies(tracker, monkeypatch):
    model = _model()
    with tracker.run("a"):
        reg = tracker.log_and_register(model, "m3", {"dataset": "d", "backbone": "b"}, val_metric=1.0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)  # as a user points MLflow at the registry
    loaded = mlflow.pytorch.load_model("models:/m3@champion")
    support, query = torch.randn(2, 3, 8), torch.randn(4, 8)
    torch.testing.assert_close(loaded(support, query), model(support, query))
    assert loaded.predict(support, query).shape == (4,)
    assert reg.model_uri == "models:/m3/1" and sorted(reg.as_dict()["aliases"]) == ["champion", "champion-d-b"]


def test_unreachable_tracking_server_fails_fast_naming_the_url(tmp_path):
    with pytest.raises(ServiceUnreachable, match=r"http://bob:\*\*\*@127.0.0.1:9"):
        Tracker("x", tmp_path, tracking_uri="http://bob:secret@127.0.0.1:9")


def test_helpers():
    assert redact_uri("http://u:pw@h:1/x") == "http://u:***@h:1/x"
    assert redact_uri("sqlite:///a.db") == "sqlite:///a.db"
    assert flatten({"a": {"b": 1}, "c": [1, 2]}) == {"a.b": "1", "c": "[1, 2]"}
    assert metric_name("acc@1 shot") == "acc_1 shot"


def test_two_stores_in_one_process_stay_apart(tmp_path):
    """Two pipelines with different run folders in one process: each registers into its own
    store, and no MLflow URI is left in the environment for the next one to inherit."""
    env_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    trackers = [
        Tracker("e", tmp_path / name, tracking_uri=f"sqlite:///{tmp_path / name / 'mlflow.db'}") for name in "ab"
    ]
    for i, tracker in enumerate(trackers):
        with tracker.run(f"run {i}"):
            tracker.log_and_register(_model(), f"m-{i}", {"dataset": "d", "backbone": "b"}, val_metric=1.0)
        assert {k: os.environ.get(k) for k in env_before} == env_before
    for i, tracker in enumerate(trackers):
        assert [rm.name for rm in tracker.client.search_registered_models()] == [f"m-{i}"]
        assert len(tracker.client.search_runs([tracker.experiment_id])) == 1


def test_runs_left_running_by_a_killed_process_are_closed(tracker, tmp_path):
    """A flow process killed with SIGKILL cannot end its MLflow runs; the next pipeline on the
    same store ends those of processes that are gone, and only those."""
    import signal
    import socket
    import subprocess
    import sys

    from ssr_tasks.liveness import PROCESS_TAG, process_gone, process_tag

    code = (
        "import sys; from ssr_tasks.tracking import Tracker; t = Tracker('test-exp', None, tracking_uri=sys.argv[1]); "
        "cm = t.run('killed'); r = cm.__enter__(); print(r.info.run_id, flush=True); import time; time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, tracker.uri], stdout=subprocess.PIPE, text=True)
    killed_id = proc.stdout.readline().strip()
    assert tracker.client.get_run(killed_id).info.status == "RUNNING"
    assert not process_gone(tracker.client.get_run(killed_id).data.tags[PROCESS_TAG])  # still alive
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    elsewhere = tracker.client.create_run(
        tracker.experiment_id, run_name="on another host", tags={PROCESS_TAG: "another-host-name:1:1"}
    )
    untagged = tracker.client.create_run(tracker.experiment_id, run_name="opened by another tool")
    with tracker.run("this process") as mine:
        assert tracker.close_orphans() == 1
        statuses = {
            r: tracker.client.get_run(r).info.status
            for r in (killed_id, elsewhere.info.run_id, untagged.info.run_id, mine.info.run_id)
        }
    assert statuses == {
        killed_id: "KILLED",
        elsewhere.info.run_id: "RUNNING",
        untagged.info.run_id: "RUNNING",
        mine.info.run_id: "RUNNING",
    }
    assert process_tag().startswith(f"{socket.gethostname()}:{os.getpid()}:")
    host, pid, start = process_tag().split(":")
    assert process_gone(f"{host}:{pid}:{int(start or 0) + 1}")  # the same pid, another process (a reused pid)


def test_a_model_that_did_not_improve_is_registered_without_moving_any_alias(tracker):
    tags = {"dataset": "own", "backbone": "none", "steps": "1"}
    with tracker.run("untrained wins validation"):
        v1 = tracker.log_and_register(_model(), "m-untrained", tags, val_metric=99.0, promote=False)
    assert v1.aliases == () and v1.version == 1  # registered, but no champion even with an empty registry
    with tracker.run("trained"):
        v2 = tracker.log_and_register(_model(), "m-untrained", tags, val_metric=10.0)
    assert set(v2.aliases) == {"champion", "champion-own-none"}


def test_the_retrieval_report_says_when_ssr_did_not_improve():
    from ssr_tasks.config import RetrievalTrainParams
    from ssr_tasks.handoffs import Trials
    from ssr_tasks.retrieval.handoffs import RetrievalTrial, Validation
    from ssr_tasks.retrieval.report import NOT_IMPROVED, labels_only, ssr_improved

    def trial(best_iteration):
        return RetrievalTrial(
            RetrievalTrainParams(),
            "lr_dni=0.1",
            8,
            0.5,
            "best.pt",
            (Validation(0, 0.5), Validation(10, 0.4)),
            best_iteration,
        )

    assert not ssr_improved(Trials((trial(0),))) and ssr_improved(Trials((trial(10),)))
    assert NOT_IMPROVED == "SSR did not improve on validation; its rows equal the inputs."
    assert labels_only([{"easy": [1], "hard": [], "junk": []}])
    assert not labels_only([{"easy": [1], "hard": [2], "junk": []}])
