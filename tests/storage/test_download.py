import hashlib
import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from storage.cli import main as cli_main
from storage.download import SOURCES, direct_url, download
from storage.errors import ChecksumError, DataValueError, DownloadError


def _zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _landmark_zip():
    rng = np.random.default_rng(0)
    blob = pickle.dumps({"X": rng.standard_normal((4, 50000)).astype(np.float32)})  # ~800 kB, several chunks
    return _zip({"landmark/gl18_resnet101_roxford5k.pkl": blob, "landmark/gl18_resnet101_sfm120k_.pkl": b"x"})


def test_sources_table():
    assert {
        "ssr-landmark-features",
        "fewshot-backbones",
        "fewshot-backbones-tiered",
        "cifar-fs-splits",
        "cifar-100",
        "mini-imagenet",
        "tiered-imagenet",
        "roxford5k-gnd",
        "rparis6k-gnd",
    } <= set(SOURCES)
    assert SOURCES["cifar-100"].archive == "tar.gz"
    assert direct_url(SOURCES["mini-imagenet"].url).endswith("?dl=1")


def test_download_unpacks_and_renames(server, tmp_path):
    data = _landmark_zip()
    server.files["/landmark.zip"] = data
    out = download(
        "ssr-landmark-features", tmp_path, url=server.url + "/landmark.zip", sha256=hashlib.sha256(data).hexdigest()
    )
    assert sorted(p.name for p in out.iterdir()) == ["gl18_resnet101_roxford5k.pkl", "gl18_resnet101_sfm120k.pkl"]
    assert not list((tmp_path / "downloads").glob("*.part"))


def test_resume_from_partial_file(server, tmp_path, monkeypatch):
    data = _landmark_zip()
    server.files["/landmark.zip"] = data
    part = tmp_path / "downloads" / "landmark.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:300_000])
    monkeypatch.setenv("SSR_DATA_URL_SSR_LANDMARK_FEATURES", server.url + "/landmark.zip")
    download("ssr-landmark-features", tmp_path, sha256=hashlib.sha256(data).hexdigest())
    assert server.requests == [("/landmark.zip", "bytes=300000-")]
    assert (tmp_path / "downloads" / "landmark.zip").read_bytes() == data


def test_dropped_connection_is_resumed(server, tmp_path):
    data = _landmark_zip()
    server.files["/landmark.zip"] = data
    server.drop_once.add("/landmark.zip")
    download("ssr-landmark-features", tmp_path, url=server.url + "/landmark.zip")
    assert [r[1] for r in server.requests] == [None, f"bytes={len(data) // 2}-"]
    assert (tmp_path / "landmark" / "gl18_resnet101_roxford5k.pkl").is_file()


def test_checksum_mismatch(server, tmp_path):
    server.files["/landmark.zip"] = _landmark_zip()
    with pytest.raises(ChecksumError, match=r"landmark\.zip: sha256 is [0-9a-f]{64}, expected 0{64}"):
        download("ssr-landmark-features", tmp_path, url=server.url + "/landmark.zip", sha256="0" * 64)
    assert not (tmp_path / "landmark").exists()


def test_http_errors_and_unknown_name(server, tmp_path, capsys):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download("cifar-100", tmp_path, url=server.url + "/missing.tar.gz")
    with pytest.raises(DownloadError, match="unknown data source 'imagenet-22k'"):
        download("imagenet-22k", tmp_path)
    code = cli_main(["data", "download", "roxford5k-gnd", "--root", str(tmp_path), "--url", server.url + "/nope.pkl"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "HTTP 404" in err


def test_backbones_and_tiered_merge(server, tmp_path):
    server.files["/pre_trained_models.zip"] = _zip(
        {
            "pre_trained_models/CIFAR-FS/Conv4_64_Cos_netFeatBest.pth": b"c",
            "pre_trained_models/MiniImageNet/WRN_Cos_netFeatBest64.653.pth": b"m",
            "pre_trained_models/TieredImageNet/old.pth": b"old",
        }
    )
    server.files["/TieredImageNet.zip"] = _zip({"TieredImageNet/WRN_netFeatBest.pth": b"t"})
    download("fewshot-backbones-tiered", tmp_path, url=server.url + "/TieredImageNet.zip")
    out = download("fewshot-backbones", tmp_path, url=server.url + "/pre_trained_models.zip")
    assert sorted(p.name for p in out.iterdir()) == ["CIFAR-FS", "MiniImageNet", "TieredImageNet"]
    assert [p.name for p in (out / "TieredImageNet").iterdir()] == ["WRN_netFeatBest.pth"]


def test_gnd_file_download_is_validated(server, tmp_path):
    gnd = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [1], "bbx": None}]}
    server.files["/gnd_roxford5k.pkl"] = pickle.dumps(gnd)
    out = download("roxford5k-gnd", tmp_path, url=server.url + "/gnd_roxford5k.pkl")
    assert (out / "gnd_roxford5k.pkl").is_file()
    gnd["gnd"][0]["easy"] = [5]
    server.files["/gnd_rparis6k.pkl"] = pickle.dumps(gnd)
    with pytest.raises(
        DataValueError, match=r"downloads/gnd_rparis6k\.pkl: query 0: field 'easy' has index 5 outside \[0, 2\)"
    ):
        download("rparis6k-gnd", tmp_path, url=server.url + "/gnd_rparis6k.pkl")


def test_unsafe_tar_members_are_refused(tmp_path):
    import io

    from storage.download import DownloadError, _safe_extract

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = b"owned"
        info = tarfile.TarInfo("../evil.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError, match="evil.tar.gz"):
        _safe_extract(archive, "tar.gz", out)
    assert not (tmp_path / "evil.txt").exists()
