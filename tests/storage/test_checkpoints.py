import pytest
import torch

from storage.checkpoints import file_sha256, load_ssr_checkpoint, load_state_dict, save_checkpoint
from storage.errors import CorruptFileError, SchemaError, UnsafePickleError


class _Thing:
    pass


def test_state_dict_unwrap_and_prefix(tmp_path):
    sd = {"module.conv1.weight": torch.ones(2, 3), "module.bn1.bias": torch.zeros(2)}
    p = tmp_path / "net.pth"
    save_checkpoint(p, {"state_dict": sd})
    out = load_state_dict(p)
    assert sorted(out) == ["bn1.bias", "conv1.weight"]
    assert torch.equal(out["conv1.weight"], torch.ones(2, 3))
    assert len(file_sha256(p)) == 64


def test_ssr_checkpoint(tmp_path):
    p = tmp_path / "ssr.pth"
    save_checkpoint(p, {"netFeat": {"a": torch.ones(1)}, "SSR": {"module.scale_cls": torch.tensor(10.0)}, "nbStep": 3})
    ck = load_ssr_checkpoint(p)
    assert ck["nbStep"] == 3 and "scale_cls" in ck["SSR"]
    save_checkpoint(p, {"netFeat": {"a": torch.ones(1)}, "nbStep": 3})
    with pytest.raises(SchemaError, match=r"ssr\.pth: missing key\(s\) \['SSR'\]"):
        load_ssr_checkpoint(p)


def test_refuses_arbitrary_objects_and_garbage(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"x": _Thing()}, p)
    with pytest.raises(UnsafePickleError, match=r"evil\.pth"):
        load_state_dict(p)
    q = tmp_path / "junk.pth"
    q.write_bytes(b"not a checkpoint at all")
    with pytest.raises((CorruptFileError, UnsafePickleError), match=r"junk\.pth"):
        load_state_dict(q)
