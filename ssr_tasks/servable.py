"""The registered models' MLflow flavour: saving an SSR model as a servable MLflow model and
logging it as a LoggedModel of a run, through an ``MlflowClient`` only.

MLflow's ``Model.log`` / ``mlflow.pytorch.log_model`` read the process-wide tracking URI and
active experiment (``mlflow.set_tracking_uri``, ``mlflow.set_experiment``), which would make
two pipelines in one process share a store. ``log_servable`` does the same steps with the
client's public methods instead: ``create_logged_model`` -> ``log_outputs`` (the run's model
output) -> metrics of step 0 linked to the model (``log_batch`` with ``model_id``) ->
``mlflow.pytorch.save_model`` into a temporary folder -> ``log_model_artifacts`` ->
``finalize_logged_model`` (READY, or FAILED when a step raised).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssr_tasks import ssr_pyfunc

PROJECT_DIR = Path(__file__).resolve().parent.parent
# What a registered model needs in a fresh environment: pinned versions of what it imports.
# The project itself travels as code (code_paths): ssr_model and the pyfunc loader.
CODE_PATHS = [str(PROJECT_DIR / "ssr_model"), str(Path(ssr_pyfunc.__file__))]
MODEL_NAME = "model"  # the LoggedModel's name (MLflow's ``log_model(name=...)``)


def pip_requirements() -> list[str]:
    import mlflow  # lazy: MLflow takes seconds to import; only the steps that track pay for it (tracking)

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]


def model_signature(model: Any):
    """Named float32 tensor inputs (``ssr_pyfunc.input_shapes``) -> int64 class ids (n,) or
    re-ranked positions (B, k)."""
    from mlflow.models.signature import ModelSignature  # lazy: MLflow, see pip_requirements
    from mlflow.types.schema import Schema, TensorSpec

    inputs = Schema(
        [TensorSpec(np.dtype(np.float32), shape, name) for name, shape in ssr_pyfunc.input_shapes(model).items()]
    )
    out_shape = (-1, model.ssr.k) if hasattr(model, "rerank") else (-1,)
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.int64), out_shape)]))


def save_servable(model: Any, path: str, mlflow_model: Any = None) -> None:
    """Save ``model`` at ``path`` (a folder that must not exist yet): MLflow's pytorch flavor
    (pickled, with its class, so ``mlflow.pytorch.load_model`` gives the nn.Module back) whose
    ``python_function`` flavor is served by ``ssr_pyfunc`` (dict inputs, any number of
    queries), a signature, an input example, ``ssr_model`` as code and pinned requirements.
    ``mlflow_model``: the ``mlflow.models.Model`` to fill in (ids of the logged model)."""
    import mlflow.pytorch  # lazy: MLflow, see pip_requirements
    from mlflow.models import Model

    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    mlflow.pytorch.save_model(
        model,
        path,
        mlflow_model=mlflow_model,
        serialization_format="pickle",
        code_paths=CODE_PATHS,
        pip_requirements=pip_requirements(),
        signature=model_signature(model),
        input_example=ssr_pyfunc.input_example(model),
    )
    mlflow_model.flavors["python_function"]["loader_module"] = "ssr_pyfunc"
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _link_step_metrics(client: Any, run_id: str, model_id: str, step: int) -> None:
    """The run's metrics at ``step`` become metrics of the logged model too (as ``Model.log`` does)."""
    from mlflow.entities import Metric  # lazy: MLflow, see pip_requirements

    linked = [
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id)
        for key in client.get_run(run_id).data.metrics
        for m in client.get_metric_history(run_id, key)
        if m.step == step and m.model_id is None
    ]
    if linked:
        client.log_batch(run_id, metrics=linked)


def log_servable(client: Any, experiment_id: str, run_id: str, model: Any, step: int = 0) -> Any:
    """Log ``model`` (``save_servable``) as a LoggedModel output of the run ``run_id``, with
    the run's params and its metrics at ``step``. Returns MLflow's ``ModelInfo``
    (``model_uri`` ``models:/<model_id>``, ``model_id``, ``run_id``)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus  # lazy: MLflow, see pip_requirements
    from mlflow.models import Model

    params = {key: str(value) for key, value in client.get_run(run_id).data.params.items()}
    logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id, params=params)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
        _link_step_metrics(client, run_id, logged.model_id, step)
        mlflow_model = Model(
            artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id, model_id=logged.model_id
        )
        with tempfile.TemporaryDirectory(prefix="ssr-model-") as tmp:
            local = os.path.join(tmp, MODEL_NAME)
            save_servable(model, local, mlflow_model)
            client.log_model_artifacts(logged.model_id, local)
    except BaseException:
        with contextlib.suppress(Exception):  # the step's own error is the one to report
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    logged = client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return mlflow_model.get_model_info(logged)
