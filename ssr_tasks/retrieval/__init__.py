"""The retrieval track: SSR training on retrieval sequences, initial rankings and top-K
stores, re-ranking of every shard by Ray actors, revisited mAP, their Prefect tasks and report."""
