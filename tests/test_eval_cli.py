import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_eval import make_checkpoint  # noqa: E402

from tinylm.cli.eval import main  # noqa: E402
from tinylm.generate import SamplingConfig, generate, load_model  # noqa: E402

MC = [{"context": "The cat sat on the", "choices": ["mat", "sun"], "label": 0},
      {"context": "Birds can", "choices": ["fly", "swim", "sing"], "label": 1}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "run")


def test_generate_prints_the_continuation_only(ckpt, capsys):
    assert main(["generate", str(ckpt.parent.parent), "--prompt", "The cat", "--max-tokens", "7",
                 "--backend", "torch"]) == 0
    lm, tok, ck = load_model(ckpt, "torch")
    expected = generate(lm, tok, ["The cat"], SamplingConfig(max_tokens=7), ck.meta)[0].text
    assert capsys.readouterr().out == expected


def test_chat_streams_a_reply(ckpt, capsys, monkeypatch):
    lines = iter(["hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(ckpt), "--max-tokens", "5", "--temperature", "0", "--backend", "mlx"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_eval_json_and_results_file(ckpt, tmp_path, capsys):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in MC))
    out = tmp_path / "res" / "results.json"
    assert main(["eval", str(ckpt), "--tasks", f"mc:{mc},arithmetic", "--limit", "2", "--json", "--max-tokens", "24",
                 "--output", str(out), "--committee", str(ckpt), "--backend", "torch"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"mc", "arithmetic"}
    assert {"acc", "acc_norm", "acc_stderr", "samples"} <= set(printed["mc"])
    assert "exact_match" in printed["arithmetic"] and printed["arithmetic"]["samples"] == 2
    saved = json.loads(out.read_text())
    assert saved["results"]["mc"]["samples"] == 2 and len(saved["committee"]) == 2
    assert "| mc | acc |" in out.with_suffix(".md").read_text()


def test_export_and_import_commands(ckpt, tmp_path, capsys):
    assert main(["export", str(ckpt), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert main(["generate", str(tmp_path / "back"), "--prompt", "The", "--max-tokens", "3"]) == 0


def _truncate(ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    return bad


@pytest.mark.parametrize("case", ["missing", "truncated", "fields", "unknown_task", "hf_arch", "export_format"])
def test_bad_input_exits_2_with_one_line(ckpt, tmp_path, capsys, case):
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"context": "x", "choices": ["a", "b"]}) + "\n")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    argv = {
        "missing": ["generate", str(tmp_path / "nope"), "--prompt", "x"],
        "truncated": ["generate", str(_truncate(ckpt, tmp_path)) if case == "truncated" else "", "--prompt", "x"],
        "fields": ["eval", str(ckpt), "--tasks", f"mc:{task}"],
        "unknown_task": ["eval", str(ckpt), "--tasks", "mmlu_pro_max"],
        "hf_arch": ["import", str(hf), "--out", str(tmp_path / "o")],
        "export_format": ["export", str(ckpt), "--to", "onnx", str(tmp_path / "x")],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (DATA / "gsm8k_test.jsonl").is_file(), reason="shared GSM8K data is absent")
def test_eval_gsm8k_file_with_limit(ckpt, tmp_path, capsys):
    assert main(["eval", str(ckpt), "--tasks", f"gsm8k:{DATA / 'gsm8k_test.jsonl'}", "--limit", "2",
                 "--max-tokens", "8", "--json", "--output", str(tmp_path / "r.json")]) == 0
    got = json.loads(capsys.readouterr().out)["gsm8k"]
    assert got["samples"] == 2 and 0.0 <= got["exact_match"] <= 1.0


def test_eval_splits_phrased_families_unseen_first_and_logs_every_generation(ckpt, tmp_path, capsys):
    qa = tmp_path / "mine.jsonl"
    qa.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n")
    log = tmp_path / "logs" / "samples.jsonl"
    assert main(["eval", str(ckpt), "--tasks", f"word_problems,qa:{qa}", "--limit", "2", "--max-tokens", "8",
                 "--output", str(tmp_path / "r.json"), "--log-samples", str(log), "--backend", "torch"]) == 0
    table = capsys.readouterr().out
    assert table.index("word_problems_unseen") < table.index("word_problems_seen")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["word_problems_unseen"] * 2 + ["word_problems_seen"] * 2 + ["qa"]
    for r in rows:
        assert set(r) == {"task", "prompt", "completion", "extracted", "expected", "correct"}
    assert rows[-1]["expected"] == "5" and rows[-1]["prompt"].startswith("What is 2 + 3?")
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    share = sum(r["correct"] for r in rows if r["task"] == "word_problems_unseen") / 2
    assert results["word_problems_unseen"]["metrics"]["exact_match"] == share


def test_eval_in_bf16_one_batch_records_its_dtype_and_scores_every_problem(ckpt, tmp_path, capsys):
    log = tmp_path / "s.jsonl"
    assert main(["eval", str(ckpt), "--tasks", "arithmetic", "--limit", "5", "--max-tokens", "6", "--json",
                 "--dtype", "bfloat16", "--batch-size", "5", "--output", str(tmp_path / "r.json"),
                 "--log-samples", str(log), "--backend", "torch"]) == 0
    assert json.loads(capsys.readouterr().out)["arithmetic"]["samples"] == 5
    assert json.loads((tmp_path / "r.json").read_text())["dtype"] == "bfloat16"
    assert len(log.read_text().splitlines()) == 5


@pytest.mark.parametrize("case", ["unwritable", "folder", "not_numbers", "too_many_unseen", "dtype"])
def test_eval_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    from tinylm.data.word_problems import capacity

    tasks, extra = "arithmetic", []
    if case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("")
        extra = ["--log-samples", str(blocker / "samples.jsonl")]  # a file stands where the folder should be
    elif case == "folder":
        extra = ["--log-samples", str(tmp_path)]
    elif case == "not_numbers":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"question": "Which?", "answer": "so the red one\n#### red"}) + "\n")
        tasks = f"gsm8k:{bad}"
    elif case == "dtype":
        extra = ["--dtype", "float16"]
    else:
        tasks, extra = "word_problems", ["--limit", str(capacity(2) + 1)]
    code = main(["eval", str(tmp_path / "no-model"), "--tasks", tasks] + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert {"unwritable": "cannot be written", "folder": "is a folder", "not_numbers": "is not a number",
            "too_many_unseen": "held-out parts can make at most", "dtype": "choose float32 or bfloat16"}[case] in err
