import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_eval import make_checkpoint  # noqa: E402

from tinylm.errors import UserError  # noqa: E402
from tinylm.eval import harness  # noqa: E402
from tinylm.eval.committee import Committee, load_committee  # noqa: E402
from tinylm.eval.tasks import load_task, load_tasks  # noqa: E402
from tinylm.generate import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

MC_ROWS = [
    {"context": "The cat sat on the", "choices": ["mat", "dog and looked at the sun"], "label": 0},
    {"context": "Birds can", "choices": ["fly", "swim", "walk every day"], "label": 2},
    {"context": "The sun rises in the", "choices": ["east", "west"], "label": 1},
    {"context": "One, two,", "choices": ["three", "five", "cat"], "label": 0},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ev") / "run")


class FixedLM:
    """Stands in for a model: the scorer only needs log-likelihoods, which this returns from a table."""

    max_len, vocab_size = 64, 300

    def __init__(self, table):
        self.table = table

    def token_logprobs(self, rows):
        return np.array([[self.table.get(tuple(r[: i + 2]), -1.0) for i in range(rows.shape[1] - 1)] for r in rows])


def test_acc_and_acc_norm_by_hand(ckpt, tmp_path):
    _, tok, _ = load_model(ckpt, "torch")
    ex = load_task(f"mc:{write_jsonl(tmp_path / 'mc.jsonl', MC_ROWS[:1])}").examples
    scorer = harness.Scorer(FixedLM({}), tok)
    (c0, x0), (c1, x1) = (scorer.split_pair(ex[0].context, " " + c) for c in ex[0].choices)
    # Every token costs -1 nat, so the short choice wins acc; acc_norm divides by characters instead.
    table = {tuple(c0 + x0[: i + 1]): -1.0 for i in range(len(x0))}
    table.update({tuple(c1 + x1[: i + 1]): -0.1 for i in range(len(x1))})
    scorer.lm = FixedLM(table)
    lls = scorer.loglikelihoods([(c0, x0), (c1, x1)])
    assert lls == pytest.approx([-1.0 * len(x0), -0.1 * len(x1)])
    r = harness.score_mc(scorer, ex)
    expect_acc = float(np.argmax(lls) == 0)
    expect_norm = float(np.argmax(np.array(lls) / [3.0, len("dog and looked at the sun")]) == 0)
    assert r["metrics"] == {"acc": expect_acc, "acc_norm": expect_norm}


def test_mc_on_a_real_model_matches_direct_scoring(ckpt, tmp_path):
    lm, tok, _ = load_model(ckpt, "torch")
    task = load_task(f"mc:{write_jsonl(tmp_path / 'mc.jsonl', MC_ROWS)}")
    r = harness.run_tasks(lm, tok, [task])[task.name]
    scorer = harness.Scorer(lm, tok)
    acc = []
    for ex in task.examples:
        lls = []
        for c in ex.choices:
            ctx, cont = scorer.split_pair(ex.context, " " + c)
            full = np.array([ctx + cont])
            lls.append(lm.token_logprobs(full)[0, len(ctx) - 1:].sum())
        acc.append(np.argmax(lls) == ex.gold)
    assert r["metrics"]["acc"] == pytest.approx(np.mean(acc))
    assert r["samples"] == 4 and r["stderr"]["acc"] is not None


def test_gsm8k_answer_extraction():
    assert harness.extract_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert harness.extract_answer("He pays $1,250 in total.\n#### $1,250.") == "1250"
    assert harness.extract_answer("first 3 then 12 apples") == "12"
    assert harness.extract_answer("no digits") is None
    assert harness.answers_match("18.00", "18") and not harness.answers_match("17", "18")
    assert harness.answers_match(harness.extract_answer("The answer is -4.5."), "-4.5")


def test_reference_solutions_score_as_correct():
    from tinylm.data import synthetic

    for family in ("arithmetic", "sorting", "word_problems", "comparison", "units"):
        probs = synthetic.problems(family, n=30)
        assert all(harness.answers_match(harness.extract_answer(p.solution), str(p.answer)) for p in probs)
        assert not harness.answers_match(harness.extract_answer(probs[0].solution + "1"), str(probs[0].answer))


def test_pass_at_k_formula():
    assert harness.pass_at_k(5, 0, 1) == 0.0
    assert harness.pass_at_k(5, 5, 3) == 1.0
    assert harness.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert harness.pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))
    assert harness.pass_at_k(4, 2, 3) == 1.0


