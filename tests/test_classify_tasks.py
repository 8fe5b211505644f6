import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from tinylm.data import classify_tasks
from tinylm.data.classify_tasks import load_task, mark_entities, split_rows, task_files
from tinylm.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled_rows(n_per_label, labels=("sport", "news", "music")):
    return [{"text": f"{label} row {i} {WORDS[i % len(WORDS)]}", "label": label}
            for label in labels for i in range(n_per_label)]


def test_jsonl_file_is_split_stratified_and_seeded(tmp_path):
    path = write_jsonl(tmp_path / "task.jsonl", labelled_rows(10) + [{"text": "a lone row", "label": "rare"}])
    task = load_task(str(path))
    assert task.labels == ["music", "news", "rare", "sport"]
    assert len(task.train) + len(task.test) == 31
    # 20% of each label of ten rows is held out; the label with a single row stays in training.
    assert Counter(label for _, label in task.test) == {"sport": 2, "news": 2, "music": 2}
    assert not set(task.train) & set(task.test)
    assert load_task(str(path)) == task
    other = load_task(str(path), seed=1)
    assert set(other.test) != set(task.test) and other.labels == task.labels
    assert len(load_task(str(path), test_fraction=0.5).test) == 15
    assert task.label_ids("test") == [task.labels.index(label) for _, label in task.test]
    assert task.digest() == load_task(str(path)).digest() != other.digest()


