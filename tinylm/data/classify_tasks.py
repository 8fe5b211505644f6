"""Classification tasks for fine-tuning and evaluating encoders (and decoders): text and label pairs.

`load_task(spec)` reads one task. A spec is a path or `kind:PATH`:

    data/task.jsonl            {"text": ..., "label": ...} rows, split into train and test by `test_fraction`
    data/task/                 a folder with train.jsonl and test.jsonl
    agnews:PATH, dbpedia:PATH  their CSV layout (class index, title, description; no header): a folder with
                               train.csv and test.csv, or one CSV to split; label names from classes.txt
    fewrel:PATH                FewRel JSON (relation -> [{tokens, h, t}]): a folder with train.json and
                               test.json, or one file to split; the text marks the two entities
    synthetic                  built in: which generator of `tinylm.data.synthetic` wrote a problem
    shakespeare-speakers[:PATH]  built in: which of the ten most frequent speakers says a speech of tiny
                               Shakespeare (`<checkout>/../shared/data/tinyshakespeare.txt` by default)

Splits made here are stratified and seeded, and keep at least one row of every label in training, so a split
never yields a test label the model cannot know. Every bad input is a one-line `UserError` naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tinylm.errors import UserError
from tinylm.files import iter_records

VERSION = 1
"""Bumped whenever a loader's output changes for the same input (prepared data that leaves a task's test texts
out is then rebuilt)."""

KINDS = ("jsonl", "agnews", "dbpedia", "fewrel", "synthetic", "shakespeare-speakers")
DEFAULT_TEST_FRACTION = 0.2
ENTITY_MARKS = ("[E1]", "[/E1]", "[E2]", "[/E2]")
SHAKESPEARE_FILE = "tinyshakespeare.txt"
SPEAKERS = 10
MIN_SPEECH_CHARS = 40
"""Shorter speeches ("Ay, my lord.") are left out of the speaker task: they say nothing of who speaks, and a
short held-out text would match, and so remove, many unrelated passages of the pretraining text."""

SYNTHETIC_FAMILIES = ("stories", "word_problems", "arithmetic", "counting", "comparison", "sorting", "units")
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 120, 40
"""Rows per label of the built-in synthetic task."""


@dataclass(frozen=True)
class ClassifyTask:
    """A classification task: (text, label) pairs in two splits; `labels` sorted, as found in `train`."""

    name: str
    labels: list[str]
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]

    def label_ids(self, split: str) -> list[int]:
        """The index in `labels` of every row of `split` ("train" or "test")."""
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[label] for _, label in getattr(self, split)]

    def texts(self, split: str) -> list[str]:
        return [text for text, _ in getattr(self, split)]

    def digest(self) -> str:
        """A content hash of the task (labels and both splits), for fingerprints of the stages that use it."""
        blob = json.dumps([VERSION, self.labels, self.train, self.test], ensure_ascii=False).encode()
        return hashlib.blake2b(blob, digest_size=16).hexdigest()


def checkout_root() -> Path:
    """The tinylm checkout this package lives in; built-in data is looked for in `<checkout>/../shared/data`."""
    return Path(__file__).resolve().parents[2]


def shared_data(root: Path | None = None) -> Path:
    return (Path(root) if root is not None else checkout_root()).parent / "shared" / "data"


def parse_spec(spec: str) -> tuple[str, str]:
    """(kind, path) of a task spec; a bare path is `jsonl`."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        return kind, rest
    if spec in KINDS:
        return spec, ""
    return "jsonl", spec


def task_files(spec: str, root: Path | None = None) -> list[Path]:
    """The files a task reads (none for `synthetic`), for fingerprints; a `UserError` if they are missing."""
    kind, path = parse_spec(spec)
    if kind == "synthetic":
        return []
    if kind == "shakespeare-speakers":
        return [_shakespeare_path(path, root)]
    p = _existing(spec, path)
    if p.is_file():
        beside = p.parent / "classes.txt"
        return [p, beside] if kind in ("agnews", "dbpedia") and beside.is_file() else [p]
    names = {"jsonl": ("train.jsonl", "test.jsonl"), "fewrel": ("train.json", "test.json")}.get(kind,
                                                                                              ("train.csv", "test.csv"))
    found = [p / n for n in names]
    for f in found:
        if not f.is_file():
            raise UserError(f"task {spec!r}: {p} is a folder without {f.name} (a folder needs {' and '.join(names)})")
    if kind in ("agnews", "dbpedia") and (p / "classes.txt").is_file():
        found.append(p / "classes.txt")
    return found


