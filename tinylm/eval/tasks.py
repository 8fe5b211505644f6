"""Evaluation tasks: readers for the usual JSON Lines formats of public benchmarks, and the built-in ones.

A task is named on the command line as `KIND:PATH` (`gsm8k:data/gsm8k_test.jsonl`, `arc:ARC-Easy-test.jsonl`,
`mc:my_choices.jsonl`, `text:held_out.txt`, `classify:SPEC` for the test split of a classification task of
`tinylm.data.classify_tasks`, scored by a fine-tuned classification head), as a bare path whose kind is guessed from its fields, or as the
name of a built-in synthetic family (`arithmetic`, `word_problems`, ...). A family with held-out phrasings
(`word_problems`) becomes two tasks, `<family>_unseen` and `<family>_seen`; `<family>_by_group` is one task per
group of wording held out alone (`<family>_unseen_verbs`, ...), to find where reading fails. Prompts follow lm-evaluation-harness's
zero-shot templates for the public benchmarks, so scores are comparable with its numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tinylm.errors import UserError
from tinylm.files import iter_records


@dataclass
class MCExample:
    context: str
    choices: list[str]
    """Scored as continuations `delimiter + choice`; acc_norm divides by len(choice) in characters."""
    gold: int
    delimiter: str = " "


@dataclass
class GenExample:
    prompt: str
    answer: str
    question: str = ""
    """The question alone, where `prompt` frames it for plain completion ("Question: ...\nAnswer:")."""

    def text(self, meta: dict | None, chat: bool) -> str:
        """The prompt as the model is fed it: in chat, the question alone as a user turn of the model's
        template, without the completion framing; otherwise `prompt`."""
        if not chat:
            return self.prompt
        from tinylm.generate import chat_prompt

        return chat_prompt([{"role": "user", "content": (self.question or self.prompt).strip()}], meta)


@dataclass
class Task:
    name: str
    kind: str
    """"mc", "gen", "text" or "classify"."""
    examples: list = field(default_factory=list)
    """`MCExample`s, `GenExample`s, documents, or (text, label) pairs."""
    stop_strings: tuple[str, ...] = ()
    max_tokens: int = 256

    def stops(self, chat: bool) -> tuple[str, ...]:
        """Where a generation stops: a chat answer ends with its turn (the end-of-turn token), since the
        completion stops ("\n\n", "Question:") would cut an answer in paragraphs after its first one."""
        return () if chat else tuple(self.stop_strings)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, row in iter_records(f, str(path)):
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no examples")
    return rows


def _need(row: dict, keys: tuple[str, ...], where: str):
    for k in keys:
        if k not in row:
            raise UserError(f"{where}: missing field {k!r} (this format needs {', '.join(keys)})")
    return [row[k] for k in keys]


def _label(value, n: int, where: str, letters: list[str] | None = None) -> int:
    if letters is not None and str(value) in letters:
        return letters.index(str(value))
    try:
        gold = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: label {value!r} is not one of the choices") from None
    if not 0 <= gold < n:
        raise UserError(f"{where}: label {gold} is out of range for {n} choices")
    return gold


def gsm8k_answer(solution: str) -> str:
    """The text after `####` in a GSM8K reference solution, commas removed."""
    return solution.split("####")[-1].strip().replace(",", "")


def read_gsm8k(path: Path) -> list[GenExample]:
    """GSM8K's format; its answers are matched as numbers, so an answer that is not one is refused here."""
    out = []
    for i, row in enumerate(_read_jsonl(path), 1):
        question, answer = _need(row, ("question", "answer"), f"{path}:{i}")
        gold = gsm8k_answer(str(answer))
        try:
            float(gold.removeprefix("$"))
        except ValueError:
            raise UserError(f"{path}:{i}: the answer {gold[:40]!r} is not a number (a gsm8k task matches numbers; "
                            f"use qa:PATH for answers in words)") from None
        out.append(GenExample(f"Question: {question}\nAnswer:", gold, str(question)))
    return out