def test_bits_per_byte(ckpt, tmp_path):
    lm, tok, _ = load_model(ckpt, "torch")
    docs = ["The cat sat on the mat.", "Birds can fly. " * 40]
    path = tmp_path / "held.jsonl"
    write_jsonl(path, [{"text": d} for d in docs])
    short = type(lm)(lm.backend, lm.shape.__class__(**{**lm.shape.to_dict(), "max_seq_len": 16}), lm.params)
    r = harness.run_tasks(short, tok, [load_task(f"text:{path}")])["held"]["metrics"]
    assert r["bytes"] == sum(len(d.encode()) for d in docs)
    assert r["tokens"] == sum(len(tok.encode(d).ids) for d in docs)
    assert r["bpb"] == pytest.approx(r["loss"] * r["tokens"] / (math.log(2) * r["bytes"]))
    assert 0 < r["loss"] < 2 * math.log(300)


def test_generative_task_and_pass_at_k(ckpt, tmp_path):
    lm, tok, _ = load_model(ckpt, "torch")
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}] * 3)
    task = load_task(f"gsm8k:{path}")
    task.max_tokens = 6
    r = harness.run_tasks(lm, tok, [task], samples=4, temperature=1.0)["gsm8k"]
    assert set(r["metrics"]) == {"exact_match", "pass@1", "pass@2", "pass@4"}
    assert r["samples"] == 3


def test_chat_answers_end_with_their_turn_not_at_a_blank_line(ckpt, tmp_path, monkeypatch):
    """A chat model answers in paragraphs: the completion-mode stops ("\n\n", "Question:") must not cut it."""
    lm, tok, _ = load_model(ckpt, "torch")
    task = load_task(f"gsm8k:{write_jsonl(tmp_path / 'g.jsonl', [{'question': 'q', 'answer': '#### 1'}])}")
    task.max_tokens = 3
    seen = []
    real = harness.generate_ids
    monkeypatch.setattr(harness, "generate_ids", lambda lm, tok, p, cfg, *a: seen.append(cfg.stop_strings) or
                        real(lm, tok, p, cfg, *a))
    harness.run_tasks(lm, tok, [task], chat=False)
    harness.run_tasks(lm, tok, [task], chat=True)
    assert "\n\n" in seen[0] and seen[1] == ()


def test_committee_of_identical_checkpoints_equals_single(ckpt, tmp_path):
    single, tok, _ = load_model(ckpt, "torch")
    duo, _, _ = load_committee([str(ckpt), str(ckpt)], "torch")
    mc = load_task(f"mc:{write_jsonl(tmp_path / 'mc.jsonl', MC_ROWS)}")
    text = load_task(f"text:{write_jsonl(tmp_path / 'text.jsonl', [{'text': 'The sun rises.'}])}")
    gen = load_task(f"gsm8k:{write_jsonl(tmp_path / 'g.jsonl', [{'question': 'q', 'answer': '#### 1'}])}")
    gen.max_tokens = 5
    a = harness.run_tasks(single, tok, [mc, text, gen])
    b = harness.run_tasks(duo, tok, [mc, text, gen])
    assert a["mc"]["metrics"] == b["mc"]["metrics"]
    assert a["text"]["metrics"]["loss"] == pytest.approx(b["text"]["metrics"]["loss"], abs=1e-6)
    rows = np.array([[0, 5, 9, 11, 40]])
    np.testing.assert_allclose(single.token_logprobs(rows), duo.token_logprobs(rows), atol=1e-6)


def test_committee_averages_probabilities(ckpt, tmp_path):
    a, _, _ = load_model(ckpt, "torch")
    b, _, _ = load_model(make_checkpoint(tmp_path / "other", seed=7), "torch")
    rows = np.array([[0, 5, 9, 11]])
    mixed = Committee([a, b]).token_logprobs(rows)
    expect = np.log((np.exp(a.token_logprobs(rows)) + np.exp(b.token_logprobs(rows))) / 2)
    np.testing.assert_allclose(mixed, expect, atol=1e-9)