def load_task(spec: str, root: Path | None = None, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION,
              train_per_class: int = 0, test_per_class: int = 0) -> ClassifyTask:
    """The task named by `spec` (see the module docstring). `root` is the tinylm checkout beside which
    `shared/data` holds the built-in data (default: this checkout); `seed` and `test_fraction` set the split of
    a task that is not already split (the built-in ones included). `train_per_class` and `test_per_class`, when
    set, keep a seeded sample of at most that many rows of each label in each split (the paper's AG News takes
    1,000 and 1,000); they sample the split, never change it, so a capped test split is part of the full one."""
    if not 0 < test_fraction < 1:
        raise UserError(f"task {spec!r}: the test fraction must be between 0 and 1, got {test_fraction}")
    if train_per_class < 0 or test_per_class < 0:
        raise UserError(f"task {spec!r}: rows per class must be 0 (all) or more, got "
                        f"{train_per_class} and {test_per_class}")
    train, test = _splits(spec, root, seed, test_fraction)
    return _finish(spec, cap_per_class(train, train_per_class, seed), cap_per_class(test, test_per_class, seed))


def _splits(spec: str, root: Path | None, seed: int, test_fraction: float):
    kind, path = parse_spec(spec)
    if kind == "synthetic":
        if path:
            raise UserError(f"task {spec!r}: the synthetic task takes no path")
        return _synthetic(seed)
    if kind == "shakespeare-speakers":
        return split_rows(_speeches(_shakespeare_path(path, root), spec), test_fraction, seed, spec)
    files = task_files(spec, root)
    read = {"jsonl": _read_jsonl, "agnews": _read_news_csv, "dbpedia": _read_news_csv, "fewrel": _read_fewrel}[kind]
    classes = _classes(files.pop(), spec) if files[-1].name == "classes.txt" else None
    splits = [read(f, spec, classes) for f in files]
    return split_rows(splits[0], test_fraction, seed, spec) if len(splits) == 1 else tuple(splits)


def _rows_by_label(rows: list[tuple[str, str]]) -> dict[str, list[int]]:
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, (_, label) in enumerate(rows):
        by_label[label].append(i)
    return by_label


def cap_per_class(rows: list[tuple[str, str]], most: int, seed: int) -> list[tuple[str, str]]:
    """At most `most` rows of each label (0: all), a seeded sample, in their order."""
    if not most:
        return rows
    by_label = _rows_by_label(rows)
    rng = random.Random(f"tinylm/classify-cap/{seed}")
    kept = set()
    for label in sorted(by_label):
        ids = by_label[label]
        kept.update(rng.sample(ids, most) if len(ids) > most else ids)
    return [r for i, r in enumerate(rows) if i in kept]


def split_rows(rows: list[tuple[str, str]], test_fraction: float, seed: int,
               spec: str = "task") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test): within each label a seeded shuffle, `test_fraction` of it (rounded) to test, but never
    a label's last row, so every test label is also a training label. Rows keep their file order in each split."""
    if len(rows) < 2:
        raise UserError(f"task {spec!r}: too few rows to split ({len(rows)}; a task needs at least two)")
    by_label = _rows_by_label(rows)
    rng = random.Random(f"tinylm/classify-split/{seed}")
    held = set()
    for label in sorted(by_label):
        ids = by_label[label]
        rng.shuffle(ids)
        held.update(ids[:min(len(ids) - 1, round(test_fraction * len(ids)))])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _finish(spec: str, train: list[tuple[str, str]], test: list[tuple[str, str]]) -> ClassifyTask:
    labels = sorted({label for _, label in train})
    if len(labels) < 2:
        raise UserError(f"task {spec!r}: the training rows have {len(labels)} label(s); classification needs "
                        f"at least two ({len(train)} rows)")
    if not test:
        raise UserError(f"task {spec!r}: too few rows: the test split is empty (add rows or raise the test fraction)")
    unseen = sorted({label for _, label in test} - set(labels))
    if unseen:
        raise UserError(f"task {spec!r}: test label {unseen[0]!r} never occurs in the training rows "
                        f"({len(unseen)} such label(s); training labels: {', '.join(labels[:8])}"
                        f"{', ...' if len(labels) > 8 else ''})")
    return ClassifyTask(spec, labels, train, test)