def read_arc(path: Path) -> list[MCExample]:
    out = []
    for i, row in enumerate(_read_jsonl(path), 1):
        where = f"{path}:{i}"
        question, key = _need(row, ("question", "answerKey"), where)
        if isinstance(question, dict):  # the original AI2 release nests the choices in the question
            question, choices = _need(question, ("stem", "choices"), where)
            texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
        else:
            (choices,) = _need(row, ("choices",), where)
            texts, labels = _need(choices, ("text", "label"), where)
        out.append(MCExample(f"Question: {question}\nAnswer:", list(texts), _label(key, len(texts), where, list(labels))))
    return out


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[MCExample]:
    out = []
    for i, row in enumerate(_read_jsonl(path), 1):
        where = f"{path}:{i}"
        activity, ctx_a, ctx_b, endings, label = _need(row, ("activity_label", "ctx_a", "ctx_b", "endings", "label"), where)
        ctx = ctx_a + " " + ctx_b.capitalize()
        out.append(MCExample(_hellaswag_clean(activity + ": " + ctx), [_hellaswag_clean(e) for e in endings],
                             _label(label, len(endings), where)))
    return out


def read_piqa(path: Path) -> list[MCExample]:
    out = []
    for i, row in enumerate(_read_jsonl(path), 1):
        goal, sol1, sol2, label = _need(row, ("goal", "sol1", "sol2", "label"), f"{path}:{i}")
        out.append(MCExample(f"Question: {goal}\nAnswer:", [sol1, sol2], _label(label, 2, f"{path}:{i}")))
    return out


def read_boolq(path: Path) -> list[MCExample]:
    out = []
    for i, row in enumerate(_read_jsonl(path), 1):
        where = f"{path}:{i}"
        passage, question = _need(row, ("passage", "question"), where)
        if "answer" in row:
            gold = int(bool(row["answer"]))
        else:
            gold = _label(_need(row, ("label",), where)[0], 2, where)
        out.append(MCExample(f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], gold))
    return out


def read_mc(path: Path) -> list[MCExample]:
    """Generic multiple choice: {"context" (or "query"), "choices": [...], "label" (or "gold")}."""
    out = []
    for i, row in enumerate(_read_jsonl(path), 1):
        where = f"{path}:{i}"
        context = row.get("context", row.get("query"))
        if context is None:
            raise UserError(f"{where}: missing field 'context' (this format needs context, choices, label)")
        (choices,) = _need(row, ("choices",), where)
        if not isinstance(choices, list) or len(choices) < 2:
            raise UserError(f"{where}: 'choices' must be a list of at least two strings")
        label = row.get("label", row.get("gold"))
        if label is None:
            raise UserError(f"{where}: missing field 'label' (this format needs context, choices, label)")
        out.append(MCExample(str(context), [str(c) for c in choices], _label(label, len(choices), where)))
    return out


def read_text(path: Path) -> list[str]:
    """Documents for loss / bits per byte: JSON Lines with a "text" field, or a plain text file (one document)."""
    if path.suffix in (".jsonl", ".json"):
        return [str(_need(row, ("text",), f"{path}:{i}")[0]) for i, row in enumerate(_read_jsonl(path), 1)]
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path} holds no text")
    return [text]


def read_qa(path: Path) -> list[GenExample]:
    """A user's own problems: {"prompt", "answer"} per line, scored by exact match of the final answer."""
    out = []
    for i, row in enumerate(_read_jsonl(path), 1):
        prompt, answer = _need(row, ("prompt", "answer"), f"{path}:{i}")
        out.append(GenExample(f"{str(prompt).rstrip()}\n", str(answer).strip().replace(",", "")))
    return out


READERS = {"gsm8k": read_gsm8k, "qa": read_qa, "arc": read_arc, "hellaswag": read_hellaswag, "piqa": read_piqa,
           "boolq": read_boolq, "mc": read_mc, "text": read_text}
_KINDS = {"gsm8k": "gen", "qa": "gen", "text": "text"}


def _guess_kind(path: Path) -> str:
    if path.suffix not in (".jsonl", ".json"):
        return "text"
    keys = set(_read_jsonl(path)[0])
    for kind, needs in (("arc", {"answerKey"}), ("hellaswag", {"endings"}), ("piqa", {"goal", "sol1"}),
                        ("boolq", {"passage"}), ("mc", {"choices"}), ("gsm8k", {"question", "answer"}),
                        ("qa", {"prompt"}), ("text", {"text"})):
        if needs <= keys:
            return kind
    raise UserError(f"{path}: cannot tell the task format from its fields ({', '.join(sorted(keys))}); "
                    f"name it as KIND:PATH with KIND one of {', '.join(READERS)}")


