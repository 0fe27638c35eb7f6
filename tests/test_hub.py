"""Publishing iterations to the Hub, against the in-process fake Hub of tests/hub_server.py with the real client."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import socket
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pandas as pd
import pytest
import torch
from conftest import cream_args, perturbed
from hub_server import FakeHub
from huggingface_hub import hf_hub_download
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from trl_cream import CreamConfig, CreamTrainer
from trl_cream.hub import HubPublisher, HubPushError, HubSettings, RetryPolicy, is_pushed, marker_path
from trl_cream.hub.model_card import CardSettings, build_model_card

REPO = "tester/cream"
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


@pytest.fixture()
def fake_hub(monkeypatch):
    """The fake Hub, with the client pointed at it (HfApi reads `constants.ENDPOINT` when it is built), online
    mode for the client only, and the Xet upload path off (the fake Hub speaks LFS)."""
    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # for anything reading the environment later
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)  # the client read HF_ENDPOINT at import
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    yield hub
    hub.stop()


def download(hub: FakeHub, tmp: Path, filename: str, revision: str = "main", repo: str = REPO, **kwargs) -> Path:
    path = hf_hub_download(
        repo, filename, revision=revision, endpoint=hub.url, cache_dir=tmp / "hf_cache", token=hub.token, **kwargs
    )
    return Path(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hub_args(out: Path, hub: FakeHub, **overrides) -> CreamConfig:
    kwargs = dict(push_to_hub=True, hub_model_id=REPO, hub_token=hub.token, hub_push_retries=2, hub_push_backoff=0.01)
    return cream_args(out, **{**kwargs, **overrides})


def assert_no_token(token: str, *roots: Path, text: str = "") -> None:
    assert token not in text
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), f"token found in {path}"


def test_full_finetuning_pushes_one_branch_per_iteration(tmp_path, fake_hub, m0, tokenizer, prompts, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.DEBUG)
    trainer = CreamTrainer(
        model=perturbed(m0), ref_model=m0, args=hub_args(out, fake_hub), train_dataset=prompts,
        processing_class=tokenizer,
    )  # fmt: skip
    assert fake_hub.count("GET", "/api/whoami-v2") == 1  # checked at init, before any training
    assert fake_hub.count("POST", "/api/repos/create") == 0  # the parent Trainer created nothing
    trainer.train()

    branches = fake_hub.branches(REPO)
    assert set(branches) == {"main", "M1", "M2", "M3"}
    assert branches["main"] != branches["M2"]
    for k in (1, 2, 3):
        local = out / f"M{k}"
        assert sha256(download(fake_hub, tmp_path, "model.safetensors", f"M{k}")) == sha256(
            local / "model.safetensors"
        )
        assert is_pushed(out, k)
        marker = json.loads(marker_path(out, k).read_text())
        assert marker["repo_id"] == REPO and marker["revision"] == f"M{k}"
        assert (local / "README.md").is_file()
        assert "training_args.bin" not in fake_hub.files(REPO, f"M{k}")  # a pickle: never published
    # main is the latest iteration, file for file
    assert fake_hub.files(REPO, "main") == fake_hub.files(REPO, "M3")
    assert sha256(download(fake_hub, tmp_path, "model.safetensors")) == sha256(out / "M3" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(download(fake_hub, tmp_path, "config.json", "M2").parent)
    torch.testing.assert_close(model.state_dict(), AutoModelForCausalLM.from_pretrained(out / "M2").state_dict())

    card = download(fake_hub, tmp_path, "README.md", "M3").read_text()
    assert card == (out / "M3" / "README.md").read_text()
    assert "cream" in card and "2410.12735" in card and "CREAM" in card  # TRL's card: tags, paper, trainer name
    assert f'from_pretrained("{REPO}", revision="M3")' in card
    assert f"[M2](https://huggingface.co/{REPO}/tree/M2)" in card
    assert "| 1 |" in card and "| 2 |" in card  # one row per round so far
    rounds = trainer.round_metrics
    assert f"{rounds[1]['consistency']:.3f}" in card and f"| {rounds[1]['num_pairs']} |" in card
    card_m2 = download(fake_hub, tmp_path, "README.md", "M2").read_text()
    assert "| 1 |" in card_m2 and "| 2 |" not in card_m2

    # Every commit is one of ours (no "Model save" push from the parent Trainer); the token was sent, never written.
    assert fake_hub.count("POST", "/commit/") == 6  # branch + main, per iteration
    assert any(auth == f"Bearer {fake_hub.token}" for _, _, auth in fake_hub.requests)
    assert_no_token(fake_hub.token, out, tmp_path / "hf_cache", text=caplog.text)
    assert all(fake_hub.token.encode() not in c for files in fake_hub.repos[("model", REPO)].commits.values()
               for c in files.values())  # fmt: skip


def test_lora_repo_strategy_with_merged_weights_and_round_datasets(tmp_path, fake_hub, m0, tokenizer, prompts):
    base_dir = tmp_path / "base"
    m0.save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(**LORA))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    out = tmp_path / "run"
    args = hub_args(
        out, fake_hub, num_iterations=1, hub_iteration_strategy="repo", push_merged_weights=True,
        push_round_datasets=True, hub_base_model_id="org/tiny-base",
    )  # fmt: skip
    CreamTrainer(model=model, args=args, train_dataset=prompts, processing_class=tokenizer).train()

    for k in (1, 2):
        repo = f"{REPO}-M{k}"
        local = out / f"M{k}"
        remote = download(fake_hub, tmp_path, "adapter_model.safetensors", repo=repo)
        assert sha256(remote) == sha256(local / "adapter_model.safetensors")
        config = json.loads(download(fake_hub, tmp_path, "adapter_config.json", repo=repo).read_text())
        assert config["base_model_name_or_path"] == "org/tiny-base"  # the Hub copy names the Hub base
        assert json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
        card = download(fake_hub, tmp_path, "README.md", repo=repo).read_text()
        assert f'AutoPeftModelForCausalLM.from_pretrained("{repo}")' in card and 'subfolder="merged"' in card
        # merged = base + adapter: same logits as the adapter on the base
        merged_dir = download(fake_hub, tmp_path, "merged/model.safetensors", repo=repo).parent
        download(fake_hub, tmp_path, "merged/config.json", repo=repo)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), local)
        ids = torch.tensor([[1, 5, 9, 13, 2]])
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits)
    assert set(fake_hub.branches(f"{REPO}-M2")) == {"main"}

    pairs = pd.read_parquet(download(fake_hub, tmp_path, "round_1/pairs.parquet", repo=f"{REPO}-rounds",
                                     repo_type="dataset"))  # fmt: skip
    candidates = pd.read_parquet(
        download(fake_hub, tmp_path, "round_1/candidates.parquet", repo=f"{REPO}-rounds", repo_type="dataset")
    )
    assert {"consistency", "chosen_reward", "rejected_reward"} <= set(pairs.columns) and len(pairs) > 0
    assert {"consistency", "logp_policy", "logp_initial", "rank"} <= set(candidates.columns)
    assert json.loads(marker_path(out, 2).read_text())["rounds_repo_id"] == f"{REPO}-rounds"
    assert_no_token(fake_hub.token, out)


def test_merged_weights_and_round_parquet_are_uploaded_from_files(tmp_path, fake_hub, m0, monkeypatch):
    """Nothing is read into memory for an upload (an 8B merged model would double host memory): every commit
    operation gets a file path; the merged weights and the parquet files are staged in a temporary folder that is
    gone after the push, and what arrives on the Hub is what was staged."""
    import huggingface_hub
    from datasets import Dataset

    base_dir = tmp_path / "base"
    m0.save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**LORA))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    folder = tmp_path / "run" / "M1"
    model.save_pretrained(folder)
    (folder / "README.md").write_text("# M1\n")
    round_dir = tmp_path / "run" / "rounds" / "round_1"
    Dataset.from_dict({"prompt": ["a", "b"], "consistency": [0.5, 0.25]}).save_to_disk(round_dir / "pairs")
    (round_dir / "metrics.json").write_text('{"round": 1}')

    uploads: dict[str, tuple[object, str]] = {}
    real = huggingface_hub.CommitOperationAdd

    def recording(path_in_repo, path_or_fileobj):
        assert isinstance(path_or_fileobj, str), f"{path_in_repo} uploaded from {type(path_or_fileobj).__name__}"
        uploads[path_in_repo] = (Path(path_or_fileobj), sha256(Path(path_or_fileobj)))
        return real(path_in_repo=path_in_repo, path_or_fileobj=path_or_fileobj)

    monkeypatch.setattr(huggingface_hub, "CommitOperationAdd", recording)
    settings = HubSettings(
        output_dir=tmp_path / "run", hub_model_id=REPO, token=fake_hub.token, strategy="repo",
        push_merged_weights=True, push_round_datasets=True, base_model_id="org/tiny-base",
    )  # fmt: skip
    HubPublisher(settings).push(1, folder, round_dir)

    assert {"adapter_model.safetensors", "merged/model.safetensors", "round_1/pairs.parquet"} <= set(uploads)
    assert uploads["adapter_model.safetensors"][0] == folder / "adapter_model.safetensors"  # straight from M1
    staged = [
        uploads[name][0] for name in ("merged/model.safetensors", "adapter_config.json", "round_1/pairs.parquet")
    ]
    assert not any(path.exists() or path.is_relative_to(tmp_path) for path in staged)  # temporary, removed after
    remote = download(fake_hub, tmp_path, "merged/model.safetensors", repo=f"{REPO}-M1")
    assert sha256(remote) == uploads["merged/model.safetensors"][1]
    download(fake_hub, tmp_path, "merged/config.json", repo=f"{REPO}-M1")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    merged = AutoModelForCausalLM.from_pretrained(remote.parent)
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    pairs = pd.read_parquet(download(fake_hub, tmp_path, "round_1/pairs.parquet", repo=f"{REPO}-rounds",
                                     repo_type="dataset"))  # fmt: skip
    assert pairs["consistency"].tolist() == [0.5, 0.25]
    assert (
        json.loads(download(fake_hub, tmp_path, "adapter_config.json", repo=f"{REPO}-M1").read_text())[
            "base_model_name_or_path"
        ]
        == "org/tiny-base"
    )


def make_iteration(folder: Path, seed: int = 0) -> dict[str, str]:
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# M1\n")
    (folder / "model.safetensors").write_bytes(
        torch.randn(256, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()
    )  # noqa: E501
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return {p.name: sha256(p) for p in folder.iterdir()}


def publisher(out: Path, hub: FakeHub, failure: str = "raise", retries: int = 3) -> tuple[HubPublisher, list[float]]:
    sleeps: list[float] = []
    policy = RetryPolicy(retries=retries, base_delay=0.5, sleep=sleeps.append)
    return HubPublisher(
        HubSettings(output_dir=out, hub_model_id=REPO, token=hub.token, failure=failure, policy=policy)
    ), sleeps


def test_transient_5xx_are_retried_with_backoff_then_succeed(tmp_path, fake_hub, caplog):
    before = make_iteration(tmp_path / "M1")
    pub, sleeps = publisher(tmp_path, fake_hub)
    fake_hub.fail("POST", r"/commit/M1$", 503, times=2)
    fake_hub.fail("POST", r"/api/repos/create", 502, times=1)
    pub.submit(1, tmp_path / "M1")
    pub.wait()
    assert sleeps == [0.5, 0.5, 1.0]  # create_repo once, then the commit twice: base, then doubled
    assert fake_hub.count("POST", r"/commit/M1$") == 3
    remote = download(fake_hub, tmp_path, "model.safetensors", "M1")
    assert sha256(remote) == before["model.safetensors"]
    assert is_pushed(tmp_path, 1)
    assert {p.name: sha256(p) for p in (tmp_path / "M1").iterdir()} == before
    assert caplog.text.count("retrying in") == 3 and "HTTP 503" in caplog.text
    assert_no_token(fake_hub.token, tmp_path, text=caplog.text)


@pytest.mark.parametrize(("status", "attempts"), [(429, 4), (500, 4), (403, 1), (404, 1)])
def test_only_transient_errors_are_retried(tmp_path, fake_hub, status, attempts):
    make_iteration(tmp_path / "M1")
    pub, sleeps = publisher(tmp_path, fake_hub, retries=3)
    fake_hub.fail("POST", r"/commit/", status)
    pub.submit(1, tmp_path / "M1")
    with pytest.raises(HubPushError, match=f"HTTP {status}"):
        pub.wait()
    assert fake_hub.count("POST", r"/commit/") == attempts and len(sleeps) == attempts - 1


@pytest.mark.parametrize("failure", ["raise", "warn"])
def test_a_permanent_401_raises_or_warns_and_keeps_the_checkpoint(tmp_path, fake_hub, failure, caplog):
    before = make_iteration(tmp_path / "M1")
    pub, sleeps = publisher(tmp_path, fake_hub, failure=failure, retries=2)
    fake_hub.fail("POST", r"/commit/", 401)
    pub.submit(1, tmp_path / "M1")
    if failure == "raise":
        with pytest.raises(HubPushError, match=r"M1 .* failed: HTTP 401.*not retried.*intact") as info:
            pub.wait()
        message = str(info.value)
    else:
        with pytest.warns(UserWarning, match="HTTP 401"):
            pub.wait()
        message = pub.failed[1]
    assert fake_hub.count("POST", r"/commit/") == 1 and sleeps == []  # a refused token is not retried
    assert not is_pushed(tmp_path, 1)
    assert {p.name: sha256(p) for p in (tmp_path / "M1").iterdir()} == before
    assert_no_token(fake_hub.token, tmp_path, text=caplog.text + message)


def test_a_resumed_run_pushes_the_missing_iteration_without_moving_main_back(tmp_path, fake_hub):
    hashes = {k: make_iteration(tmp_path / f"M{k}", seed=k)["model.safetensors"] for k in (1, 2, 3)}
    first, _ = publisher(tmp_path, fake_hub, failure="warn", retries=0)
    fake_hub.fail("POST", r"/commit/M1$", 500, times=1)
    with pytest.warns(UserWarning, match="M1"):
        for k in (1, 2, 3):
            first.submit(k, tmp_path / f"M{k}")
        first.wait()
    assert [is_pushed(tmp_path, k) for k in (1, 2, 3)] == [False, True, True]
    main = fake_hub.branches(REPO)["main"]

    resumed, _ = publisher(tmp_path, fake_hub)  # a new process: what the resume code does for a missing marker
    resumed.submit(1, tmp_path / "M1")
    resumed.wait()
    assert is_pushed(tmp_path, 1)
    assert sha256(download(fake_hub, tmp_path, "model.safetensors", "M1")) == hashes[1]
    assert fake_hub.branches(REPO)["main"] == main  # main still holds M3
    assert sha256(download(fake_hub, tmp_path, "model.safetensors")) == hashes[3]


def test_warn_mode_keeps_training_when_pushes_fail(tmp_path, fake_hub, m0, tokenizer, prompts):
    out = tmp_path / "run"
    args = hub_args(out, fake_hub, num_iterations=1, hub_push_failure="warn", hub_push_retries=1)
    fake_hub.fail("POST", r"/commit/", 500)
    trainer = CreamTrainer(
        model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
    )
    with pytest.warns(UserWarning, match="HTTP 500"):
        trainer.train()
    for k in (1, 2):
        assert (out / f"M{k}" / "model.safetensors").is_file() and (out / f"M{k}" / "README.md").is_file()
        assert not is_pushed(out, k)
    assert "| 1 |" in (out / "M2" / "README.md").read_text()  # the local card is written all the same


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_hub_or_refused_token_fails_before_training(
    tmp_path, fake_hub, monkeypatch, m0, tokenizer, prompts
):
    def make(args):
        return CreamTrainer(
            model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts, processing_class=tokenizer
        )

    with pytest.raises(HubPushError, match="Invalid user token|401"):
        make(hub_args(tmp_path / "a", fake_hub, hub_token="hf_wrong_token_999", hub_push_retries=0))
    monkeypatch.setattr(hf_constants, "ENDPOINT", closed_port_url())
    with pytest.raises(HubPushError, match="cannot be used: .*Connect"):
        make(hub_args(tmp_path / "b", fake_hub, hub_push_retries=0))
    assert not (tmp_path / "b" / "M1").exists()
    with pytest.warns(UserWarning, match="cannot be used"):
        make(hub_args(tmp_path / "c", fake_hub, hub_push_retries=0, hub_push_failure="warn"))


def test_offline_mode_fails_at_once_before_training(tmp_path, fake_hub, monkeypatch, m0, tokenizer, prompts, caplog):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="cannot be used: HF_HUB_OFFLINE=1 is set"):
        CreamTrainer(
            model=perturbed(m0), ref_model=m0, args=hub_args(tmp_path, fake_hub, hub_push_retries=3),
            train_dataset=prompts, processing_class=tokenizer,
        )  # fmt: skip
    assert "retrying" not in caplog.text and fake_hub.requests == []  # offline is permanent: no retry, no request


def test_command_line_flags(tmp_path, capsys):
    from trl_cream.cli import train_parser

    flags = ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false", "--push_to_hub", "--hub_model_id", REPO,
             "--hub_iteration_strategy", "repo", "--hub_push_failure", "warn", "--hub_push_retries", "5",
             "--push_round_datasets", "--hub_base_model_id", "org/base"]  # fmt: skip
    _, args, _ = train_parser().parse_args_and_config(flags)
    assert (args.push_to_hub, args.hub_model_id, args.hub_iteration_strategy) == (True, REPO, "repo")
    assert (args.hub_push_failure, args.hub_push_retries, args.push_round_datasets) == ("warn", 5, True)
    assert args.hub_base_model_id == "org/base"
    with pytest.raises(SystemExit):  # a parser error, not a traceback
        train_parser().parse_args_and_config(flags[:6])
    assert "trl-cream train: error: push_to_hub=True needs hub_model_id" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(push_to_hub=True), "needs hub_model_id"),
        (dict(hub_iteration_strategy="tags"), "hub_iteration_strategy='tags' is unknown"),
        (dict(hub_push_failure="ignore"), "hub_push_failure='ignore' is unknown"),
        (dict(hub_push_retries=-1), "must be >= 0"),
        (dict(push_to_hub=True, hub_model_id=REPO, push_round_datasets=True, save_round_artifacts=False),
         "save_round_artifacts=False"),
    ],
)  # fmt: skip
def test_hub_config_is_validated_up_front(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cream_args(tmp_path, **overrides)


def test_card_results_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="hub_card_results='missing.json' is not a file"):
        cream_args(tmp_path, hub_card_results="missing.json")


def test_merged_weights_need_a_base_model_path(tmp_path, fake_hub, m0, tokenizer, prompts):
    model = get_peft_model(m0, LoraConfig(**LORA))  # built from a config: no base_model_name_or_path
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)  # a distinct M1
    args = hub_args(tmp_path, fake_hub, push_merged_weights=True)
    with pytest.raises(ValueError, match="push_merged_weights=True needs the base model's path"):
        CreamTrainer(model=model, args=args, train_dataset=prompts, processing_class=tokenizer)
    assert fake_hub.requests == []  # failed before any network call


def test_the_token_is_in_no_saved_config(tmp_path):
    args = cream_args(tmp_path, hub_token="hf_secret_abcdef")
    assert "hf_secret_abcdef" not in repr(args) + str(args) + args.to_json_string()
    path = tmp_path / "training_args.bin"
    torch.save(args, path)  # what Trainer.save_model writes into a full fine-tuning M<k>
    assert b"hf_secret_abcdef" not in path.read_bytes()
    assert args.hub_token == "hf_secret_abcdef"  # still usable in memory
    clone = copy.deepcopy(args)
    assert clone.hub_token == "hf_secret_abcdef" and clone.to_dict() == args.to_dict()
    assert torch.load(path, weights_only=False).hub_token is None


def test_card_lists_every_round_and_the_evaluation_tables(tmp_path):
    args = cream_args(tmp_path, hub_model_id=REPO, hub_token="hf_secret_abcdef")
    rounds = [
        {"round": 1, "consistency": 0.625, "kendall_tau_mean": 0.25, "kendall_tau_std": 0.5, "num_tied_skipped": 1,
         "num_pairs": 3, "reward_margin_mean": 1.5, "beta": 0.1, "time_train_s": 2.0},
        {"round": 2, "consistency": 0.75, "kendall_tau_mean": 0.5, "kendall_tau_std": 0.1, "num_tied_skipped": 0,
         "num_pairs": 4, "reward_margin_mean": 0.9, "beta": 0.1, "time_train_s": 3.0},
    ]  # fmt: skip
    evaluation = {
        "iterations": ["M1", "M3"],
        "accuracy": {"M1": {"arc_easy": {"accuracy": 0.25, "n": 8}}, "M3": {"arc_easy": {"accuracy": 0.5, "n": 8}}},
        "consistency": {},
    }
    card = build_model_card(
        trainer_cls=CreamTrainer, index=3, first_index=1, settings=CardSettings.from_args(args), rounds=rounds,
        peft=False, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", evaluation=evaluation,
    ).content  # fmt: skip
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| 1 | 0.625 | 0.250 ± 0.500 | 1 | 3 | 1.500 |" in card
    assert "| 2 | 0.750 | 0.500 ± 0.100 | 0 | 4 | 0.900 |" in card
    assert "## Evaluation" in card and "50.0" in card
    assert f"[M2](https://huggingface.co/{REPO}/tree/M2)" in card
    assert "`consistency_measure` | `kendall`" in card
    assert "hf_secret_abcdef" not in card


def test_card_of_a_local_run_loads_from_the_folder(tmp_path):
    args = cream_args(tmp_path / "run")  # no hub_model_id
    card = build_model_card(
        trainer_cls=CreamTrainer, index=2, first_index=1, settings=CardSettings.from_args(args),
        rounds=[{"round": 1, "consistency": 0.5}],
        peft=True, base_model=str(tmp_path / "base"),
    ).content  # fmt: skip
    folder = (tmp_path / "run" / "M2").as_posix()
    assert f'AutoPeftModelForCausalLM.from_pretrained("{folder}")' in card and "revision" not in card
    assert "from M1 (the folder `M1` next to this one)" in card and "huggingface.co/run" not in card
    assert "a LoRA adapter on" in card and "| 1 | 0.500 |" in card


TWO_RANKS_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import QUESTIONS, cream_args, perturbed, tiny_llama, tiny_tokenizer
from datasets import Dataset
from trl_cream import CreamTrainer
from trl_cream.hub import HubPushError

tokenizer = tiny_tokenizer()
m0 = tiny_llama(tokenizer)
prompts = Dataset.from_dict({{"prompt": [[{{"role": "user", "content": q}}] for q in QUESTIONS]}})


def make(token):
    args = cream_args({out!r}, num_iterations=1, push_to_hub=True, hub_model_id={repo!r}, hub_token=token,
                      hub_push_retries=0)
    return CreamTrainer(model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts,
                        processing_class=tokenizer)


try:
    make("hf_wrong_token")
except HubPushError as error:
    sys.stdout.write(f"RANK_RAISED {{'401' in str(error)}}\\n")  # one write: the ranks' lines must not interleave
    sys.stdout.flush()
make(sys.argv[1]).train()
"""