def test_jsonl_folder_with_train_and_test(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", labelled_rows(3))
    write_jsonl(tmp_path / "test.jsonl", [{"text": "a test row", "label": "news"}, {"text": "another", "label": 7}])
    write_jsonl(tmp_path / "train.jsonl", labelled_rows(3) + [{"text": "a numbered label", "label": 7}])
    task = load_task(str(tmp_path))
    assert task.labels == ["7", "music", "news", "sport"]
    assert task.test == [("a test row", "news"), ("another", "7")]
    assert len(task.train) == 10
    assert task_files(str(tmp_path)) == [tmp_path / "train.jsonl", tmp_path / "test.jsonl"]


@pytest.mark.parametrize("row, cause", [
    ({"text": "no label here"}, "has no 'label' field"),
    ({"label": "news"}, "has no 'text' field"),
    ({"text": "", "label": "news"}, "`text` must be a non-empty string"),
    ({"text": "listed label", "label": ["news"]}, "`label` must be a string"),
    (["not", "an", "object"], "is not a JSON object"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, row, cause):
    path = write_jsonl(tmp_path / "task.jsonl", labelled_rows(2) + [row])
    with pytest.raises(UserError, match=cause) as e:
        load_task(str(path))
    assert f"{path}' line 7" in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine", "label": "a"}\n{"text": broken\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        load_task(str(bad_json))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9", "label": "a"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        load_task(str(latin))
    with pytest.raises(UserError, match="does not exist"):
        load_task(str(tmp_path / "missing.jsonl"))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "train.jsonl", labelled_rows(2))
    with pytest.raises(UserError, match="without test.jsonl"):
        load_task(str(tmp_path / "folder"))
    with pytest.raises(UserError, match="test fraction"):
        load_task(str(tmp_path / "folder" / "train.jsonl"), test_fraction=1.0)


def test_test_label_never_seen_in_training(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", labelled_rows(2))
    write_jsonl(tmp_path / "test.jsonl", [{"text": "a new kind of row", "label": "weather"}])
    with pytest.raises(UserError, match="test label 'weather' never occurs in the training rows"):
        load_task(str(tmp_path))


def test_too_few_rows(tmp_path):
    with pytest.raises(UserError, match="too few rows"):
        load_task(str(write_jsonl(tmp_path / "one.jsonl", [{"text": "only row", "label": "a"}])))
    with pytest.raises(UserError, match="at least two"):
        load_task(str(write_jsonl(tmp_path / "same.jsonl", labelled_rows(5, labels=("a",)))))
    # Every label has a single row, so none can be held out and the test split is empty.
    with pytest.raises(UserError, match="test split is empty"):
        load_task(str(write_jsonl(tmp_path / "singles.jsonl", labelled_rows(1))))
    empty = tmp_path / "empty"
    empty.mkdir()
    write_jsonl(empty / "train.jsonl", labelled_rows(2))
    (empty / "test.jsonl").write_text("")
    with pytest.raises(UserError, match="test split is empty"):
        load_task(str(empty))


def test_rows_per_class_sample_the_splits(tmp_path):
    path = write_jsonl(tmp_path / "task.jsonl", labelled_rows(12))
    full = load_task(str(path), test_fraction=0.5)
    capped = load_task(str(path), test_fraction=0.5, train_per_class=4, test_per_class=2)
    assert Counter(label for _, label in capped.train) == {"sport": 4, "news": 4, "music": 4}
    assert Counter(label for _, label in capped.test) == {"sport": 2, "news": 2, "music": 2}
    assert set(capped.train) <= set(full.train) and set(capped.test) <= set(full.test)
    assert load_task(str(path), test_fraction=0.5, train_per_class=100) == full
    with pytest.raises(UserError, match="rows per class"):
        load_task(str(path), test_per_class=-1)


def test_split_keeps_file_order():
    rows = [(f"text {i}", "ab"[i % 2]) for i in range(20)]
    train, test = split_rows(rows, 0.3, seed=3)
    assert train == [r for r in rows if r in train] and test == [r for r in rows if r in test]
    assert len(test) == 6  # 0.3 of each label's ten rows


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, quoting=csv.QUOTE_ALL).writerows(rows)
    return path


def test_agnews_folder_with_class_names(tmp_path):
    write_csv(tmp_path / "train.csv", [["1", "Talks resume", "Leaders met, again, in Geneva."],
                                       ["2", "Cup final", "A late goal\\decided it."],
                                       ["3", "Shares fall", "Markets slid on Monday."]])
    write_csv(tmp_path / "test.csv", [["2", "Derby day", "The home side won."]])
    (tmp_path / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    task = load_task(f"agnews:{tmp_path}")
    assert task.labels == ["Business", "Sports", "World"]
    assert task.train[0] == ("Talks resume Leaders met, again, in Geneva.", "World")
    assert task.train[1] == ("Cup final A late goal decided it.", "Sports")
    assert task.test == [("Derby day The home side won.", "Sports")]
    assert tmp_path / "classes.txt" in task_files(f"agnews:{tmp_path}")


def test_dbpedia_single_csv_without_classes_is_split(tmp_path):
    rows = [[str(c), f"Title {c}-{i}", f"{WORDS[i]} content of class {c}"] for c in (1, 2) for i in range(10)]
    task = load_task(f"dbpedia:{write_csv(tmp_path / 'dbpedia.csv', rows)}")
    assert task.labels == ["1", "2"] and len(task.test) == 4


def test_bad_csv(tmp_path):
    (tmp_path / "classes.txt").write_text("World\nSports\n")
    with pytest.raises(UserError, match="line 2: class index '5' is not between 1 and 2"):
        load_task(f"agnews:{write_csv(tmp_path / 'a.csv', [['1', 't', 'x'], ['5', 't', 'y']])}")
    with pytest.raises(UserError, match="line 1 has 1 column"):
        load_task(f"agnews:{write_csv(tmp_path / 'b.csv', [['only one column']])}")
    (tmp_path / "c.csv").write_text('1,"an unclosed quote\n')
    with pytest.raises(UserError, match="c.csv"):
        load_task(f"agnews:{tmp_path / 'c.csv'}")


def fewrel_instance(i, head, tail):
    tokens = f"The {WORDS[i]} river flows into the {WORDS[-1 - i]} sea near town".split()
    return {"tokens": tokens, "h": ["head", "Q1", [head]], "t": ["tail", "Q2", [tail]]}


def test_fewrel_marks_both_entities(tmp_path):
    assert mark_entities("a b c d".split(), [1, 2], [0]) == "[E2] a [/E2] [E1] b c [/E1] d"
    assert mark_entities("a b".split(), [0], [0]) == "[E1] [E2] a [/E1] [/E2] b"
    data = {"P403": [fewrel_instance(i, [1, 2], [6, 7]) for i in range(5)],
            "P206": [fewrel_instance(i, [6], [1]) for i in range(5)]}
    (tmp_path / "train_wiki.json").write_text(json.dumps(data))
    task = load_task(f"fewrel:{tmp_path / 'train_wiki.json'}")
    assert task.labels == ["P206", "P403"] and len(task.test) == 2
    first = dict(task.train + task.test)
    assert "The [E1] alpha river [/E1] flows into the [E2] mu sea [/E2] near town" in first
    assert first["The [E2] alpha [/E2] river flows into the [E1] mu [/E1] sea near town"] == "P206"


def test_bad_fewrel(tmp_path):
    bad = {"P1": [fewrel_instance(0, [1], [40])], "P2": [fewrel_instance(1, [1], [2])]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="outside the 10 tokens"):
        load_task(f"fewrel:{tmp_path / 'bad.json'}")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="must map each relation"):
        load_task(f"fewrel:{tmp_path / 'list.json'}")
    (tmp_path / "torn.json").write_text('{"P1": [')
    with pytest.raises(UserError, match="cannot read .* as JSON"):
        load_task(f"fewrel:{tmp_path / 'torn.json'}")
    (tmp_path / "nokeys.json").write_text(json.dumps({"P1": [{"tokens": ["a"]}]}))
    with pytest.raises(UserError, match="needs `tokens`, `h` and `t`"):
        load_task(f"fewrel:{tmp_path / 'nokeys.json'}")


def test_synthetic_task_is_seeded_and_its_splits_disjoint():
    task = load_task("synthetic")
    assert task.labels == sorted(classify_tasks.SYNTHETIC_FAMILIES)
    assert Counter(label for _, label in task.test) == {f: classify_tasks.SYNTHETIC_TEST for f in task.labels}
    assert not set(task.texts("train")) & set(task.texts("test"))
    assert load_task("synthetic") == task != load_task("synthetic", seed=1)
    assert task_files("synthetic") == []
    with pytest.raises(UserError, match="takes no path"):
        load_task("synthetic:somewhere")


def play(speakers: dict[str, int]) -> str:
    """A play text: speaker i says `n` distinct speeches, long enough to count, plus a short one that does not."""
    blocks = []
    for name, n in speakers.items():
        for i in range(n):
            blocks.append(f"{name}:\nThis is speech {i} of {name}, spoken slowly\nand {WORDS[i % len(WORDS)]} again.")
        blocks.append(f"{name}:\nAy, my lord.")
    blocks.append("FIRST:\nA line that two speakers both say, word for word.")
    blocks.append("SECOND:\nA line that two speakers both say, word for word.")
    return "\n\n".join(blocks) + "\n"


def test_shakespeare_speakers_from_a_written_play(tmp_path):
    counts = {f"SPEAKER {chr(65 + i)}": 20 - i for i in range(12)}
    counts["FIRST"] = 30
    (tmp_path / "play.txt").write_text(play(counts))
    task = load_task(f"shakespeare-speakers:{tmp_path / 'play.txt'}")
    top = sorted(sorted(counts, key=lambda s: -counts[s])[:10])
    assert task.labels == top
    assert all(len(text) >= classify_tasks.MIN_SPEECH_CHARS for text, _ in task.train + task.test)
    assert not any("word for word" in text for text, _ in task.train + task.test)
    assert Counter(label for _, label in task.test)["FIRST"] == 6
    assert not any(text.startswith("FIRST:") for text, _ in task.train)


def test_shakespeare_speakers_missing_file(tmp_path):
    with pytest.raises(UserError, match="shakespeare-speakers:PATH"):
        load_task("shakespeare-speakers", root=tmp_path / "checkout")
    (tmp_path / "prose.txt").write_text("No speaker lines here at all, only prose that goes on and on.\n")
    with pytest.raises(UserError, match="at least two"):
        load_task(f"shakespeare-speakers:{tmp_path / 'prose.txt'}")


@pytest.mark.skipif(not (SHARED / "tinyshakespeare.txt").is_file(), reason="shared tiny Shakespeare is absent")
def test_shakespeare_speakers_from_the_shared_text():
    task = load_task("shakespeare-speakers")
    assert len(task.labels) == 10 and "ROMEO" in task.labels
    assert len(task.test) > 100 and len(task.train) > 3 * len(task.test)
    assert not set(task.texts("train")) & set(task.texts("test"))