def _existing(spec: str, path: str) -> Path:
    if not path:
        raise UserError(f"task {spec!r}: no path given")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"task {spec!r}: {p} does not exist")
    return p


def _in(spec: str, path: Path) -> str:
    """Where an error lies: the task, and the file when the spec does not already name it."""
    named = parse_spec(spec)[1]
    return f"task {spec!r}" if named and Path(named).expanduser() == path else f"task {spec!r}: {path}"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _label(value, where: str) -> str:
    # JSON files often hold class indices as numbers; they name the same label as their string.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{where}: `label` must be a string, got {type(value).__name__}")
    label = str(value).strip()
    if not label:
        raise UserError(f"{where}: `label` is empty")
    return label


def _read_jsonl(path: Path, spec: str, classes=None) -> list[tuple[str, str]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, rec in iter_records(fh, f"{_in(spec, path)}"):
                where = f"{_in(spec, path)} line {lineno}"
                if not isinstance(rec, dict):
                    raise UserError(f"{where} is not a JSON object")
                for key in ("text", "label"):
                    if key not in rec:
                        raise UserError(f"{where} has no {key!r} field")
                text = rec["text"]
                if not isinstance(text, str) or not text.strip():
                    raise UserError(f"{where}: `text` must be a non-empty string")
                rows.append((text, _label(rec["label"], where)))
    except OSError as e:
        raise UserError(f"task {spec!r}: cannot read {path}: {_one_line(e)}") from None
    return rows


def _classes(path: Path, spec: str) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"task {spec!r}: cannot read {path}: {_one_line(e)}") from None
    if len(set(names)) != len(names):
        raise UserError(f"{_in(spec, path)} names a class twice")
    return names


