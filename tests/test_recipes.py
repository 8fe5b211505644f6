"""Every shipped recipe loads, resolves its data mixture at its full step count, and trains for a couple of steps.

A recipe whose mixture cannot be filled within the repetition cap fails on its first command, so the mixture is
resolved for the recipe's real token budget: on the prepared data for recipes whose data is local (skipped when
a file they read is absent), and on the published sizes of the Hugging Face datasets for the real-scale recipes,
which cannot be downloaded here. A recipe that starts from another's checkpoint (rl.toml from the quickstart's
SFT model) trains, on a machine without that checkpoint, from a smoke run of the recipe that writes it.
"""

import glob
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from tinylm import recipe as recipes
from tinylm.cli import main
from tinylm.data.mixture import resolve_phases
from tinylm.presets import PUBLISHED_PARAMS
from tinylm.recipe import resolve_stages

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))
FILE_TYPES = ("text", "jsonl", "parquet")

# Training tokens of the Hugging Face sources named by real-scale recipes, from their dataset cards (GPT-2
# token counts; the recipes' 32k BPE lands near them). They stand in for prepared shards, which need a download.
HF_TOKENS = {
    ("HuggingFaceFW/fineweb-edu", "sample-350BT"): 350e9,
    ("HuggingFaceFW/fineweb-edu", "sample-10BT"): 10e9,
    ("open-web-math/open-web-math", ""): 14.7e9,
}

# What each real-scale recipe reproduces: the GPUs its header launches it on, and the published run.
REAL_SCALE = {
    "mobilellm-125m": dict(gpus=8, tokens=1e12, tokens_per_step=32 * 32 * 2048, lr=2e-3, warmup=1000,
                           schedule="cosine", min_lr_ratio=0.1),
}


def _load(path, overrides=()):
    return recipes.load(path, list(overrides))


def _is_local(path) -> bool:
    return all(s.type != "hf" for s in _load(path).data.sources)


def _slow_to_prepare(path) -> bool:
    # Files on disk prepare in seconds on two cores; generating and cleaning tens of thousands of synthetic
    # documents, or training the proxy models of the influence and RegMix methods, takes minutes.
    r = _load(path)
    sources = r.data.sources
    return not sources or any(s.type == "synthetic" for s in sources) or r.data.mixture.method in ("influence", "regmix") \
        or any(p.method in ("influence", "regmix") for p in r.data.mixture.phases)


def _missing_files(recipe) -> list[str]:
    """Files the recipe's local sources read, the tokenizer file it names, the checkpoint it starts from and the
    teacher it distills from, that are absent (paths are relative to the repository root)."""
    missing = [s.path for s in recipe.data.sources if s.type in FILE_TYPES and not glob.glob(s.path)]
    starts = [recipe.train.init_from] + [st.train.get("init_from", "") for st in recipe.stages]
    named = [recipe.data.tokenizer.path, recipe.distill.teacher]
    return missing + [p for p in starts + named if p and not Path(p).exists()]


