"""Draw a run's loss curves, one panel per stage, from the `metrics.jsonl` each stage wrote.

    python scripts/plot_loss.py runs/quickstart                       # writes docs/img/quickstart-loss.png
    python scripts/plot_loss.py runs/quickstart --out loss.png

`make loss-curve RUN=runs/quickstart` runs the first form. Stages are drawn in the order of the recipe the run
directory records (else in the order their logs were last written); a run without stages is one panel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinylm.errors import UserError  # noqa: E402
from tinylm.report import _series, read_metrics  # noqa: E402


def stage_dirs(run: Path) -> list[Path]:
    """The folders of `run` that hold a metrics log, in the order they were started."""
    if (run / "metrics.jsonl").is_file():
        return [run]
    found = [p.parent for p in run.glob("*/metrics.jsonl")]
    order = {}
    try:  # the recipe the runner recorded says the stages' order; a stage re-run later keeps its place
        from tinylm import recipe

        source = json.loads((run / "run.json").read_text(encoding="utf-8"))["source"]
        order = {s.name: s.index for s in recipe.resolve_stages(recipe.load(source), run)}
    except (OSError, ValueError, KeyError, UserError):
        pass
    return sorted(found, key=lambda d: (order.get(d.name, len(order)), (d / "metrics.jsonl").stat().st_mtime))


def plot(run: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    stages = [(d, read_metrics(d)) for d in stage_dirs(run)]
    stages = [(d, rows) for d, rows in stages if _series(rows, "loss")[0]]
    if not stages:
        raise SystemExit(f"error: no training losses under {run} (expected STAGE/metrics.jsonl)")
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.4), squeeze=False)
    for ax, (folder, rows) in zip(axes[0], stages):
        for key, label in (("loss", "train"), ("val_loss", "validation")):
            steps, values = _series(rows, key)
            if steps:
                ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None)
        ax.set_title(folder.name if folder != run else run.name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("loss (nats per token)")
    fig.suptitle(f"{run.name}: loss by stage")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory (its stages' folders hold metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: docs/img/RUN-loss.png)")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        print(f"error: no run directory {args.run}", file=sys.stderr)
        return 2
    out = args.out or ROOT / "docs" / "img" / f"{args.run.resolve().name}-loss.png"
    print(f"wrote {plot(args.run, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
