"""Issue 25: the completions tables in the trackers (`log_completions`) and the `trl-cream inspect` page, on a tiny
two-round run (one run shared by the module's tests, ~10 s)."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import cream_args, perturbed, tiny_llama, tiny_tokenizer
from datasets import Dataset, load_from_disk
from scipy.stats import kendalltau

from trl_cream import CreamConfig, CreamTrainer
from trl_cream.cli import main
from trl_cream.inspection.page import write_page
from trl_cream.inspection.rounds import readable_prompt
from trl_cream.inspection.trackers import TABLE_KEY

PROMPTS = ["What is 3 plus 4?", "Name a mammal.", "Where does rain come from?", "What do plants need?",
           "Which is bigger, 12 or 30?", "Say hello.", "What is the answer?", "Name a school subject."]  # fmt: skip
TB_TAG = f"train/{TABLE_KEY}"
PROMPTS_BY_TEXT = {q: q for q in PROMPTS}  # a chat prompt is shown as its message's text


def _run(out: Path, **overrides) -> CreamTrainer:
    tokenizer = tiny_tokenizer()
    m0 = tiny_llama(tokenizer)
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in PROMPTS]})
    args = cream_args(out, **{"report_to": "tensorboard", **overrides})
    trainer = CreamTrainer(model=perturbed(m0), ref_model=m0, args=args, train_dataset=prompts,
                           processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return trainer


def read_texts(out: Path) -> dict[str, list[tuple[int, str]]]:
    """Every text summary of the run's TensorBoard event files: tag -> [(step, text)]."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    texts: dict[str, list[tuple[int, str]]] = {}
    for path in sorted(out.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "text":
                    text = tensor_util.make_ndarray(value.tensor).item().decode("utf-8")
                    texts.setdefault(value.tag.removesuffix("/text_summary"), []).append((event.step, text))
    return texts


def read_scalar_steps(out: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(out.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> tuple[Path, str]:
    """A two-round run with the completions tables on (TensorBoard), and what it printed."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("inspect") / "run"
    printed = io.StringIO()
    with redirect_stdout(printed):
        _run(out, log_completions=True, num_completions_to_print=2)
    return out, printed.getvalue()


def _round_table(out: Path, t: int) -> tuple[Dataset, Dataset]:
    folder = out / "rounds" / f"round_{t}"
    return load_from_disk(str(folder / "candidates")), load_from_disk(str(folder / "pairs"))


# ------------------------------------------------------------------------------------------------ trackers
def test_tensorboard_gets_one_completions_table_per_round_at_the_rounds_step(logged_run):
    out, _ = logged_run
    texts = read_texts(out)
    assert TB_TAG in texts, sorted(texts)
    tables = texts[TB_TAG]
    # the round's own metrics (cream/consistency) and its table share the round's step
    assert [step for step, _ in tables] == read_scalar_steps(out, "train/cream/consistency")
    assert len(tables) == 2
    for t, (_, text) in enumerate(tables, start=1):
        candidates, pairs = _round_table(out, t)
        assert text.startswith(f"Round {t}:")
        body = text.split("\n")[4:]
        assert len(body) == len(set(candidates["prompt_index"]))  # one row per prompt
        for row in candidates:  # every candidate, with its reward and both ranks
            line = body[row["prompt_index"]]
            assert f"[{row['candidate_index']}] r={row['reward']:.3g} (#{row['rank']:g})" in line
            assert f"r′={row['baseline_reward']:.3g} (#{row['baseline_rank']:g})" in line
        for pair in pairs:
            line = body[pair["prompt_index"]]
            assert f"✓ [{pair['chosen_index']}]" in line or f"✓ ≠ [{pair['chosen_index']}]" in line
            assert f"✗ [{pair['rejected_index']}]" in line or f"✗ ≠ [{pair['rejected_index']}]" in line
            assert f"| {pair['consistency']:.3f} |" in line  # the C the loss used


def test_console_prints_the_first_rows(logged_run):
    _, printed = logged_run
    for t in (1, 2):
        assert f"CREAM round {t}: completions (2 of 4 prompts)" in printed


def test_tables_are_off_by_default_and_cost_nothing(tmp_path, monkeypatch, capsys):
    import trl_cream.inspection.trackers as trackers

    def boom(*args, **kwargs):
        raise AssertionError("a table was built with log_completions=False")

    monkeypatch.setattr(trackers, "label_round", boom)
    _run(tmp_path / "run", num_iterations=1)
    assert TB_TAG not in read_texts(tmp_path / "run")
    assert "completions" not in capsys.readouterr().out
    assert read_scalar_steps(tmp_path / "run", "train/cream/consistency")  # TensorBoard did log the round


def test_wandb_offline_run_gets_a_table(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tmp_path / "run", num_iterations=1, report_to="wandb", log_completions=True, num_completions_to_print=0)
    wandb.finish()
    tables = sorted(tmp_path.rglob("*.table.json"))
    assert tables, "no W&B table was written"
    import json

    table = json.loads(tables[0].read_text())
    candidates, _ = _round_table(tmp_path / "run", 1)
    columns = table["columns"]
    assert {"prompt", "completion_0", "reward_0", "baseline_reward_0", "rank_0", "chosen", "tau"} <= set(columns)
    assert len(table["data"]) == len(set(candidates["prompt_index"]))
    prompts = [row[columns.index("prompt")] for row in table["data"]]
    assert prompts == [readable_prompt(candidates[i]["prompt"]) for i in range(0, len(candidates), 3)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_completions_to_print=-1), "num_completions_to_print=-1"),
        (dict(num_completions_to_print=3), "log_completions=False"),
        (dict(log_unique_prompts=True), "log_completions=False"),
    ],
)
def test_completions_settings_are_validated(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        CreamConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **overrides)


# ------------------------------------------------------------------------------------------------ the page
class PageParser(HTMLParser):
    """The page's prompt rows and candidate rows, with their data attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[dict] = []
        self.candidates: list[dict] = []
        self.svgs = 0
        self.scripts_with_src = 0
        self.links: list[str] = []
        self._current: dict | None = None
        self._text: list[str] | None = None
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.svgs += 1
        if tag == "script" and "src" in a:
            self.scripts_with_src += 1
        if tag in ("link", "img") and (a.get("href") or a.get("src") or "").startswith("http"):
            self.links.append(a.get("href") or a.get("src"))
        cls = a.get("class") or ""
        if tag == "tr" and "prompt-row" in cls:
            self._current = {**a, "candidates": []}
            self.prompts.append(self._current)
        elif tag == "tr" and "candidate" in cls.split():
            cand = {**a, "text": []}
            self._current["candidates"].append(cand)
            self.candidates.append(cand)
        elif tag == "summary":
            self._text = []
        elif tag == "td" and "completion" in cls:
            self._text = self._current["candidates"][-1]["text"]

    def handle_endtag(self, tag):
        if tag == "summary" and self._text is not None:
            self._current["prompt"] = "".join(self._text)
            self._text = None
        elif tag == "td" and self._text is not None:
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def parse(page: Path) -> PageParser:
    parser = PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_page_shows_every_round_prompt_and_candidate(logged_run, tmp_path):
    out, _ = logged_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    page = write_page(out, tmp_path / "page.html")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # read-only: nothing written in the run
    parsed = parse(page)
    text = page.read_text(encoding="utf-8")
    assert parsed.scripts_with_src == 0 and not parsed.links  # self-contained
    assert parsed.svgs == 4
    assert "M1</b>" in text and "M2</b>" in text and "M3</b>" in text  # the lineage
    for t in (1, 2):
        candidates, pairs = _round_table(out, t)
        rows = [p for p in parsed.prompts if p["data-round"] == str(t)]
        assert sorted(int(p["data-index"]) for p in rows) == sorted(set(candidates["prompt_index"]))
        chosen = {p["prompt_index"]: (p["chosen_index"], p["rejected_index"], p["consistency"]) for p in pairs}
        for row in rows:
            j = int(row["data-index"])
            mine = candidates.select([k for k, p in enumerate(candidates["prompt_index"]) if p == j])
            assert row["prompt"] == readable_prompt(mine[0]["prompt"]) == PROMPTS_BY_TEXT[row["prompt"]]
            # τ cross-checked with scipy's τ-b on the saved rewards
            tau = kendalltau(mine["reward"], mine["baseline_reward"]).statistic
            assert (row["data-tau"] == "" and math.isnan(tau)) or float(row["data-tau"]) == pytest.approx(tau)
            shown = {int(c["data-candidate"]): c for c in row["candidates"]}
            assert sorted(shown) == sorted(mine["candidate_index"])
            for cand in mine:
                c = shown[cand["candidate_index"]]
                text = f"[{cand['candidate_index']}] {cand['completion']}"  # HTML reads a lone CR as a newline
                assert "".join(c["text"]) == text.replace("\r\n", "\n").replace("\r", "\n")
            if j in chosen:
                pos, neg, c = chosen[j]
                assert "chosen" in shown[pos]["class"] and "rejected" in shown[neg]["class"]
                assert float(row["data-loss_c"]) == pytest.approx(c)
            else:
                assert row["data-loss_c"] == ""
    # most inconsistent first: by τ, nan last
    taus = [float(p["data-tau"]) if p["data-tau"] else math.inf for p in parsed.prompts]
    assert taus == sorted(taus)


def test_cli_inspect_and_a_study_folder_side_by_side(logged_run, tmp_path, capsys):
    out, _ = logged_run
    study = tmp_path / "study"
    for method in ("srlm", "cream"):
        shutil.copytree(out, study / method / "seed0", ignore=shutil.ignore_patterns("M*", "runs"))
    assert main(["inspect", str(study)]) == 0
    page = study / "inspect.html"
    assert f"Page written to {page}" in capsys.readouterr().out
    parsed = parse(page)
    text = page.read_text(encoding="utf-8")
    assert "Methods side by side" in text
    assert {p["data-run"] for p in parsed.prompts} == {"srlm/seed0", "cream/seed0"}
    assert len(parsed.prompts) == 2 * 8


def test_cli_inspect_refuses_a_folder_without_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "holds no CREAM run" in capsys.readouterr().err


def test_page_of_a_run_still_training(logged_run, tmp_path):
    """Round 2 labelled but not finished (no metrics.json, no M3): shown as training, with its prompts."""
    out, _ = logged_run
    running = tmp_path / "running"
    shutil.copytree(out, running, ignore=shutil.ignore_patterns("M3", "runs"))
    (running / "rounds" / "round_2" / "metrics.json").unlink()
    page = write_page(running)
    text = page.read_text(encoding="utf-8")
    assert "labelled (training)" in text
    assert len([p for p in parse(page).prompts if p["data-round"] == "2"]) == 4


def _synthetic_run(folder: Path, num_prompts: int, n: int) -> None:
    """A run folder with one round of ``num_prompts`` × ``n`` candidates of ~50 tokens' text."""
    import random

    rng = random.Random(0)
    words = "the a model answer because light water plant energy rain cloud sun number seven".split()
    rows = {k: [] for k in ("prompt_index", "candidate_index", "prompt", "completion", "num_tokens", "reward",
                            "baseline_reward", "rank", "baseline_rank")}  # fmt: skip
    pairs = {k: [] for k in ("prompt_index", "chosen_index", "rejected_index", "consistency")}
    for j in range(num_prompts):
        rewards = [rng.gauss(0, 1) for _ in range(n)]
        baseline = [rng.gauss(0, 1) for _ in range(n)]
        rank = [1 + sorted(rewards, reverse=True).index(r) for r in rewards]
        base_rank = [1 + sorted(baseline, reverse=True).index(r) for r in baseline]
        for i in range(n):
            rows["prompt_index"].append(j)
            rows["candidate_index"].append(i)
            rows["prompt"].append(f"Question {j}: " + " ".join(rng.choices(words, k=20)))
            rows["completion"].append(" ".join(rng.choices(words, k=50)))
            rows["num_tokens"].append(50)
            rows["reward"].append(rewards[i])
            rows["baseline_reward"].append(baseline[i])
            rows["rank"].append(float(rank[i]))
            rows["baseline_rank"].append(float(base_rank[i]))
        pairs["prompt_index"].append(j)
        pairs["chosen_index"].append(rank.index(1))
        pairs["rejected_index"].append(rank.index(n))
        pairs["consistency"].append(0.6)
    round_dir = folder / "rounds" / "round_1"
    Dataset.from_dict(rows).save_to_disk(str(round_dir / "candidates"))
    Dataset.from_dict(pairs).save_to_disk(str(round_dir / "pairs"))
    (round_dir / "metrics.json").write_text(f'{{"round": 1, "consistency": 0.6, "num_pairs": {num_prompts}}}')


def test_a_thousand_prompts_page_is_small_and_fast(tmp_path):
    _synthetic_run(tmp_path / "big", 1000, 5)
    start = time.process_time()  # CPU time: the wall time of a shared CI machine says more about its load
    page = write_page(tmp_path / "big")
    seconds = time.process_time() - start
    size = page.stat().st_size
    assert size < 5 * 2**20, f"{size / 2**20:.1f} MB"
    assert seconds < 5, f"{seconds:.1f} s"
    parsed = parse(page)
    assert len(parsed.prompts) == 1000 and len(parsed.candidates) == 5000


# ------------------------------------------------------------------------------------------------ a real browser
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]  # fmt: skip
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_the_page_renders_filters_and_shows_its_plots_in_chromium(logged_run, tmp_path):
    out, _ = logged_run
    page = write_page(out, tmp_path / "page.html")
    expected = {p["data-index"] + "/" + p["data-round"] for p in parse(page).prompts}
    browser = _chromium()
    url = page.resolve().as_uri() + "#round=2"
    dom = _headless(browser, tmp_path / "profile1", "--virtual-time-budget=5000", "--dump-dom", url).stdout
    assert 'data-ready="1"' in dom, "the page's script did not run"
    dom_page = PageParser()
    dom_page.feed(dom)
    visible = [p for p in dom_page.prompts if "hidden" not in p]
    assert {p["data-round"] for p in visible} == {"2"} and len(visible) == 4  # the round filter applied
    assert len(dom_page.prompts) == len(expected)
    assert "4 of 8 prompts" in dom
    assert dom_page.svgs == 4
    shot = tmp_path / "shot.png"
    _headless(browser, tmp_path / "profile2", "--window-size=1280,900", f"--screenshot={shot}", url)
    assert shot.is_file() and shot.stat().st_size > 10_000  # plots and tables drawn, not a blank page


def test_trackio_local_run_gets_a_table(tmp_path, monkeypatch):
    import sys

    pytest.importorskip("trackio", reason="trackio is not installed (pip install trackio)")
    from trackio.sqlite_storage import SQLiteStorage

    folder = tmp_path / "trackio"  # Trackio reads TRACKIO_DIR once, on import (TRL imports it): point its modules here
    for name, module in list(sys.modules.items()):
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", folder)

    project = "cream-inspect-test"
    _run(
        tmp_path / "run",
        num_iterations=1,
        report_to="trackio",
        project=project,
        log_completions=True,
        num_completions_to_print=0,
    )  # fmt: skip (the trainer finishes the Trackio run when training ends)
    (run,) = SQLiteStorage.get_runs(project)
    logs = [log for log in SQLiteStorage.get_logs(project, run=run) if f"train/{TABLE_KEY}" in log]
    assert len(logs) == 1, "no completions table in the Trackio run"
    table = logs[0][f"train/{TABLE_KEY}"]
    assert table["_type"] == "trackio.table"
    rows = table["_value"]
    candidates, pairs = _round_table(tmp_path / "run", 1)
    assert [r["prompt"] for r in rows] == [
        readable_prompt(candidates[i]["prompt"]) for i in range(0, len(candidates), 3)
    ]
    assert logs[0]["step"] == rows[0]["step"] == 1  # round 1's step: the run's first (no SFT stage here)
    for cand in candidates:
        row = rows[cand["prompt_index"]]
        i = cand["candidate_index"]
        assert row[f"completion_{i}"] == cand["completion"]
        assert row[f"reward_{i}"] == pytest.approx(cand["reward"])
        assert row[f"baseline_rank_{i}"] == cand["baseline_rank"]
    for pair in pairs:
        row = rows[pair["prompt_index"]]
        assert (row["chosen"], row["rejected"]) == (pair["chosen_index"], pair["rejected_index"])
        assert row["loss_consistency"] == pytest.approx(pair["consistency"])


# ------------------------------------------------------------------------------------------------ the model cards
def test_each_iterations_card_shows_its_rounds_plot_and_most_inconsistent_prompts(logged_run):
    import xml.etree.ElementTree as ET

    from trl_cream.inspection.rounds import prompt_rows

    out, _ = logged_run
    assert "What round" not in (out / "M1" / "README.md").read_text(encoding="utf-8")  # M1: no round made it
    for t in (1, 2):
        folder = out / f"M{t + 1}"
        card = (folder / "README.md").read_text(encoding="utf-8")
        assert f"## What round {t} rewarded" in card and "![Round" in card and "(cream_round.svg)" in card
        assert ET.parse(folder / "cream_round.svg").getroot().tag.endswith("svg")
        candidates, pairs = _round_table(out, t)
        rows = prompt_rows(t, candidates, pairs)
        lowest = sorted(rows, key=lambda r: (math.isnan(r.tau), 0.0 if math.isnan(r.tau) else r.tau))[:5]
        section = card[card.index(f"## What round {t} rewarded") :].split("\n## ")[0]
        table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| prompt")]
        assert len(table) == len(lowest)
        for line, row in zip(table, lowest):
            assert line.startswith("| " + " ".join(row.prompt.split()).replace("|", "\\|")[:40])
            assert (f"| {row.tau:.2f} |" if not math.isnan(row.tau) else "| — |") in line


def test_log_unique_prompts_keeps_the_first_row_of_a_repeated_prompt():
    from trl_cream.inspection.rounds import prompt_rows, unique_prompts
    from trl_cream.inspection.trackers import completions_frame

    texts = ["same", "other", "same"]
    rows = {k: [] for k in ("prompt_index", "candidate_index", "prompt", "completion", "num_tokens", "reward",
                            "baseline_reward", "rank", "baseline_rank")}  # fmt: skip
    for j, text in enumerate(texts):
        for i, (r, b) in enumerate([(1.0, 0.0), (0.0, 1.0)]):
            values = (j, i, text, f"c{j}{i}", 3, r + j, b, 1.0 + i, 2.0 - i)
            for key, value in zip(rows, values):
                rows[key].append(value)
    table = prompt_rows(1, Dataset.from_dict(rows), None)
    assert [r.tau for r in table] == [-1.0, -1.0, -1.0]  # the two rankings are reversed on every prompt
    kept = unique_prompts(table)
    assert [(r.prompt, r.prompt_index) for r in kept] == [("same", 0), ("other", 1)]
    frame = completions_frame(kept, step=7)
    assert list(frame["prompt"]) == ["same", "other"] and set(frame["step"]) == {7}
    assert list(frame["completion_1"]) == ["c01", "c11"] and frame["chosen"].isna().all()
