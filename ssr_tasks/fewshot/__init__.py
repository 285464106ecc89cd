"""The few-shot track: episodes, SSR training with the steps curriculum, evaluation of
Baseline / k-reciprocal / SSR on test episodes, their Ray parts, Prefect tasks and report."""