LOCAL = [p for p in RECIPES if _is_local(p)]
HUB = [p for p in RECIPES if not _is_local(p)]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_reports(path, capsys):
    assert main(["info", str(path), "--json", "--set", "train.steps=20"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recipe"]["train"]["steps"] == 20
    assert report["params"] > 0 and report["flops_per_token"] > 0
    preset = report["recipe"]["model"]["preset"]
    if preset in PUBLISHED_PARAMS and report["recipe"]["model"]["vocab_size"] is None:
        published, unit = PUBLISHED_PARAMS[preset]
        assert abs(report["params"] - published) <= max(1e-3 * published, unit / 2)


def test_any_recipe_takes_any_preset(capsys):
    path = next(p for p in RECIPES if p.stem == "quickstart")
    assert main(["info", str(path), "--json", "--set", "model.preset=mobilellm-125m"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["n_layers"] == 30


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=[pytest.mark.slow] if _slow_to_prepare(p) else []) for p in LOCAL],
    ids=lambda p: p.stem)
def test_local_recipe_resolves_at_its_full_step_count(path, tmp_path, monkeypatch, capsys, stand_in):
    monkeypatch.chdir(REPO)
    r = _load(path, [f"data.dir={tmp_path / 'data'}", *stand_in(_load(path), capsys)])
    if missing := _missing_files(r):
        pytest.skip(f"{path.name} reads {missing[0]}, absent here")
    if not r.data.sources:
        pytest.skip(f"{path.name} only fine-tunes a checkpoint: no pretraining data to resolve")
    from tinylm.data.prepare import open_prepared

    shards = open_prepared(r.data, progress=False)
    total = r.train.total_tokens()
    phases = resolve_phases(r.data, shards, total)
    assert phases[0].start_tokens == 0 and all(sum(p.weights.values()) == pytest.approx(1) for p in phases)
    mix = json.loads((tmp_path / "data" / "mixture.json").read_text())
    assert mix["total_tokens"] == total and max(mix["epochs"].values()) <= r.data.mixture.max_epochs + 1e-6


def _smoke_overrides(recipe, data_dir) -> list[str]:
    """A couple of small steps on the recipe's own model, sources and mixture methods; synthetic sources shrink
    (by name, so the recipe's other settings stay) to keep this quick."""
    sets = [f"data.dir={data_dir}", "train.steps=2", "train.batch_size=2", "train.grad_accum=1",
            "train.eval_every=2", "train.eval_rows=2", "train.log_every=1", "eval.limit=2"]
    sets += [f"data.sources.{s.name}.num_docs={min(s.num_docs, 300)}" for s in recipe.data.sources
             if s.type == "synthetic"]
    for stage in recipe.stages:  # every stage logs each of its steps; SFT stages: two too, on a few conversations
        sets += [f"stages.{stage.name}.train.log_every=1", f"stages.{stage.name}.train.steps=2"]
        if stage.objective == "sft":
            sets.append(f"stages.{stage.name}.sft.epochs=0")
            sets += [f"stages.{stage.name}.sft.sources.{s['name']}.num_docs=40"
                     for s in stage.sft.get("sources", []) if s.get("type") == "synthetic"]
    return sets


def _smoke_train(path, recipe, out, data_dir, capsys, extra=()):
    sets = _smoke_overrides(recipe, data_dir) + list(extra)
    args = ["train", str(path), "--backend", "torch", "--out", str(out), "--quiet"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """`stand_in(recipe, capsys)`: overrides that start `recipe` from a stand-in for the checkpoint it names in
    `train.init_from` where that is absent (a fresh machine has no `runs/quickstart/sft`, which rl.toml starts
    from): the stage folder of a smoke run of the shipped recipe that writes it, with the same model shape,
    tokenizer and chat template, made once per module. No overrides where the checkpoint exists or no shipped
    recipe writes it."""
    made: dict[str, Path] = {}

    def overrides(recipe, capsys) -> list[str]:
        checkpoint = recipe.train.init_from
        if not checkpoint or Path(checkpoint).exists():
            return []
        if checkpoint not in made:
            for path in LOCAL:
                source = _load(path)
                stage = next((st for st in resolve_stages(source)
                              if st.out.resolve() == Path(checkpoint).resolve()), None)
                if stage is not None and not _missing_files(source):
                    root = tmp_path_factory.mktemp(f"stand-in-{path.stem}")
                    _smoke_train(path, source, root / "run", root / "data", capsys)
                    made[checkpoint] = root / "run" / stage.out.relative_to(source.train.out)
                    break
        return [f"train.init_from={made[checkpoint]}"] if checkpoint in made else []

    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("path", LOCAL, ids=lambda p: p.stem)
def test_local_recipe_trains_a_couple_of_steps(path, tmp_path, monkeypatch, capsys, stand_in):
    monkeypatch.chdir(REPO)
    extra = stand_in(_load(path), capsys)
    r = _load(path, extra)
    if missing := _missing_files(r):
        pytest.skip(f"{path.name} reads {missing[0]}, absent here")
    if any(st.objective in ("mlm", "classify") for st in r.stages):
        pytest.skip(f"{path.name}'s encoder stages are trained small by tests/test_tlm_recipe.py")
    if any(p.startswith("models/") for p in [r.train.init_from] + [st.train.get("init_from", "") for st in r.stages]):
        # Steps of the real 135M model take minutes here; tests/test_real_model_export.py trains it briefly.
        pytest.skip(f"{path.name} starts from the real model")
    out = tmp_path / "run"
    _smoke_train(path, r, out, tmp_path / "data", capsys, extra)
    for stage in resolve_stages(r, out):
        rows = [json.loads(line) for line in (stage.out / "metrics.jsonl").read_text().splitlines()]
        losses = [row["loss"] for row in rows if "loss" in row]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
        if stage.objective != "grpo":  # an RL stage's held-out measure is pass@1 on its [eval] tasks alone
            assert any(math.isfinite(row.get("val_bpb", math.nan)) for row in rows)
        assert any(rows_eval for rows_eval in (row.get("eval") for row in rows)) == bool(stage.recipe.eval.tasks)


class _StandInShards:
    """What the mixture reads of a prepared directory (source names, train tokens, a fingerprint, a folder),
    with each source's published size in place of shards."""

    def __init__(self, root: Path, tokens: dict[str, float]):
        self.root, self.sources, self.fingerprint = root, list(tokens), "published-sizes"
        self._tokens = tokens

    def split(self, name, split):
        return SimpleNamespace(num_tokens=int(self._tokens[name]))


@pytest.mark.parametrize("path", HUB, ids=lambda p: p.stem)
def test_real_scale_recipe_resolves_at_its_full_step_count(path, tmp_path):
    if path.stem not in REAL_SCALE:
        pytest.skip(f"{path.name}: the GPU count and token budget it is written for are not recorded here")
    want = REAL_SCALE[path.stem]
    r = _load(path)
    tokens_per_step = r.train.rows_per_rank() * want["gpus"] * r.train.seq_len
    assert tokens_per_step == want["tokens_per_step"]
    total = r.train.total_tokens(want["gpus"])
    assert abs(total - want["tokens"]) <= tokens_per_step
    assert (r.optim.lr, r.schedule.warmup_steps, r.schedule.name, r.schedule.min_lr_ratio) == (
        want["lr"], want["warmup"], want["schedule"], want["min_lr_ratio"])
    assert r.train.dtype == "bfloat16" and r.model.preset == path.stem
    sizes = {s.name: HF_TOKENS[(s.path, s.hf_config)] for s in r.data.sources}
    r.data.dir = str(tmp_path)
    phases = resolve_phases(r.data, _StandInShards(tmp_path, sizes), total)
    assert sum(phases[0].weights.values()) == pytest.approx(1)
    epochs = json.loads((tmp_path / "mixture.json").read_text())["epochs"]
    assert max(epochs.values()) <= r.data.mixture.max_epochs + 1e-6


def test_the_cap_check_catches_a_source_too_small_for_the_budget(tmp_path):
    # The same resolution on the 10B-token FineWeb-Edu sample: 1T tokens do not fit in 4 epochs of the sources.
    from tinylm.errors import UserError

    path = next(p for p in HUB if p.stem == "mobilellm-125m")
    r = _load(path, ["data.sources.fineweb_edu.hf_config=sample-10BT"])
    sizes = {s.name: HF_TOKENS[(s.path, s.hf_config)] for s in r.data.sources}
    with pytest.raises(UserError, match="repetition cap"):
        resolve_phases(r.data, _StandInShards(tmp_path, sizes), r.train.total_tokens(REAL_SCALE[path.stem]["gpus"]))


def test_text_recipe_takes_another_file_with_one_set_and_reprepares(tmp_path, monkeypatch):
    # The documented way to train the Shakespeare recipe on another text: one --set naming the source's file.
    # The prepared directory must follow the new file, not serve the old one's tokens.
    from tinylm.data.prepare import open_prepared

    monkeypatch.chdir(tmp_path)
    path = next(p for p in LOCAL if p.stem == "shakespeare")
    words = "thou art the river stone and light of morning seven ships sail over grey water when kings fall".split()
    texts = {}
    for name, n in (("one.txt", 150), ("two.txt", 400)):
        rng = random.Random(name)
        texts[name] = "\n\n".join(f"SPEAKER {i}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(10, 30)))
                                  for i in range(n))
        (tmp_path / name).write_text(texts[name])
    seen = []
    for name in texts:
        r = _load(path, [f"data.sources.text.path={name}", "data.dir=data"])
        open_prepared(r.data, progress=False)
        source = json.loads((tmp_path / "data" / "manifest.json").read_text())["sources"]["text"]
        seen.append(source["train"]["bytes"] + source["val"]["bytes"])
    assert seen[1] > 2 * seen[0]
