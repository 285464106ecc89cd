"""Download and unpack the published data sets and models (DATA_SOURCES.md).

``download(name, root)`` fetches ``SOURCES[name]`` into ``<root>/downloads/`` (resuming a
partial ``.part`` file with an HTTP Range request), checks its SHA-256 when one is known or
given, unpacks it into a temporary folder, applies the source's post-processing and moves
the result into ``<root>/<target>``. The URL can be overridden per call or with the
environment variable ``SSR_DATA_URL_<NAME>`` (upper case, ``-`` -> ``_``).
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from storage.cifar_fs import build_cifar_fs
from storage.errors import ChecksumError, DatasetLayoutError, DownloadError
from storage.hashing import file_sha256
from storage.landmarks import read_revisited_gnd

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """url: published address; archive: "zip", "tar.gz" or "file"; target: folder under
    the data root that receives the result; sha256: expected checksum when known;
    post: what happens after unpacking (the name of a function in this module)."""

    url: str
    archive: str
    target: str
    sha256: str | None = None
    post: str = "move_all"
    note: str = ""


SOURCES: dict[str, Source] = {
    "ssr-landmark-features": Source(
        "https://www.dropbox.com/s/miwazkc8peb1u3r/landmark.zip?dl=0",
        "zip",
        "landmark",
        post="post_landmark",
        note="gl18_resnet101_{roxford5k,rparis6k,sfm120k}.pkl (sfm120k_ renamed)",
    ),
    "fewshot-backbones": Source(
        "https://www.dropbox.com/s/6c9kssn2o2anmnb/pre_trained_models.zip?dl=0",
        "zip",
        "backbones",
        post="post_backbones",
        note="CIFAR-FS and MiniImageNet backbones; TieredImageNet from the next entry",
    ),
    "fewshot-backbones-tiered": Source(
        "https://www.dropbox.com/s/bh39hn6qluta5dn/TieredImageNet.zip?dl=0",
        "zip",
        "backbones",
        post="post_backbones_tiered",
        note="tiered-ImageNet backbones into backbones/TieredImageNet",
    ),
    "cifar-fs-splits": Source(
        "https://www.dropbox.com/s/wuxb1wlahado3nq/cifar-fs-splits.zip?dl=0",
        "zip",
        "cifar-fs-splits",
        post="post_cifar_fs_splits",
        note="class splits and fixed episodes; builds cifar-fs when cifar-100 is there",
    ),
    "cifar-100": Source(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "tar.gz",
        "cifar-100",
        post="post_cifar100",
        note="CIFAR-100 python pickles; builds cifar-fs when cifar-fs-splits is there",
    ),
    "mini-imagenet": Source(
        "https://www.dropbox.com/s/a2a0bll17f5dvhr/Mini-ImageNet.zip?dl=0",
        "zip",
        "mini-imagenet",
        post="post_mini_imagenet",
        note="train_train -> train; train_val, train_test deleted",
    ),
    "tiered-imagenet": Source(
        "https://drive.google.com/file/d/1T-4NVTSa5T6CXKSRbymYLnWp_OrtF-mo/view",
        "zip",
        "tiered-imagenet",
        note="Google Drive may refuse scripted downloads; fetch it by hand and pass --url file:///path",
    ),
    "roxford5k-gnd": Source(
        "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl",
        "file",
        "revisitop",
        post="post_gnd",
    ),
    "rparis6k-gnd": Source(
        "http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl",
        "file",
        "revisitop",
        post="post_gnd",
    ),
}


def env_var(name: str) -> str:
    return "SSR_DATA_URL_" + name.upper().replace("-", "_")


def direct_url(url: str) -> str:
    """Turn a published share link into a direct-download one (Dropbox ``dl=1``,
    Google Drive ``uc?export=download``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc.endswith("dropbox.com"):
        query = dict(urllib.parse.parse_qsl(parts.query))
        query["dl"] = "1"
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    if parts.netloc == "drive.google.com" and "/file/d/" in parts.path:
        file_id = parts.path.split("/file/d/")[1].split("/")[0]
        return f"https://drive.google.com/uc?export=download&confirm=t&id={file_id}"
    return url


def _archive_name(name: str, url: str, archive: str) -> str:
    base = os.path.basename(urllib.parse.urlsplit(url).path) or name
    suffix = {"zip": ".zip", "tar.gz": ".tar.gz"}.get(archive, "")
    return base if base.endswith(suffix) else f"{name}{suffix}"


def fetch(url: str, dest: Path, *, retries: int = 3, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial file with an
    HTTP Range request; on a dropped connection retry (resuming) up to ``retries`` times."""
    if url.startswith("file://") or "://" not in url:
        src = Path(urllib.parse.urlsplit(url).path if url.startswith("file://") else url)
        if not src.is_file():
            raise DownloadError(f"{src}: local source file not found")
        shutil.copyfile(src, dest)
        return dest
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for _ in range(retries + 1):
        try:
            if _fetch_once(url, part, timeout):
                os.replace(part, dest)
                return dest
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason} (saving to {dest})") from exc
            last_error = exc
    raise DownloadError(
        f"{url}: download to {part} incomplete after {retries + 1} attempts ({last_error}); run again to resume"
    )


def _fetch_once(url: str, part: Path, timeout: float) -> bool:
    """One request; True when ``part`` holds the whole file."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "ssr-pipeline"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch
            return True
        raise
    with resp:
        if have and resp.status == 206:
            mode, total = "ab", _content_range_total(resp.headers.get("Content-Range"))
        else:  # server ignored the range (200): start over
            mode, have = "wb", 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if "text/html" in (resp.headers.get("Content-Type") or "") and not url.endswith((".html", ".htm")):
            raise DownloadError(
                f"{url}: server sent an HTML page instead of the file (a login or "
                "confirmation page?); download it by hand and pass --url file:///path"
            )
        with open(part, mode) as f:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    return total is None or size >= total


def _content_range_total(value: str | None) -> int | None:
    if value and "/" in value:
        tail = value.rsplit("/", 1)[1]
        return int(tail) if tail.isdigit() else None
    return None


def _safe_extract(archive: Path, kind: str, out: Path) -> None:
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    p = Path(member)
                    if p.is_absolute() or ".." in p.parts:
                        raise DownloadError(f"{archive}: unsafe member path '{member}'")
                zf.extractall(out)
        elif kind == "tar.gz":
            with tarfile.open(archive, "r:gz") as tf:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the standard library's own checks
                    tf.extractall(out, filter="data")
                else:  # older 3.11: allow only plain files and folders inside ``out``
                    for m in tf.getmembers():
                        p = Path(m.name)
                        if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                            raise DownloadError(
                                f"{archive}: unsafe member '{m.name}' (absolute, outside the "
                                f"folder, or a link/device); refusing to unpack"
                            )
                    tf.extractall(out)
        else:
            raise DownloadError(f"{archive}: unknown archive kind '{kind}'")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DownloadError(f"{archive}: not a valid {kind} archive ({exc}); delete it and download again") from exc


def download(name: str, dest_root: str | os.PathLike, *, url: str | None = None, sha256: str | None = None) -> Path:
    """Fetch, verify, unpack and post-process ``SOURCES[name]``; returns ``<root>/<target>``.

    url: overrides the published URL (also ``SSR_DATA_URL_<NAME>``); sha256: expected
    checksum of the downloaded file (else the source's, if known).
    """
    if name not in SOURCES:
        raise DownloadError(f"unknown data source '{name}' (known: {', '.join(sorted(SOURCES))})")
    src = SOURCES[name]
    root = Path(dest_root)
    the_url = url or os.environ.get(env_var(name)) or direct_url(src.url)
    expected = sha256 or src.sha256
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    dest = downloads / _archive_name(name, the_url, src.archive)
    if not (dest.is_file() and (expected is None or file_sha256(dest) == expected.lower())):
        fetch(the_url, dest)
    if expected is not None:
        got = file_sha256(dest)
        if got != expected.lower():
            bad = dest.with_name(dest.name + ".bad")
            os.replace(dest, bad)
            raise ChecksumError(
                f"{dest}: sha256 is {got}, expected {expected.lower()} "
                f"(moved to {bad.name}; check the URL and download again)"
            )
    if src.post == "post_gnd":
        read_revisited_gnd(dest)  # validate before it lands; errors name the downloaded file
    target = root / src.target
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=root) as tmp:
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        if src.archive == "file":
            shutil.copyfile(dest, unpacked / dest.name)
        else:
            _safe_extract(dest, src.archive, unpacked)
        POST[src.post](unpacked, target, root)
    return target


# ---- post-processing ------------------------------------------------------------------


def _strip_single_dir(d: Path) -> Path:
    children = [c for c in d.iterdir() if not c.name.startswith(".") and c.name != "__MACOSX"]
    return children[0] if len(children) == 1 and children[0].is_dir() else d


def _move_children(src: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.name in skip or child.name == "__MACOSX":
            continue
        dst = target / child.name
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        shutil.move(str(child), str(dst))


def _find_dir(root: Path, name: str) -> Path | None:
    for p in sorted(root.rglob(name)):
        if p.is_dir():
            return p
    return None


def move_all(unpacked: Path, target: Path, root: Path) -> None:
    _move_children(_strip_single_dir(unpacked), target)


def post_landmark(unpacked: Path, target: Path, root: Path) -> None:
    pickles = sorted(unpacked.rglob("*.pkl"))
    if not pickles:
        raise DatasetLayoutError(f"{unpacked}: landmark archive holds no .pkl files")
    target.mkdir(parents=True, exist_ok=True)
    for p in pickles:
        new_name = p.name.replace("_sfm120k_.pkl", "_sfm120k.pkl")
        os.replace(p, target / new_name)


def post_backbones(unpacked: Path, target: Path, root: Path) -> None:
    base = next(
        (d.parent for d in (_find_dir(unpacked, "CIFAR-FS"), _find_dir(unpacked, "MiniImageNet")) if d),
        _strip_single_dir(unpacked),
    )
    _move_children(base, target, skip=("TieredImageNet",))


def post_backbones_tiered(unpacked: Path, target: Path, root: Path) -> None:
    tiered = _find_dir(unpacked, "TieredImageNet") or _strip_single_dir(unpacked)
    dst = target / "TieredImageNet"
    if dst.exists():
        shutil.rmtree(dst)
    target.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tiered), str(dst))


