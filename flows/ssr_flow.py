"""The entry flow ``ssr``: deployments read ``ssr/<name>``."""

from __future__ import annotations

import logging
from typing import Literal

from prefect import flow

from flows.fewshot import fewshot_pipeline
from flows.retrieval import retrieval_pipeline
from ssr_tasks.config import FewShotParams, RetrievalParams


@flow(name="ssr", log_prints=True)
def ssr(
    pipeline: Literal["fewshot", "retrieval"] = "fewshot",
    fewshot: FewShotParams = FewShotParams(),
    retrieval: RetrievalParams = RetrievalParams(),
) -> dict:
    """SSR re-ranking: reproduce the few-shot or the retrieval table.

    Pick ``pipeline`` and edit the matching parameter group; the other group is ignored.
    """
    # The plain code logs progress through the standard loggers of these packages; Prefect
    # forwards them (PREFECT_LOGGING_EXTRA_LOGGERS) when their level lets INFO through.
    for name in ("ssr_tasks", "flows"):
        logging.getLogger(name).setLevel(logging.INFO)
    if pipeline == "fewshot":
        return fewshot_pipeline(fewshot)
    return retrieval_pipeline(retrieval)
