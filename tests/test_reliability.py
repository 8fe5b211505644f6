"""What saved work survives: damaged checkpoints and metrics on resume, diverged weights, interrupted saves,
imports and exports into folders that hold something, and sources too large to handle whole."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers_eval import make_checkpoint
from test_trainer import _losses, _recipe as train_recipe

from tinylm.train import checkpoint
from tinylm.cli import main
from tinylm.data.config import SourceConfig
from tinylm.data.prepare import batches
from tinylm.data.sources import MAX_DOC_CHARS, documents, split_long
from tinylm.errors import UserError
from tinylm.train.metrics_log import MetricsLog


def test_metrics_are_json_with_null_for_non_finite_values(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", None)
    log.write({"step": 1, "loss": float("nan"), "val": {"bpb": float("inf")}, "lr": 0.5})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 1, "loss": None, "val": {"bpb": None}, "lr": 0.5}
    assert "NaN" not in line and "Infinity" not in line


def test_resume_drops_a_torn_last_line_and_rows_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    MetricsLog(path, resume_step=2).close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2]


def test_a_damaged_line_before_the_last_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2:"):
        MetricsLog(path, resume_step=3)
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": 3}\n'


def test_resume_skips_a_damaged_newest_checkpoint_and_a_torn_metrics_line(tmp_path, prepared, capsys):
    recipe, out = train_recipe(tmp_path, prepared, steps=8), tmp_path / "run"
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    uninterrupted = _losses(out)
    newest = checkpoint.list_steps(out)[-1]
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    capsys.readouterr()
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping" in err and newest.name in err
    # Steps 5 to 8 were trained again from step 4's checkpoint, exactly as the first time.
    assert _losses(out) == uninterrupted
    assert checkpoint.load(out).step == 8


def test_save_refuses_non_finite_weights_and_keeps_the_last_good_checkpoint(tmp_path):
    good = {"w": np.ones((2, 2), np.float32)}
    checkpoint.save(tmp_path, 1, good, None, {"model": {}}, keep=1)
    with pytest.raises(UserError, match="parameter w is NaN or infinite at step 2"):
        checkpoint.save(tmp_path, 2, {"w": np.array([[1, np.nan], [0, 1]], np.float32)}, None, {}, keep=1)
    with pytest.raises(UserError, match="optimizer slot exp_avg.w"):
        checkpoint.save(tmp_path, 2, good, {"exp_avg.w": np.full((2, 2), np.inf, np.float32)}, {}, keep=1)
    assert [p.name for p in checkpoint.list_steps(tmp_path)] == ["step_00000001"]


def test_a_checkpoint_with_non_finite_weights_does_not_load(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run")
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["norm.weight"][0] = np.nan
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(UserError, match="parameter norm.weight is NaN or infinite"):
        checkpoint.load(ckpt)


def test_save_removes_temporary_folders_of_killed_saves_only(tmp_path):
    root = tmp_path / "checkpoints"
    dead = root / ".step_00000003.tmp999999999"  # no such process
    alive = root / f".step_00000003.tmp{os.getppid()}"  # a save still running elsewhere
    for d in (dead, alive):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    checkpoint.save(tmp_path, 4, {"w": np.zeros(3, np.float32)}, None, {})
    assert not dead.exists() and alive.exists()


def test_state_json_with_wrong_types_is_a_user_error(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run")
    meta = json.loads((ckpt / "state.json").read_text())
    for bad in ({"dim": "abc"}, {"n_heads": 0}, {"rope_theta": None}):
        (ckpt / "state.json").write_text(json.dumps(dict(meta, model=dict(meta["model"], **bad))))
        with pytest.raises(UserError, match=f"model.{next(iter(bad))}"):
            checkpoint.load(ckpt)
    (ckpt / "state.json").write_text(json.dumps(dict(meta, step="ten")))
    with pytest.raises(UserError, match="step"):
        checkpoint.load(ckpt)


def test_import_and_export_into_folders_that_hold_something(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "run")
    run = tmp_path / "run"
    later = checkpoint.save(run, 50, checkpoint.load(ckpt).params, None, json.loads((ckpt / "state.json").read_text()))
    hf = tmp_path / "hf"
    assert main(["export", str(ckpt), "--to", "hf", str(hf)]) == 0
    (hf / "config.json").write_text("{}")
    assert main(["export", str(ckpt), "--to", "hf", str(hf)]) == 2
    assert (hf / "config.json").read_text() == "{}"
    assert main(["export", str(ckpt), "--to", "hf", str(hf), "--force"]) == 0
    assert json.loads((hf / "config.json").read_text())["hidden_size"] == 64
    other = tmp_path / "other"
    shutil.copytree(run, other)
    shutil.rmtree(other / "checkpoints" / ckpt.name)
    capsys.readouterr()
    assert main(["import", str(hf), "--out", str(other)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["import", str(hf), "--out", str(other), "--force"]) == 0
    printed = capsys.readouterr().out.strip()
    assert os.path.isdir(printed) and checkpoint.load(printed).step == 0
    assert [p.name for p in checkpoint.list_steps(other)] == ["step_00000000", later.name]
    # A step 0 checkpoint already there is never replaced, even with --force.
    assert main(["import", str(hf), "--out", str(run), "--force"]) == 2
    assert [p.name for p in checkpoint.list_steps(run)] == [ckpt.name, later.name]


def test_long_documents_are_cut_at_whitespace_into_bounded_pieces(tmp_path):
    words = [f"w{i % 1000}" for i in range(60_000)]
    text = " ".join(words)
    pieces = split_long(text, 1000)
    assert "".join(pieces) == text and all(len(p) <= 1000 for p in pieces)
    assert all(p[0] == " " for p in pieces[1:])  # each cut falls before a space, never inside a word
    assert split_long("x" * 2500, 1000) == ["x" * 1000, "x" * 1000, "x" * 500]
    line = tmp_path / "one-line.txt"
    line.write_text(" ".join(words * 2))
    docs = documents(SourceConfig(name="line", type="text", path=str(line)))
    assert len(docs) > 1 and max(map(len, docs)) <= MAX_DOC_CHARS and "".join(docs) == line.read_text()
    chunked = documents(SourceConfig(name="line", type="text", path=str(line), chunk_chars=5000))
    assert max(map(len, chunked)) <= 5000


def test_batches_are_bounded_in_documents_and_characters():
    docs = ["a" * 10] * 7 + ["b" * 100] + ["c" * 5] * 3
    got = batches(docs, most_docs=4, most_chars=40)
    assert [d for b in got for d in b] == docs
    assert all(len(b) <= 4 and (len(b) == 1 or sum(map(len, b)) <= 40) for b in got)
    assert batches([], 4) == [[]]
