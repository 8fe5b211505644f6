"""Scoring: loss and bits per byte on text, multiple choice by log-likelihood, generation with exact match.

Multiple choice follows lm-evaluation-harness exactly, so the same model scores the same there and here:
each choice is the continuation `delimiter + choice`; trailing spaces of the context move onto the
continuation; the continuation's tokens are those of encode(context + continuation) past encode(context);
`acc` takes the highest summed log-likelihood and `acc_norm` the highest log-likelihood divided by the
choice's length in characters. Sequences longer than the model's context keep their last tokens.
"""

from __future__ import annotations

import math
import re

import numpy as np

from tinylm.errors import UserError
from tinylm.eval.tasks import GenExample, MCExample, Task, load_tasks
from tinylm.generate import SamplingConfig, adds_bos, generate_ids, special_ids


class Scorer:
    """Log-likelihoods of token continuations in length-sorted, right-padded batches."""

    def __init__(self, lm, tok, meta: dict | None = None, batch_tokens: int = 2048):
        self.lm, self.tok, self.meta = lm, tok, meta or {}
        ids = special_ids(tok, self.meta)
        self.bos = ids["bos"] if adds_bos(self.meta) else None
        self.pad = next((i for i in (ids["pad"], ids["eos"], 0) if i is not None))
        self.batch_tokens = batch_tokens

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos] if self.bos is not None else []) + ids

    def split_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return whole[: len(ctx)], whole[len(ctx):]

    def token_scores(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """For each sequence, the log-probability of each of its tokens after the first."""
        limit = self.lm.max_len + 1
        seqs = [s[-limit:] for s in sequences]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[np.ndarray] = [np.zeros(0)] * len(seqs)
        start = 0
        while start < len(order):
            width = len(seqs[order[start]])
            rows = max(1, self.batch_tokens // max(width, 1))
            chunk = order[start : start + rows]
            batch = np.full((len(chunk), max(width, 2)), self.pad, dtype=np.int64)
            for r, i in enumerate(chunk):
                batch[r, : len(seqs[i])] = seqs[i]
            lp = self.lm.token_logprobs(batch)
            for r, i in enumerate(chunk):
                out[i] = lp[r, : max(len(seqs[i]) - 1, 0)]
            start += len(chunk)
        return out

    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        scores = self.token_scores([c + x for c, x in pairs])
        return [float(s[len(s) - len(x):].sum()) if x else 0.0 for s, (_, x) in zip(scores, pairs)]


def mean_stderr(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return None
    return float(values.std(ddof=1) / math.sqrt(values.size))


def score_mc(scorer: Scorer, examples: list[MCExample]) -> dict:
    pairs, owners = [], []
    for j, ex in enumerate(examples):
        for choice in ex.choices:
            pairs.append(scorer.split_pair(ex.context, ex.delimiter + choice))
            owners.append(j)
    lls = scorer.loglikelihoods(pairs)
    acc, acc_norm, k = [], [], 0
    for ex in examples:
        ll = np.array(lls[k : k + len(ex.choices)])
        k += len(ex.choices)
        lengths = np.array([float(len(c)) for c in ex.choices])
        acc.append(float(np.argmax(ll) == ex.gold))
        acc_norm.append(float(np.argmax(ll / lengths) == ex.gold))
    return {"metrics": {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))},
            "stderr": {"acc": mean_stderr(acc), "acc_norm": mean_stderr(acc_norm)}, "samples": len(examples)}


def score_text(scorer: Scorer, docs: list[str]) -> dict:
    """Every token after a document's first is predicted once; long documents go in context-sized windows."""
    from tinylm.data.tokenizer import token_bytes

    nbytes = token_bytes(scorer.tok)
    window = scorer.lm.max_len
    pieces, owner = [], []
    for d, text in enumerate(docs):
        ids = scorer.encode(text)
        for start in range(0, max(len(ids) - 1, 1), window):
            pieces.append(ids[start : start + window + 1])
            owner.append(d)
    scores = scorer.token_scores(pieces)
    nats, toks, byts = np.zeros(len(docs)), np.zeros(len(docs)), np.zeros(len(docs))
    for d, piece, s in zip(owner, pieces, scores):
        nats[d] -= s.sum()
        toks[d] += len(s)
        byts[d] += nbytes[np.asarray(piece[1:], dtype=np.int64)].sum() if len(piece) > 1 else 0
    total_bytes = max(byts.sum(), 1.0)
    per_doc_bpb = [n / (math.log(2) * b) for n, b in zip(nats, byts) if b > 0]
    return {"metrics": {"loss": float(nats.sum() / max(toks.sum(), 1)),
                        "bpb": float(nats.sum() / (math.log(2) * total_bytes)),
                        "tokens": int(toks.sum()), "bytes": int(byts.sum())},
            "stderr": {"bpb": mean_stderr(per_doc_bpb)}, "samples": len(docs)}


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _normalize(text: str) -> str:
    text = _THOUSANDS.sub("", text.strip()).replace("$", "").rstrip(".").strip()
    return " ".join(text.split()).lower()


def _clean_number(text: str) -> str:
    return _normalize(text).replace(",", "")


def extract_answer(text: str) -> str | None:
    """What follows the last `####` (GSM8K's answer line), else the last number in the text."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("####"):
            return _normalize(line[4:])
    found = _NUMBER.findall(text)
    return _clean_number(found[-1]) if found else None


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def answers_match(predicted: str | None, gold: str) -> bool:
    """Numbers compare by value (`18.00` is `18`; `#### 18 apples` counts when the gold is a number), anything
    else as normalized text (sorted lists, words)."""
    if predicted is None:
        return False
    predicted, gold = _normalize(predicted), _normalize(gold)
    want = _as_number(gold)
    if want is None:
        return predicted == gold
    got = _as_number(predicted)
    if got is None:
        first = _NUMBER.search(predicted)
        got = _as_number(_clean_number(first.group())) if first else None
    return got is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-9)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score_gen(lm, tok, meta: dict, task: Task, samples: int = 1, temperature: float = 0.0, chat: bool = False,
              seed: int = 0, batch_size: int = 16, log: list | None = None) -> dict:
    """Exact match of the extracted final answers; with `log`, one row per generation is appended to it."""
    ids = special_ids(tok, meta)
    stops = [ids["eos"], ids["end"], ids["bos"]]
    pad = next((i for i in (ids["pad"], ids["eos"], 0) if i is not None))
    scorer = Scorer(lm, tok, meta)
    cfg = SamplingConfig(max_tokens=task.max_tokens, temperature=temperature if samples > 1 or temperature else 0.0,
                         stop_strings=task.stops(chat), seed=seed)
    correct = []
    examples: list[GenExample] = task.examples
    per_batch = max(1, batch_size // samples)
    for start in range(0, len(examples), per_batch):
        chunk = examples[start : start + per_batch]
        prompts = [scorer.encode(ex.text(meta, chat)) for ex in chunk for _ in range(samples)]
        cfg.seed = seed + start
        outs = generate_ids(lm, tok, prompts, cfg, stops, pad)
        for j, ex in enumerate(chunk):
            texts = [o.text for o in outs[j * samples : (j + 1) * samples]]
            verdicts = [answers_match(extract_answer(t), ex.answer) for t in texts]
            correct.append(sum(verdicts))
            if log is not None:
                log.extend({"task": task.name, "prompt": ex.prompt, "completion": t, "extracted": extract_answer(t),
                            "expected": ex.answer, "correct": bool(v)} for t, v in zip(texts, verdicts))
    em = [c / samples for c in correct]
    metrics, stderr = {"exact_match": float(np.mean(em))}, {"exact_match": mean_stderr(em)}
    k = 1
    while samples > 1 and k <= samples:
        vals = [pass_at_k(samples, c, k) for c in correct]
        metrics[f"pass@{k}"], stderr[f"pass@{k}"] = float(np.mean(vals)), mean_stderr(vals)
        k *= 2
    return {"metrics": metrics, "stderr": stderr, "samples": len(examples), "generations_per_sample": samples}


def macro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """The mean over the classes that occur (as gold or predicted) of each class's F1."""
    scores = []
    for c in np.union1d(gold, pred):
        tp = float(np.sum((pred == c) & (gold == c)))
        both = float(np.sum(pred == c) + np.sum(gold == c))
        scores.append(2 * tp / both)
    return float(np.mean(scores))


def score_classify(lm, tok, meta: dict, task: Task) -> dict:
    """Accuracy and macro-F1 of the classification head's most probable label (a committee's averages its
    members' class probabilities). The labels are the checkpoint's, in the order its head was trained on."""
    from tinylm.post.classify import encode_texts, label_indices, pad_id

    labels = meta.get("labels")
    if not labels:
        raise UserError(f"task {task.name}: the model has no classification head (no labels in its checkpoint); "
                        f"fine-tune it with a classify stage first")
    gold = np.asarray(label_indices([label for _, label in task.examples], labels, f"task {task.name}"))
    rows = encode_texts(tok, [text for text, _ in task.examples], lm.max_len)
    pred = lm.class_logprobs(rows, pad_id(tok)).argmax(axis=1)
    correct = (pred == gold).astype(np.float64)
    return {"metrics": {"accuracy": float(correct.mean()), "macro_f1": macro_f1(gold, pred)},
            "stderr": {"accuracy": mean_stderr(correct)}, "samples": len(task.examples)}


def run_tasks(lm, tok, tasks: list[Task], meta: dict | None = None, samples: int = 1, temperature: float = 0.0,
              chat: bool = False, seed: int = 0, on_task=None, log: list | None = None, batch_size: int = 16) -> dict:
    """{task name: {"kind", "metrics", "stderr", "samples"}} for a Model or a committee of them; `log` collects
    a row per generation of the generative tasks, which decode `batch_size` generations at a time (see
    `score_gen`)."""
    meta = meta or {}
    scorer = Scorer(lm, tok, meta)
    results = {}
    for task in tasks:
        if task.kind == "mc":
            r = score_mc(scorer, task.examples)
        elif task.kind == "text":
            r = score_text(scorer, task.examples)
        elif task.kind == "classify":
            r = score_classify(lm, tok, meta, task)
        else:
            r = score_gen(lm, tok, meta, task, samples, temperature, chat, seed, batch_size, log)
        results[task.name] = {"kind": task.kind, **r}
        if on_task is not None:
            on_task(task.name, results[task.name])
    return results


def flat_metrics(results: dict) -> dict:
    """{task: {metric: value, metric_stderr: value, samples: n}}: what `--json` prints."""
    out = {}
    for name, r in results.items():
        row = dict(r["metrics"])
        row.update({f"{k}_stderr": v for k, v in r["stderr"].items()})
        row["samples"] = r["samples"]
        out[name] = row
    return out


def markdown_table(results: dict) -> str:
    lines = ["| Task | Metric | Value | Stderr | Samples |", "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        for metric, value in r["metrics"].items():
            se = r["stderr"].get(metric)
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {name} | {metric} | {shown} | {'' if se is None else f'{se:.4f}'} | {r['samples']} |")
    return "\n".join(lines) + "\n"


def evaluate(backend, shape, params, tokenizer_path, task_specs, limit: int | None = None,
             meta: dict | None = None, chat: bool = False, dtype: str = "float32", batch_size: int = 16) -> dict:
    """In-training evaluation: {task: {metric: value}} for the weights being trained (numpy or backend arrays),
    computed in `dtype`.

    `task_specs` are command-line task names (a list or a comma-separated string) or `Task`s from
    `tinylm.eval.tasks.load_tasks`, which a caller evaluating every N steps can load once and pass again.
    """
    from tinylm.data.tokenizer import load_tokenizer
    from tinylm.generate import Model

    lm = Model(backend, shape, params, dtype)
    if isinstance(task_specs, (list, tuple)) and task_specs and isinstance(task_specs[0], Task):
        tasks = list(task_specs)
    else:
        tasks = load_tasks(task_specs, limit)
    return flat_metrics(run_tasks(lm, load_tokenizer(tokenizer_path), tasks, meta, chat=chat, batch_size=batch_size))