def synthetic_families() -> list[str]:
    try:
        from tinylm.data import synthetic
    except ImportError:
        return []
    return sorted(getattr(synthetic, "FAMILIES", {}))


def _synthetic_task(family: str, limit: int | None, split: str = "test", name: str | None = None) -> Task:
    from tinylm.data import synthetic

    probs = synthetic.problems(family, n=limit or 200, split=split)
    return Task(name or family, "gen", [GenExample(p.prompt + "\n", str(p.answer)) for p in probs],
                stop_strings=("\n\n",), max_tokens=256)


def _expand(spec: str, limit: int | None) -> list[Task]:
    """A family with held-out phrasings is scored twice, unseen phrasings first: reading, then recall."""
    from tinylm.data import synthetic

    family = spec.strip().removeprefix("synthetic:")
    base = family.removesuffix("_by_group")
    if base != family and base in getattr(synthetic, "PHRASED", ()):
        # Where reading fails: one group of wording held out at a time, the rest seen.
        from tinylm.data.word_problems import GROUPS

        return [_synthetic_task(base, limit, f"unseen-{g}", f"{base}_unseen_{g}") for g in GROUPS]
    if family in getattr(synthetic, "PHRASED", ()):
        return [_synthetic_task(family, limit, "unseen", f"{family}_unseen"),
                _synthetic_task(family, limit, "test", f"{family}_seen")]
    return [load_task(spec, limit)]


def _classify_task(spec: str, limit: int | None) -> Task:
    from tinylm.data.classify_tasks import load_task as load_classify, parse_spec

    kind, path = parse_spec(spec)
    name = Path(path).stem if kind == "jsonl" else f"{kind}-{Path(path).stem}" if path else kind
    test = load_classify(spec).test
    return Task(name, "classify", list(test[:limit] if limit else test))


def load_task(spec: str, limit: int | None = None, split: str = "test") -> Task:
    """A task from its command-line name (see the module docstring); `limit` keeps the first N examples.
    `split` picks the built-in families' side of their train/test split (files are read as they are)."""
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind == "classify":
        if not rest:
            raise UserError("task classify needs the task it scores: classify:SPEC (a JSONL file or folder, "
                            "agnews:PATH, dbpedia:PATH, fewrel:PATH, synthetic, shakespeare-speakers)")
        return _classify_task(rest, limit)
    if rest and kind in READERS:
        path = Path(rest)
        name = path.stem if kind in ("mc", "text") else kind
    elif spec in synthetic_families() or (kind == "synthetic" and rest in synthetic_families()):
        return _synthetic_task(rest or spec, limit, split)
    elif Path(spec).suffix in (".jsonl", ".json", ".txt") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"task file not found: {path}")
        kind = _guess_kind(path)
        name = path.stem
    elif spec in READERS:
        raise UserError(f"task {spec!r} needs a local file: use {spec}:PATH (nothing is downloaded)")
    else:
        known = ", ".join([f"{k}:PATH" for k in READERS] + ["classify:SPEC"] + synthetic_families())
        raise UserError(f"unknown task {spec!r} (known: {known})")
    examples = READERS[kind](path)
    if limit:
        examples = examples[:limit]
    stops = ("Question:", "</s>", "<|im_end|>", "\n\n") if kind == "gsm8k" else ()
    return Task(name, _KINDS.get(kind, "mc"), examples, stop_strings=stops)


def task_key(spec: str) -> str:
    """A task spec's name before any colon (`gsm8k` for gsm8k:PATH): what per-task limits are keyed by."""
    return spec.strip().partition(":")[0]


def load_tasks(specs: str | list[str], limit: int | None = None, limits: dict[str, int] | None = None) -> list[Task]:
    """Several tasks; names made unique so the results object has one key per task. `limits` gives some
    tasks (by `task_key`) another number of examples than `limit` (0: all)."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    if not specs:
        raise UserError("no tasks given (e.g. --tasks gsm8k:data/gsm8k_test.jsonl,arithmetic)")
    limits = limits or {}
    tasks = [t for s in specs for t in _expand(s, limits.get(task_key(s), limit) or None)]
    seen: dict[str, int] = {}
    for t in tasks:
        seen[t.name] = seen.get(t.name, 0) + 1
        if seen[t.name] > 1:
            t.name = f"{t.name}_{seen[t.name]}"
    return tasks
