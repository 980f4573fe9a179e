"""Checkpoints: atomic writes, pruning, lookup, integrity checks, the shipped teacher."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rtdmd import checkpoint as ckpt
from rtdmd.errors import UserError


def _write(run: Path, step: int, keep: int = 2, value: float = 0.0, training: bool = True) -> Path:
    return ckpt.write_checkpoint(
        run, step, config_yaml="method: {name: teacher}\n", sampler={"kind": "euler", "steps": 8, "guidance": 2.0},
        method="teacher", backend="toy2d", inference_state={"w": torch.full((3, 2), value)},
        training_state={"tensors": {"net_teacher": {"w": torch.full((3, 2), value + 1)}},
                        "objects": {"step": step, "note": "x"}} if training else None,
        keep=keep, extra_meta={"role": "teacher"})


def _listing(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_layout_meta_and_hash(tmp_path):
    d = _write(tmp_path, 7, value=1.5)
    assert d == tmp_path / "checkpoints" / "step_000007"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000007\n"
    meta = ckpt.read_meta(d)
    assert meta["step"] == 7 and meta["method"] == "teacher" and meta["backend"] == "toy2d" and meta["role"] == "teacher"
    assert meta["sampler"] == {"kind": "euler", "steps": 8, "guidance": 2.0}
    assert meta["model_sha256"] == ckpt.sha256_file(d / "model.safetensors")
    assert torch.equal(ckpt.load_model_state(d)["w"], torch.full((3, 2), 1.5))
    st = ckpt.load_training_state(d)
    assert torch.equal(st["tensors"]["net_teacher"]["w"], torch.full((3, 2), 2.5)) and st["objects"]["step"] == 7


def test_sha256_file_known_value(tmp_path):
    f = tmp_path / "abc"
    f.write_bytes(b"abc")
    assert ckpt.sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 example


def test_pruning_keeps_the_newest(tmp_path):
    for s in (1, 2, 3, 4):
        _write(tmp_path, s, keep=2)
    assert _listing(tmp_path) == ["latest", "step_000003", "step_000004"]
    for s in (5, 6):
        _write(tmp_path, s, keep=0)
    assert _listing(tmp_path) == ["latest", "step_000003", "step_000004", "step_000005", "step_000006"]


def test_rewriting_a_step_replaces_it(tmp_path):
    _write(tmp_path, 2, value=1.0)
    _write(tmp_path, 3, value=2.0)
    d = _write(tmp_path, 2, value=5.0)  # a resume from step 1 writes step 2 again
    assert torch.equal(ckpt.load_model_state(d)["w"], torch.full((3, 2), 5.0))
    assert ckpt.find_checkpoint(tmp_path) == d
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name]


def test_a_crash_while_writing_leaves_the_previous_checkpoint_current(tmp_path, monkeypatch):
    good = _write(tmp_path, 1, value=1.0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)  # dies after model.safetensors, before meta.json
    with pytest.raises(OSError):
        _write(tmp_path, 2, value=2.0)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "step_000002").exists()
    assert ckpt.find_checkpoint(tmp_path) == good
    assert torch.equal(ckpt.load_model_state(good)["w"], torch.full((3, 2), 1.0))
    # the next successful write cleans the half-written directory of this process
    _write(tmp_path, 2, value=2.0)
    assert _listing(tmp_path) == ["latest", "step_000001", "step_000002"]


def test_find_checkpoint_accepts_every_spelling(tmp_path):
    d = _write(tmp_path, 4)
    for p in (tmp_path, tmp_path / "checkpoints", d, d / "meta.json", d / "model.safetensors"):
        assert ckpt.find_checkpoint(p) == d
    with pytest.raises(UserError, match="does not exist"):
        ckpt.find_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint found"):
        ckpt.find_checkpoint(tmp_path / "empty")


def test_integrity_errors(tmp_path):
    d = _write(tmp_path, 1)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(UserError, match="does not match the sha256"):
        ckpt.load_model_state(d)
    assert torch.is_tensor(ckpt.load_model_state(d, verify=False)["w"])  # a flipped weight byte still parses
    f.write_bytes(data[:40])
    with pytest.raises(UserError, match="is corrupt"):
        ckpt.load_model_state(d, verify=False)
    os.remove(f)
    with pytest.raises(UserError, match="has no model.safetensors"):
        ckpt.load_model_state(d)
    d2 = _write(tmp_path, 2)
    (d2 / "meta.json").write_text("[")
    with pytest.raises(UserError, match="unreadable or corrupt"):
        ckpt.read_meta(d2)
    d3 = _write(tmp_path, 3, training=False)
    with pytest.raises(UserError, match="no training state"):
        ckpt.load_training_state(d3)
    d4 = _write(tmp_path, 4)
    (d4 / "state" / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        ckpt.load_training_state(d4)


def test_shipped_teacher_loads_for_inference():
    cfg, backend, net, meta = ckpt.load_for_inference(Path(ckpt.__file__).parent / "assets" / "shapes_teacher")
    assert meta["step"] == 4364 and meta["sampler"] == {"kind": "euler", "steps": 28, "guidance": 4.0, "eta": 0.9}
    assert cfg.backend_name == "shapes" and backend.name == "shapes" and backend.device.type == "cpu"
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert 4_000_000 < sum(p.numel() for p in net.parameters()) < 5_000_000


def test_load_for_inference_refuses_a_mismatched_network(tmp_path):
    from rtdmd.config import dump, resolve

    cfg = resolve("teacher", backend="toy2d", overrides={"backend": {"hidden": 16, "depth": 2}})
    d = ckpt.write_checkpoint(tmp_path, 1, config_yaml=dump(cfg), sampler={"kind": "euler", "steps": 4},
                              method="teacher", backend="toy2d", inference_state={"w": torch.zeros(2)},
                              training_state=None, extra_meta={"role": "teacher"})
    with pytest.raises(UserError, match="does not fit backend 'toy2d'"):
        ckpt.load_for_inference(d)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["role"] == "teacher"