def test_evaluate_for_the_trainer(ckpt, tmp_path):
    from tinylm.train import checkpoint
    from tinylm.backends import get_backend

    ck = checkpoint.load(ckpt)
    backend = get_backend("mlx")
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    out = harness.evaluate(backend, ck.shape, backend.from_numpy(ck.params), ck.tokenizer_path, [f"mc:{path}"], 3)
    assert set(out) == {"mc"} and out["mc"]["samples"] == 3 and 0 <= out["mc"]["acc"] <= 1
    again = harness.evaluate(backend, ck.shape, ck.params, ck.tokenizer_path, load_tasks([f"mc:{path}"], 3))
    assert again["mc"]["acc"] == pytest.approx(out["mc"]["acc"])
    half = harness.evaluate(backend, ck.shape, ck.params, ck.tokenizer_path, ["arithmetic"], 4, dtype="bfloat16",
                            batch_size=4)
    assert half["arithmetic"]["samples"] == 4


def test_per_task_limits_and_their_bad_keys(tmp_path):
    from tinylm.recipe import EvalConfig

    path = write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(9)])
    tasks = load_tasks([f"gsm8k:{path}", "arithmetic"], 2, {"gsm8k": 7})
    assert [(t.name, len(t.examples)) for t in tasks] == [("gsm8k", 7), ("arithmetic", 2)]
    assert len(load_tasks([f"gsm8k:{path}"], 2, {"gsm8k": 0})[0].examples) == 9
    EvalConfig(tasks=[f"gsm8k:{path}"], limits={"gsm8k": 3})
    from tinylm.config import SettingError

    with pytest.raises(SettingError, match="limits.gsm names no task in tasks"):
        EvalConfig(tasks=[f"gsm8k:{path}"], limits={"gsm": 3})
    with pytest.raises(SettingError, match="dtype must be one of float32, bfloat16, train"):
        EvalConfig(dtype="float16")


def test_task_readers(tmp_path):
    arc = write_jsonl(tmp_path / "arc.jsonl", [{"id": "x", "question": "Q?", "choices": {"text": ["a", "b", "c"],
                                                 "label": ["A", "B", "C"]}, "answerKey": "C"}])
    assert load_task(str(arc)).examples[0].gold == 2
    hs = write_jsonl(tmp_path / "hs.jsonl", [{"activity_label": "Cooking", "ctx_a": "He cuts.", "ctx_b": "then he",
                                              "endings": ["eats [title] it", "sleeps"], "label": "1"}])
    ex = load_task(f"hellaswag:{hs}").examples[0]
    assert ex.context == "Cooking: He cuts. Then he" and ex.choices[0] == "eats. it" and ex.gold == 1
    piqa = write_jsonl(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}])
    assert load_task(str(piqa)).examples[0].context == "Question: g\nAnswer:"
    boolq = write_jsonl(tmp_path / "bq.jsonl", [{"question": "is it", "passage": "P", "answer": True}])
    ex = load_task(str(boolq)).examples[0]
    assert ex.choices == ["no", "yes"] and ex.gold == 1
    assert [t.name for t in load_tasks(f"arc:{arc},{arc},arithmetic", 2)] == ["arc", "arc_2", "arithmetic"]
    assert len(load_task("arithmetic", limit=5).examples) == 5


@pytest.mark.parametrize("spec, rows, needle", [
    ("gsm8k:{p}", [{"question": "q"}], "missing field 'answer'"),
    ("arc:{p}", [{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "Z"}], "label"),
    ("mc:{p}", [{"context": "c", "choices": ["a", "b"]}], "missing field 'label'"),
    ("nonsense_task", None, "unknown task"),
    ("gsm8k", None, "needs a local file"),
    ("mc:{p}", "{not json", "not valid JSON"),
])
def test_bad_task_input(tmp_path, spec, rows, needle):
    p = tmp_path / "t.jsonl"
    if isinstance(rows, str):
        p.write_text(rows + "\n")
    elif rows is not None:
        write_jsonl(p, rows)
    with pytest.raises(UserError, match=needle) as e:
        load_task(spec.format(p=p))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not (DATA / "gsm8k_test.jsonl").is_file(), reason="shared GSM8K data is absent")
def test_gsm8k_real_file(ckpt):
    lm, tok, _ = load_model(ckpt, "torch")
    task = load_task(f"gsm8k:{DATA / 'gsm8k_test.jsonl'}", limit=3)
    assert len(task.examples) == 3 and all(ex.answer.lstrip("-").replace(".", "").isdigit() for ex in task.examples)
    task.max_tokens = 8
    r = harness.run_tasks(lm, tok, [task])["gsm8k"]
    assert r["samples"] == 3 and 0.0 <= r["metrics"]["exact_match"] <= 1.0