def _read_news_csv(path: Path, spec: str, classes: list[str] | None) -> list[tuple[str, str]]:
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh), 1):
                if not row or not any(cell.strip() for cell in row):
                    continue
                where = f"{_in(spec, path)} line {lineno}"
                if len(row) < 2:
                    raise UserError(f"{where} has {len(row)} column; expected the class index, a title and a text")
                # The files write line breaks inside a text as a backslash and an `n`, or a lone backslash.
                text = " ".join(" ".join(row[1:]).replace("\\n", " ").replace("\\", " ").split())
                if not text:
                    raise UserError(f"{where} has an empty text")
                rows.append((text, _class_name(row[0].strip(), classes, where)))
    except csv.Error as e:
        raise UserError(f"{_in(spec, path)} is not a readable CSV file ({_one_line(e)})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{_in(spec, path)} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise UserError(f"task {spec!r}: cannot read {path}: {_one_line(e)}") from None
    return rows


def _class_name(index: str, classes: list[str] | None, where: str) -> str:
    if not index:
        raise UserError(f"{where} has no class index")
    if classes is None:
        return index
    if not index.isdigit() or not 1 <= int(index) <= len(classes):
        raise UserError(f"{where}: class index {index!r} is not between 1 and {len(classes)} (classes.txt)")
    return classes[int(index) - 1]


def mark_entities(tokens: list[str], head: list[int], tail: list[int]) -> str:
    """The sentence with the head entity's tokens between [E1] and [/E1] and the tail's between [E2] and [/E2]."""
    opens: dict[int, list[str]] = defaultdict(list)
    closes: dict[int, list[str]] = defaultdict(list)
    for span, (o, c) in ((head, ENTITY_MARKS[:2]), (tail, ENTITY_MARKS[2:])):
        opens[min(span)].append(o)
        closes[max(span)].append(c)
    out = []
    for i, token in enumerate(tokens):
        out += opens.get(i, []) + [token] + closes.get(i, [])
    return " ".join(out)


def _mention(entity, n_tokens: int, where: str) -> list[int]:
    # FewRel writes an entity as [name, wikidata id, [[token positions of a mention], ...]]; the first counts.
    try:
        positions = [int(i) for i in entity[2][0]]
    except (TypeError, IndexError, ValueError, KeyError):
        raise UserError(f"{where}: an entity must be [name, id, [[token positions]]]") from None
    if not positions or min(positions) < 0 or max(positions) >= n_tokens:
        raise UserError(f"{where}: entity positions {positions} lie outside the {n_tokens} tokens")
    return positions


def _read_fewrel(path: Path, spec: str, classes=None) -> list[tuple[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"task {spec!r}: cannot read {path} as JSON: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{_in(spec, path)} must map each relation to a list of instances")
    rows = []
    for relation, instances in data.items():
        if not isinstance(instances, list):
            raise UserError(f"{_in(spec, path)} relation {relation!r} is not a list of instances")
        for n, inst in enumerate(instances):
            where = f"{_in(spec, path)} relation {relation!r} instance {n}"
            if not isinstance(inst, dict) or not all(k in inst for k in ("tokens", "h", "t")):
                raise UserError(f"{where} needs `tokens`, `h` and `t`")
            tokens = inst["tokens"]
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
                raise UserError(f"{where}: `tokens` must be a non-empty list of strings")
            head, tail = (_mention(inst[k], len(tokens), where) for k in ("h", "t"))
            rows.append((mark_entities(tokens, head, tail), _label(relation, where)))
    return rows


def _shakespeare_path(path: str, root: Path | None) -> Path:
    p = Path(path).expanduser() if path else shared_data(root) / SHAKESPEARE_FILE
    if not p.is_file():
        raise UserError(f"task 'shakespeare-speakers': {p} does not exist (pass shakespeare-speakers:PATH to the "
                        "tiny Shakespeare text)")
    return p


SPEAKER_LINE = re.compile(r"^([A-Z][A-Za-z' .-]*[A-Za-z]):\s*$")


def speech_blocks(text: str) -> list[str]:
    """The blank-line separated blocks of a play text; in tiny Shakespeare, each is one speech."""
    return [b.strip("\n") for b in re.split(r"\n\s*\n", text) if b.strip()]


def _speeches(path: Path, spec: str) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"task {spec!r}: cannot read {path}: {_one_line(e)}") from None
    speeches = []
    for block in speech_blocks(text):
        first, _, body = block.partition("\n")
        m = SPEAKER_LINE.match(first)
        if m and len(body.strip()) >= MIN_SPEECH_CHARS:
            speeches.append((body.strip(), m.group(1)))
    # A speech that two speakers both say (a repeated line) cannot be told apart: it is dropped.
    speakers_of = defaultdict(set)
    for body, who in speeches:
        speakers_of[body].add(who)
    seen, unique = set(), []
    for body, who in speeches:
        if len(speakers_of[body]) == 1 and body not in seen:
            seen.add(body)
            unique.append((body, who))
    counts = Counter(who for _, who in unique)
    top = {who for who, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:SPEAKERS]}
    rows = [(body, who) for body, who in unique if who in top]
    if len(top) < 2:
        raise UserError(f"{_in(spec, path)} has speeches (a `NAME:` line, then the speech) of "
                        f"{len(top)} speaker(s); the task needs at least two")
    return rows


def _synthetic(seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    from tinylm.data import synthetic

    # Each generator's own train/test split keeps the test prompts out of the train rows and out of the
    # default pretraining mixture, which draws on the train split only.
    out = []
    for split, n in (("train", SYNTHETIC_TRAIN), ("test", SYNTHETIC_TEST)):
        rows = [(p.prompt, family) for family in SYNTHETIC_FAMILIES
                for p in synthetic.generate(family, split, n, seed)]
        random.Random(f"tinylm/classify-synthetic/{split}/{seed}").shuffle(rows)
        out.append(rows)
    return out[0], out[1]