def test_two_processes_check_once_and_push_from_the_main_process(tmp_path, fake_hub):
    """torchrun with 2 CPU ranks: a refused token raises on both ranks (no rank waits for the other), and a run
    pushes each iteration once, from the main process."""
    import os
    import subprocess
    import sys

    script = tmp_path / "two_ranks.py"
    tests = str(Path(__file__).parent)
    script.write_text(TWO_RANKS_SCRIPT.format(tests=tests, out=str(tmp_path / "run"), repo=REPO))
    env = {**os.environ, "HF_ENDPOINT": fake_hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(tests).parent), tests])}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), fake_hub.token]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("RANK_RAISED True") == 2  # both ranks raised the main process's HTTP 401 error
    assert fake_hub.count("GET", "/api/whoami-v2") == 2  # one check per trainer, on the main process only
    assert fake_hub.count("POST", "/commit/") == 4  # M1, M2: branch + main each, pushed once
    assert set(fake_hub.branches(REPO)) == {"main", "M1", "M2"}
    out = tmp_path / "run"
    assert sha256(download(fake_hub, tmp_path, "model.safetensors", "M2")) == sha256(out / "M2" / "model.safetensors")
    assert is_pushed(out, 1) and is_pushed(out, 2)
    assert_no_token(fake_hub.token, out, text=run.stdout + run.stderr)
