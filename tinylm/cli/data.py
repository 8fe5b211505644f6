"""`tinylm data ...` and `tinylm tokenizer ...`: the data commands, mounted by the main CLI."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from tinylm import recipe as recipes
from tinylm.cli.base import make_app

app = make_app(help="Prepare token shards and compute mixture weights.")
tokenizer_app = make_app(help="Train or inspect the tokenizer.")


@tokenizer_app.callback()
def _tokenizer_group():
    """Train or inspect the tokenizer."""


SET_HELP = "Override a recipe value: section.key=value (repeatable)."


def load_recipe(path: str, overrides: list[str] | None):
    """The whole recipe (so `--set train.steps=...` works) and its data section."""
    recipe = recipes.load(path, overrides)
    return recipe, recipe.data


def _console():
    from rich.console import Console

    return Console(file=sys.stdout, width=120)


@app.command("prepare")
def prepare_cmd(
    recipe: str = typer.Argument(..., help="Recipe TOML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the inputs are unchanged."),
    workers: int = typer.Option(0, "--workers", help="Cleaning processes (0: every core)."),
):
    """Clean and tokenize every source into token shards (a no-op when nothing changed)."""
    from rich.table import Table

    from tinylm.data.prepare import is_up_to_date, prepare
    from tinylm.data.shards import ShardSet

    _, data_cfg = load_recipe(recipe, set_)
    fresh = is_up_to_date(data_cfg) and not force
    root = prepare(data_cfg, force=force, workers=workers or None)
    manifest = ShardSet(root).manifest
    console = _console()
    table = Table(title=f"{root}  (fingerprint {manifest['fingerprint'][:12]}, vocab {manifest['vocab_size']})")
    for col in ("source", "read", "kept", "removed", "train docs", "train tokens", "val docs", "val tokens", "bytes/token"):
        table.add_column(col, justify="left" if col in ("source", "removed") else "right")
    for name, s in manifest["sources"].items():
        c = s["cleaning"]
        removed = ", ".join(f"{k} {v}" for k, v in c["removed"].items() if v) or "-"
        table.add_row(name, str(c["input"]), str(c["kept"]), removed, f"{s['train']['docs']:,}",
                      f"{s['train']['tokens']:,}", f"{s['val']['docs']:,}", f"{s['val']['tokens']:,}",
                      f"{s['bytes_per_token']:.2f}")
    console.print(table)
    console.print("up to date: nothing to do" if fresh else f"prepared in {manifest.get('seconds', 0):.1f}s")


@app.command("mix")
def mix_cmd(
    recipe: str = typer.Argument(..., help="Recipe TOML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: {weights: {phase: {source: weight}}, ...}."),
    tokens: int = typer.Option(0, "--tokens", help="Training tokens (default: the recipe's steps x batch x seq_len)."),
    recompute: bool = typer.Option(False, "--recompute", help="Ignore a saved mixture.json."),
):
    """Compute, print and save the mixture weights of every phase (mixture.json in the data directory)."""
    from rich.table import Table

    from tinylm.data.mixture import MIXTURE_FILE, load_or_compute
    from tinylm.data.prepare import prepare
    from tinylm.data.shards import ShardSet

    full, data_cfg = load_recipe(recipe, set_)
    total = tokens or full.train.total_tokens()
    shards = ShardSet(prepare(data_cfg, progress=not as_json))
    if as_json or not sys.stderr.isatty():
        result = load_or_compute(data_cfg, shards, total, recompute=recompute)
    else:
        from rich.console import Console

        with Console(stderr=True).status("computing mixture weights (proxy models for influence/regmix)"):
            result = load_or_compute(data_cfg, shards, total, recompute=recompute)
    if as_json:
        out = {
            "weights": {p["name"]: p["weights"] for p in result["phases"]},
            "phases": result["phases"],
            "epochs": result["epochs"],
            "total_tokens": result["total_tokens"],
            "max_epochs": result["max_epochs"],
            "path": str(shards.root / MIXTURE_FILE),
        }
        typer.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    console = _console()
    for p in result["phases"]:
        table = Table(title=f"phase {p['name']} ({p['method']}): {p['tokens']:,} tokens from {p['start_tokens']:,}")
        for col in ("source", "weight", "method weight", "tokens", "epochs"):
            table.add_column(col, justify="left" if col == "source" else "right")
        for g, w in sorted(p["weights"].items(), key=lambda kv: -kv[1]):
            table.add_row(g, f"{w:.4f}", f"{p['method_weights'][g]:.4f}", f"{p['tokens_per_source'][g]:,}",
                          f"{p['epochs'][g]:.2f}")
        console.print(table)
    console.print(f"saved {shards.root / MIXTURE_FILE}")


@tokenizer_app.command("train")
def tokenizer_train_cmd(
    recipe: str = typer.Argument(..., help="Recipe TOML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    out: Optional[str] = typer.Option(None, "--out", help="Where to write tokenizer.json (default: the data directory)."),
):
    """Train a byte-level BPE on a sample of every source; report bytes per token for each."""
    from tinylm.data.prepare import train_recipe_tokenizer
    from tinylm.data.tokenizer import load_tokenizer

    _, data_cfg = load_recipe(recipe, set_)
    path, report = train_recipe_tokenizer(data_cfg, out=out)
    vocab = load_tokenizer(path).get_vocab_size(with_added_tokens=True)
    console = _console()
    console.print(f"tokenizer: {path} (vocab {vocab})")
    for name, bpt in report.items():
        console.print(f"  {name:<24} {bpt:6.3f} bytes/token")
