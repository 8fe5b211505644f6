"""The run report: `report.md` with one section per stage, and its curves as PNG pictures beside it.

Everything comes from what the stages wrote (`stage.json`, `metrics.jsonl`), so a report can be made again at
any time. Metrics also go to TensorBoard event files when `tensorboard` is installed, and to Weights & Biases
in offline mode when `wandb` is installed and `TINYLM_WANDB=1` asks for it; nothing reaches the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tinylm.recipe import Recipe, Stage


def read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line from a killed write
            continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_stage(stage: Stage, rows: list[dict], folder: Path) -> list[str]:
    """PNG curves of one stage (loss, learning rate, reward when there is one); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display is needed or used
    import matplotlib.pyplot as plt

    made = []
    panels = [("loss", [("loss", "train"), ("val_loss", "validation")]), ("lr", [("lr", "learning rate")]),
              ("reward", [("reward", "mean reward"), ("accuracy", "accuracy")])]
    for name, curves in panels:
        drawn = [(label, *_series(rows, key)) for key, label in curves]
        drawn = [d for d in drawn if d[1]]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, steps, values in drawn:
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None)
        ax.set_xlabel("step")
        ax.set_title(f"{stage.name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        file = f"{stage.name}-{name}.png"
        fig.savefig(folder / file, dpi=100)
        plt.close(fig)
        made.append(file)
    return made


def _eval_table(results: dict) -> list[str]:
    lines = ["| task | metric | value | samples |", "|---|---|---:|---:|"]
    for task, metrics in results.items():
        for k, v in metrics.items():
            if k.endswith("_stderr") or k == "samples":
                continue
            lines.append(f"| {task} | {k} | {v:.4f} | {metrics.get('samples', '')} |")
    return lines


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def _final_scores(stage: Stage | None, committee: bool) -> dict:
    """The stage's last evaluation of its first task (its committee's with `committee`), {} if none."""
    evals = [r["eval"] for r in read_metrics(stage.out) if "eval" in r] if stage is not None else []
    names = [k for k in (evals[-1] if evals else {}) if k.startswith("committee:") == committee]
    return evals[-1][names[0]] if names else {}


def compare_table(recipe: Recipe, stages: list[Stage]) -> list[str]:
    """The recipe's `[[compare]]` rows: each side's final accuracy and macro-F1 (a classification task's) and
    the difference a - b; a side that has not been evaluated shows n/a."""
    if not recipe.compare:
        return []
    by_name = {s.name: s for s in stages}
    lines = ["## Comparisons", "", "| comparison | a | accuracy | macro-F1 | b | accuracy | macro-F1 | a - b (accuracy) |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for row in recipe.compare:
        sides = [_final_scores(by_name.get(x.removesuffix("+committee")), x.endswith("+committee"))
                 for x in (row.a, row.b)]
        acc = [side.get("accuracy") for side in sides]
        delta = acc[0] - acc[1] if None not in acc else None
        cells = [f"{x} | {_fmt(side.get('accuracy'), '.3f')} | {_fmt(side.get('macro_f1'), '.3f')}"
                 for x, side in zip((row.a, row.b), sides)]
        lines.append(f"| {row.name} | {cells[0]} | {cells[1]} | {_fmt(delta, '+.3f')} |")
    return lines + [""]


def write_report(recipe: Recipe, stages: list[Stage], root: Path) -> Path:
    lines = [f"# Run report: {recipe.name}", "", f"Recipe: `{recipe.source}`", ""]
    lines += compare_table(recipe, stages)
    for stage in stages:
        status = {}
        if (stage.out / "stage.json").is_file():
            status = json.loads((stage.out / "stage.json").read_text())
        rows = read_metrics(stage.out)
        train_rows = [r for r in rows if "loss" in r]
        last = train_rows[-1] if train_rows else {}
        vals = [r for r in rows if "val_loss" in r]
        evals = [r["eval"] for r in rows if "eval" in r]
        r = stage.recipe
        lines += [f"## Stage `{stage.name}` ({stage.objective})", "",
                  f"- settings: {r.train.steps if stage.objective != 'sft' else status.get('steps', '?')} steps of "
                  f"{r.train.batch_size * r.train.grad_accum} x {r.train.seq_len} tokens, {r.optim.name} at lr "
                  f"{r.optim.lr:g}, {r.schedule.name} schedule, {last.get('dtype', r.train.dtype)}",
                  f"- tokens: {_fmt(status.get('tokens'), ',')}; time: {_fmt(status.get('seconds'), '.0f')} s; "
                  f"tokens/s: {_fmt(last.get('tokens_per_s'), ',.0f')}; MFU: {_fmt(last.get('mfu'), '.1%')}",
                  f"- final train loss: {_fmt(last.get('loss'), '.4f')}; validation loss: "
                  f"{_fmt(vals[-1]['val_loss'] if vals else None, '.4f')}; bits per byte: "
                  f"{_fmt(vals[-1].get('val_bpb') if vals else None, '.4f')}",
                  f"- finished: {'yes' if status.get('done') else 'no'}", ""]
        if evals:
            lines += _eval_table(evals[-1]) + [""]
        lines += [f"![{name}]({name})" for name in plot_stage(stage, rows, root)] + [""]
        export_event_files(stage, rows, root)
    path = root / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def export_event_files(stage: Stage, rows: list[dict], root: Path) -> None:
    """TensorBoard event files (if installed) and an offline W&B run (if installed and asked for)."""
    scalars = [(r["step"], k, v) for r in rows for k, v in r.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        SummaryWriter = None
    if SummaryWriter is not None:
        writer = SummaryWriter(str(root / "tensorboard" / stage.name))
        for step, key, value in scalars:
            writer.add_scalar(key, value, step)
        writer.close()
    if os.environ.get("TINYLM_WANDB") == "1":
        try:
            import wandb
        except ImportError:
            return
        run = wandb.init(project="tinylm", name=stage.name, dir=str(root), mode="offline", reinit=True)
        for step, key, value in scalars:
            run.log({key: value}, step=step)
        run.finish()
