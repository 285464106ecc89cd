"""Distractors appended to the test database (``data.distractors`` / ``data.distractors_path``).

Glyphs: N renderings of characters that are neither queried nor trained on, embedded by
the run's backbone block by block (``storage.glyphs.distractors``). Published features
(rOxford5k / rParis6k, a user's tables): a file of distractor features, e.g. the
revisitop 1M, appended as ``ssr data import-distractors`` does. Either way the result is a new
test table: the test table's rows, then the distractors as split ``database``, streamed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ssr_tasks.backbone import dataset_spec, load_backbone
from ssr_tasks.config import Device, RetrievalDataParams
from ssr_tasks.device import local_device
from ssr_tasks.handoffs import Backbone, required
from ssr_tasks.retrieval.handoffs import RetrievalData
from ssr_tasks.taskkit import short_hash
from storage.distractors import import_distractors
from storage.errors import StorageError
from storage.features import read_metadata
from storage.glyphs import GENERATOR_VERSION
from storage.glyphs import fonts as gf
from storage.glyphs.distractors import append_database_rows, build_distractor_parts, distractor_characters, normalise

log = logging.getLogger(__name__)


def glyph_distractors(
    params: RetrievalDataParams,
    data: RetrievalData,
    backbone: Backbone,
    test_table: Path,
    work_dir: Path,
    device: Device = "auto",
    batch_size: int = 256,
) -> Path:
    """``test_table`` with ``params.distractors`` glyph distractors appended (built once).

    The parts (blocks of rendered, embedded distractors) live in one folder per backbone
    checkpoint and dataset seed / size, so a larger N reuses a smaller one's blocks."""
    n = params.distractors
    out = test_table.with_name(f"{test_table.stem}-distractors-{n}.parquet")
    if out.exists():
        return out
    meta = read_metadata(test_table)
    identity = [meta["checkpoint_hash"], params.data_seed, params.glyphs_size, GENERATOR_VERSION]
    parts_dir = work_dir / f"glyph-distractors-{short_hash(identity)}"
    fonts = gf.load_fonts()
    pool = gf.class_pool(fonts)
    chars = distractor_characters(
        required(data.fewshot_root, "the glyphs' few-shot root"), data.root, [c.char for c in pool]
    )
    spec = dataset_spec(backbone.spec)
    dev = local_device(device)
    net = load_backbone(backbone.name, backbone.spec, Path(backbone.path), dev)

    @torch.no_grad()
    def embed(images: np.ndarray) -> np.ndarray:
        x = normalise(images, spec)
        return np.concatenate(
            [
                net(torch.from_numpy(x[a : a + batch_size]).to(dev)).float().cpu().numpy()
                for a in range(0, len(x), batch_size)
            ]
        )

    def progress(done: int, total: int) -> None:
        if done == total or done % 25 == 0:
            log.info("distractors: %d of %d blocks rendered and embedded", done, total)

    log.info(
        "distractors: %d renderings of %d characters (neither queried nor trained on) into %s", n, len(chars), parts_dir
    )
    parts = build_distractor_parts(
        parts_dir,
        n,
        embed,
        chars=chars,
        font_paths={f.name: f.path for f in fonts},
        fonts_of={c.char: c.fonts for c in pool},
        seed=params.data_seed,
        metadata={k: meta[k] for k in ("dataset", "backbone", "checkpoint_hash")},
        progress=progress,
    )
    return append_database_rows(test_table, parts, n, out)


def feature_distractors(test_table: Path, distractors_path: str) -> tuple[Path, int]:
    """``test_table`` with the distractors of ``distractors_path`` appended as database items
    (``storage.distractors.import_distractors``, what ``ssr data import-distractors`` runs:
    .npy memory-mapped, a revisitop-style pickle or Parquet, (N, D) or (D, N); streamed),
    built once into a table named after the source's path, size and modification time; and
    the number of distractors."""
    source = Path(distractors_path)
    if not source.is_file():
        raise StorageError(
            f"{source}: data.distractors_path: distractor features not found (.npy, revisitop .pkl or .parquet)"
        )
    st = source.stat()
    out = test_table.with_name(
        f"{test_table.stem}-distractors-{short_hash([str(source.resolve()), st.st_size, st.st_mtime_ns])}.parquet"
    )
    if not out.exists():
        log.info("distractors: appending %s to the test database", source)
        import_distractors(test_table, source, out=out)
    return out, pq.ParquetFile(out).metadata.num_rows - pq.ParquetFile(test_table).metadata.num_rows