def post_mini_imagenet(unpacked: Path, target: Path, root: Path) -> None:
    train_train = _find_dir(unpacked, "train_train")
    if train_train is None:
        raise DatasetLayoutError(f"{unpacked}: mini-ImageNet archive has no train_train folder")
    base = train_train.parent
    for extra in ("train_val", "train_test"):
        if (base / extra).exists():
            shutil.rmtree(base / extra)
    if (base / "train").exists():
        shutil.rmtree(base / "train")
    os.replace(train_train, base / "train")
    _move_children(base, target)


def post_gnd(unpacked: Path, target: Path, root: Path) -> None:
    """Ground-truth pickle (validated in download()) goes to <root>/revisitop/."""
    _move_children(unpacked, target)


def post_cifar100(unpacked: Path, target: Path, root: Path) -> None:
    _move_children(_strip_single_dir(unpacked), target)
    splits = root / SOURCES["cifar-fs-splits"].target
    if splits.is_dir():
        build_cifar_fs(target, splits, root / "cifar-fs")


def post_cifar_fs_splits(unpacked: Path, target: Path, root: Path) -> None:
    _move_children(_strip_single_dir(unpacked), target)
    cifar = root / SOURCES["cifar-100"].target
    if cifar.is_dir():
        build_cifar_fs(cifar, target, root / "cifar-fs")


POST: dict[str, Callable[[Path, Path, Path], None]] = {
    "move_all": move_all,
    "post_landmark": post_landmark,
    "post_backbones": post_backbones,
    "post_backbones_tiered": post_backbones_tiered,
    "post_mini_imagenet": post_mini_imagenet,
    "post_gnd": post_gnd,
    "post_cifar100": post_cifar100,
    "post_cifar_fs_splits": post_cifar_fs_splits,
}
