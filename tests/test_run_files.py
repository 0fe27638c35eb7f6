"""trl_cream.runs.files: the one atomic file writer (text, JSON, safetensors, Hub push markers)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trl_cream.hub.publisher import is_pushed, marker_path, write_marker
from trl_cream.runs.files import atomic_file, atomic_write_json, atomic_write_text, read_json, save_tensors


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "nested" / "state.json"
    atomic_write_json(path, {"round": 1})
    with pytest.raises(RuntimeError, match="crash"), atomic_file(path) as tmp:
        tmp.write_text('{"round": ')  # half-written, then the process "crashes"
        raise RuntimeError("crash")
    assert read_json(path) == {"round": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_text_json_and_tensors_are_replaced_whole(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "first")
    atomic_write_text(tmp_path / "a.txt", "second")
    assert (tmp_path / "a.txt").read_text() == "second"
    tensors = {"w": torch.arange(6.0).reshape(2, 3).t()}  # non-contiguous: saved contiguous
    save_tensors(tensors, tmp_path / "t" / "s.safetensors", metadata={"round": "2"})
    assert torch.equal(load_file(tmp_path / "t" / "s.safetensors")["w"], tensors["w"])
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left behind


def test_push_markers_go_through_the_same_writer(tmp_path, monkeypatch):
    import trl_cream.hub.publisher as publisher

    written = []

    def recording(path, data):
        written.append(path)
        atomic_write_json(path, data)

    monkeypatch.setattr(publisher, "atomic_write_json", recording)
    write_marker(tmp_path, 3, {"iteration": 3, "repo_id": "me/cream"})
    assert written == [marker_path(tmp_path, 3)]
    assert is_pushed(tmp_path, 3) and json.loads(marker_path(tmp_path, 3).read_text())["repo_id"] == "me/cream"
    assert sorted(p.name for p in marker_path(tmp_path, 3).parent.iterdir()) == ["M3.json"]
