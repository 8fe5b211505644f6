"""The `tinylm` command line: every command in one place."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tinylm import model, recipe as recipes
from tinylm.cli.base import make_app, run as run_app
from tinylm.config import to_dict
from tinylm.cli import data as data_cli
from tinylm.cli.eval import register as register_eval_commands
from tinylm.data.shards import MANIFEST, ShardSet
from tinylm.errors import UserError

app = make_app(help="Train sub-billion reasoning language models on MLX or PyTorch from one recipe.")
app.add_typer(data_cli.app, name="data", help="Prepare token shards and compute mixtures.")
app.add_typer(data_cli.tokenizer_app, name="tokenizer", help="Train a BPE tokenizer on a recipe's mixture.")
register_eval_commands(app)  # generate, chat, eval, export, import

SET_HELP = "Override a recipe value: section.key=value (repeatable)."


def _shape_for(recipe: recipes.Recipe) -> model.ModelShape:
    # Training takes the vocabulary from the tokenizer when the recipe sets none; say the same here.
    vocab = None
    if recipe.data.dir and (Path(recipe.data.dir) / MANIFEST).is_file():
        vocab = ShardSet(recipe.data.dir).vocab_size
    shape = model.resolve(recipe.model, vocab_size=vocab)
    model.check_fits(shape, recipe.train.seq_len, vocab)
    return shape


def _engine(backend: str, recipe: recipes.Recipe, reporter):
    """The backend a command trains on, its pick said here (each stage's trainer says its dtype and whether its
    step compiles, which `train.dtype = "auto"` and an unset `train.compile` leave to timing that stage's model)."""
    from tinylm.backends import get_backend, pick

    name, why = pick(backend)
    engine = get_backend(name, dtype=recipe.train.dtype, compile=recipe.train.compile)
    reporter.say(f"backend: {name} on {engine.device_name} ({why})")
    return engine


@app.command()
def info(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe TOML file."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Show the resolved recipe, the parameter count and the training FLOPs per token; for a checkpoint or
    run directory, its model and where its weights came from."""
    if recipe_path.is_dir():
        _checkpoint_info(recipe_path, as_json)
        return
    recipe = recipes.load(recipe_path, set_)
    shape = _shape_for(recipe)
    report = {
        "recipe": to_dict(recipe),
        "model": shape.to_dict(),
        "params": model.count_params(shape),
        "non_embedding_params": model.count_params(shape, embeddings=False),
        "flops_per_token": model.flops_per_token(shape, recipe.train.seq_len),
        "tokens_per_step": recipe.train.rows_per_rank() * recipe.train.seq_len,
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(json.dumps(report["recipe"], indent=2))
    print(f"model: {recipe.model.preset} {shape.n_layers} layers x{shape.block_repeats}, dim {shape.dim}, "
          f"heads {shape.n_heads}/{shape.n_kv_heads}, ffn {shape.ffn_dim}, vocab {shape.vocab_size}")
    print(f"params: {report['params']:,} ({report['non_embedding_params']:,} without the embedding)")
    print(f"flops per token: {report['flops_per_token']:.4g} at seq_len {recipe.train.seq_len}")


def _checkpoint_info(path: Path, as_json: bool) -> None:
    from tinylm.train import checkpoint

    meta = checkpoint.read_meta(checkpoint.resolve_path(path))
    shape = model.ModelShape(**meta["model"])
    source = meta.get("imported_from") or {}
    report = {"checkpoint": str(checkpoint.resolve_path(path)), "step": meta.get("step"), "model": meta["model"],
              "params": model.count_params(shape), "imported_from": source or None, "chat": bool(meta.get("chat"))}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(f"checkpoint: {report['checkpoint']} (step {report['step']})")
    print(f"model: {shape.n_layers} layers x{shape.block_repeats}, dim {shape.dim}, heads {shape.n_heads}/"
          f"{shape.n_kv_heads}, ffn {shape.ffn_dim}, vocab {shape.vocab_size}; {report['params']:,} params")
    if source:
        line = f"imported from {source.get('format', 'hf')} {source.get('name')} ({source.get('architecture')})"
        if source.get("quantization"):
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(source["quantization"].items()))
            line += f"; tensor types {kinds}: weights dequantized to float32, not the original ones"
        print(line)


@app.command()
def train(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe TOML file."),
    backend: str = typer.Option("auto", help="auto, mlx or torch."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: train.out from the recipe)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's latest checkpoint."),
    allow_data_change: bool = typer.Option(False, "--allow-data-change", help="Resume even if the data changed."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Run this stage of the recipe alone (default: "
                                        "every stage in order; each writes its own folder under the run directory)."),
):
    """Train a model from a recipe: pretraining, mid-training, SFT or distillation stages."""
    from tinylm.lock import FolderLock
    from tinylm.progress import RunReporter
    from tinylm.stages import build_trainer

    recipe = recipes.load(recipe_path, set_)
    stages = recipes.resolve_stages(recipe, out)
    if stage is not None:
        stages = [recipes.pick_stage(stages, stage)]
    reporter = RunReporter(enabled=not quiet)
    # The run folder, and each stage's (the same one without stages), have one writer: this process.
    with FolderLock(out or recipe.train.out, "run folder"):
        engine = _engine(backend, recipe, reporter)
        for one in stages:
            if recipe.stages:
                reporter.say(f"stage {one.name} ({one.objective}) -> {one.out}")
            with FolderLock(one.out, "stage folder"):
                trainer = build_trainer(one, engine, resume=resume, allow_data_change=allow_data_change,
                                        reporter=reporter)
                summary = trainer.fit()
            reporter.say(f"done: {trainer.out} " + json.dumps({k: v for k, v in summary.items() if k != "phase"}))
        engine.close()


@app.command()
def run(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe TOML file."),
    backend: str = typer.Option("auto", help="auto, mlx or torch."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: train.out from the recipe)."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Run this stage and every one after it again."),
    only: Optional[str] = typer.Option(None, "--only", help="Run this stage alone again."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
):
    """Run a whole recipe: data, every stage in order (skipping finished ones), evaluation and a report."""
    from tinylm.lock import FolderLock
    from tinylm.progress import RunReporter
    from tinylm.runner import plan, run_stages
    from tinylm.runner import run as run_recipe

    recipe = recipes.load(recipe_path, set_)
    root = Path(out or recipe.train.out)
    plan(run_stages(recipe, root), from_stage, only)  # stage names, before any work
    reporter = RunReporter(enabled=not quiet)
    with FolderLock(root, "run folder"):  # taken again by the runner; here, before a backend loads
        engine = _engine(backend, recipe, reporter)
        results = run_recipe(recipe, engine, out, from_stage, only, reporter)
        engine.close()
    if results:
        from tinylm.train.trainer import format_eval

        reporter.say("evaluation: " + format_eval(results))


@app.command()
def bench(
    backend: List[str] = typer.Option(["torch", "mlx"], "--backend", help="Backends to measure (repeatable)."),
    out: Path = typer.Option(Path("bench.json"), help="Where to write the JSON report."),
):
    """Measure training tokens/s and MFU per backend, and data preparation throughput."""
    from tinylm.bench.suite import run

    run(tuple(backend), out)


QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml"


@app.command()
def quickstart(
    backend: str = typer.Option("auto", help="auto, mlx or torch."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of continuing an earlier quickstart."),
):
    """`tinylm run recipes/quickstart.toml` on the built-in data, then the final model scored on word problems in
    held-out and in seen phrasings (and with each group of wording held out alone), every answer written to `samples.jsonl` in the run folder, a few shown."""
    import shutil

    from tinylm.cli.eval import write_samples
    from tinylm.eval import harness
    from tinylm.eval.tasks import load_tasks
    from tinylm.generate import load_model

    if not QUICKSTART.is_file():
        raise UserError(f"the quickstart recipe is missing: {QUICKSTART}")
    recipe = recipes.load(QUICKSTART, set_)
    out = Path(recipe.train.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    # The whole recipe through the runner: finished stages are skipped, an interrupted one resumes.
    run(QUICKSTART, backend=backend, set_=set_, out=None, from_stage=None, only=None, quiet=False)
    final = recipes.resolve_stages(recipe)[-1].out
    lm, tok, ckpt = load_model(final, backend)
    rows: list = []
    # Unseen and seen phrasings, then one group of wording held out at a time: where reading fails.
    tasks = load_tasks("word_problems,word_problems_by_group", recipe.eval.limit or 200)
    results = harness.run_tasks(lm, tok, tasks, ckpt.meta,
                                chat=bool(ckpt.meta.get("chat")), log=rows)
    write_samples(out / "samples.jsonl", rows)
    print("\n" + harness.markdown_table(results), end="")
    for row in _examples(rows):
        verdict = "right" if row["correct"] else f"wrong, expected {row['expected']}"
        where = "unseen" if row["task"].endswith("_unseen") else "seen"
        print(f"\n{where}-phrasing problem: {row['prompt'].strip()}\nmodel ({verdict}):\n{row['completion'].strip()}")
    print(f"\nevery answer: {out / 'samples.jsonl'}\ncheckpoint: {ckpt.path}\n"
          f"next: tinylm eval {final} --tasks word_problems,arithmetic --limit 500 --log-samples samples.jsonl")


def _examples(rows: list[dict]) -> list[dict]:
    """Two problems in unseen phrasings, one with a distractor sentence, one in seen phrasing."""
    from tinylm.data.word_problems import has_distractor

    unseen = [r for r in rows if r["task"].endswith("_unseen")]
    distracted = [r for r in unseen if has_distractor(r["prompt"])]
    plain = [r for r in unseen if not has_distractor(r["prompt"])]
    seen = [r for r in rows if r["task"].endswith("_seen")]
    return plain[:2] + distracted[:1] + seen[:1]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, with a one-line message)."""
    return run_app(app, argv)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
