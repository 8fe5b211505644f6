"""A text recipe fitted to its text: steps and vocabulary sized from the data, the best validation checkpoint
kept as the run's result, and a note (not a stop) when the text is small.

The texts are two that ship with Python (`scripts/package_texts.py`), of different sizes, so the checks hold on
text the recipe was not tuned on.
"""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tinylm import recipe as recipes
from tinylm.cli import main
from tinylm.data.mixture import resolve_phases, train_tokens
from tinylm.data.prepare import open_prepared
from tinylm.data.tokenizer import fitted_vocab_size
from tinylm.train import checkpoint
from tinylm.train.trainer import fit_steps

from conftest import data_toml

REPO = Path(__file__).resolve().parents[1]


def _package_texts():
    spec = importlib.util.spec_from_file_location("package_texts", REPO / "scripts" / "package_texts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(**kw):
    base = dict(steps=240, epochs=0.0, fit_to_data=False, batch_size=8, grad_accum=1, seq_len=256)
    cfg = SimpleNamespace(**{**base, **kw})
    cfg.rows_per_rank = lambda: cfg.batch_size * cfg.grad_accum
    return cfg


def test_fit_steps_follows_epochs_or_shortens_the_budget_with_a_note():
    mix = SimpleNamespace(max_epochs=4.0)
    per_step = 8 * 256
    # Plenty of data: the budget stands, with nothing to say.
    assert fit_steps(_train(fit_to_data=True), mix, 10 * 240 * per_step, 1) == (240, 4.0, "")
    # Small data: at most max_epochs passes, and a note naming the size and the passes.
    steps, cap, note = fit_steps(_train(fit_to_data=True), mix, 30 * per_step, 1)
    assert (steps, cap) == (120, 4.0) and "61,440 tokens" in note and "4.0 times" in note
    # Without fit_to_data the steps are the recipe's, and the mixture's cap will speak for itself.
    assert fit_steps(_train(), mix, 30 * per_step, 1)[0] == 240
    # Explicit epochs: as many steps as the passes take, rounded up, and a cap that lets them be read.
    steps, cap, _ = fit_steps(_train(epochs=10.0), mix, 30 * per_step + 7, 1)
    assert steps == 301 and cap >= steps * per_step / (30 * per_step + 7)
    assert fit_steps(_train(epochs=10.0), mix, 30 * per_step, 2)[0] == 150  # two ranks read twice per step


def test_fitted_vocab_grows_with_the_text_and_stays_in_bounds():
    sizes = [fitted_vocab_size(n) for n in (0, 10_000, 150_000, 465_000, 1_100_000, 10**9)]
    assert sizes == sorted(sizes) and sizes[0] == 512 and sizes[-1] == 32768
    assert all(v % 256 == 0 for v in sizes) and sizes[2] < sizes[3] < sizes[4]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    _package_texts().main(str(root))
    return {p.stem: p for p in root.glob("*.txt")}


def test_the_text_recipe_fits_two_texts_of_different_sizes_without_a_stop(texts, tmp_path):
    # The failure: a 144 KB text stopped at once on the repetition cap. Each text here prepares, gets a
    # vocabulary of its own size, and resolves its mixture at the fitted step count.
    path = REPO / "recipes" / "shakespeare.toml"
    seen = {}
    for name, text in sorted(texts.items()):
        r = recipes.load(path, [f"data.sources.text.path={text}", f"data.dir={tmp_path / name}"])
        shards = open_prepared(r.data, progress=False)
        tokens = sum(train_tokens(shards).values())
        steps, cap, note = fit_steps(r.train, r.data.mixture, tokens, 1)
        r.data.mixture.max_epochs = cap
        resolve_phases(r.data, shards, steps * r.train.rows_per_rank() * r.train.seq_len)
        seen[name] = (text.stat().st_size, shards.vocab_size, steps, note)
    (small, large) = sorted(seen.values())
    assert small[1] < large[1], seen  # the smaller text gets the smaller vocabulary
    assert small[2] <= large[2] <= 240, seen


def _micro_recipe(tmp_path, data_dir, extra=""):
    path = tmp_path / "recipe.toml"
    path.write_text(f"""
[model]
preset = "micro"
{data_toml(data_dir)}
[train]
steps = 20
batch_size = 4
seq_len = 32
log_every = 10
eval_every = 5
eval_rows = 8
ckpt_every = 20
keep_checkpoints = 1
keep_best = true
[optim]
lr = 3e-2
{extra}
""")
    return path


def test_keep_best_keeps_the_lowest_validation_checkpoint_as_the_result(tmp_path, prepared):
    out = tmp_path / "run"
    assert main(["train", str(_micro_recipe(tmp_path, prepared)), "--backend", "torch", "--out", str(out),
                 "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["val_loss"], r["step"]) for r in rows if "val_loss" in r]
    best = checkpoint.read_best(out)
    assert best["step"] == min(vals)[1] and best["val_loss"] == pytest.approx(min(vals)[0])
    # keep_checkpoints = 1 keeps the newest, and the best beside it.
    kept = [int(p.name.split("_")[1]) for p in checkpoint.list_steps(out)]
    assert kept == sorted({best["step"], 20})
    assert checkpoint.resolve_path(out).name == f"step_{best['step']:08d}"


def test_a_small_text_shortens_the_run_with_a_note_instead_of_stopping(tmp_path, prepared, capsys):
    out = tmp_path / "run"
    tokens = sum(train_tokens(open_prepared(recipes.load(_micro_recipe(tmp_path, prepared)).data,
                                            progress=False)).values())
    # A cap that lets the data fill about half of the 20 steps of 4 x 32 tokens.
    recipe = _micro_recipe(tmp_path, prepared, f"[data.mixture]\nmax_epochs = {10 * 128 / tokens}\n")
    text = recipe.read_text().replace("keep_best = true", "fit_to_data = true")
    recipe.write_text(text)
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "the training data is small" in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) in (9, 10)
    # The same recipe without fit_to_data stops on the cap, with one line.
    recipe.write_text(text.replace("fit_to_data = true", ""))
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(tmp_path / "other"), "--quiet"]) == 2
    assert "repetition cap" in capsys.readouterr().err
