"""Draw the pipeline's stages as docs/img/pipeline.png: what each step of a recipe does, and where it lives.

    python scripts/draw_pipeline.py     # or: make pipeline-diagram
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "pipeline.png"

# (title, what it does, where the code is); drawn left to right in one row, data first.
STEPS = [
    ("data", "sources, cleaning,\ntokenizer, shards", "tinylm/data"),
    ("mixture", "weights per phase:\ntemperature, influence,\nRegMix", "tinylm/data"),
    ("pretraining", "next-token loss\n(objective lm)", "tinylm/train"),
    ("mid-training", "lm, co-evolution,\ndistillation", "tinylm/post"),
    ("SFT", "assistant tokens of\npacked conversations", "tinylm/post"),
    ("RL / DPO", "GRPO on verifiable\nrewards; DPO pairs", "tinylm/post"),
    ("evaluation", "exact match, acc,\nbits per byte; report.md", "tinylm/eval"),
    ("export", "Hugging Face\n(and GGUF)", "tinylm/interop"),
]
QUICKSTART = {"data", "mixture", "pretraining", "SFT", "RL / DPO", "evaluation"}


def draw(out: Path = OUT) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless
    matplotlib.rcParams["svg.hashsalt"] = "tinylm"  # the same picture every time
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    width, gap = 1.6, 0.45
    fig, ax = plt.subplots(figsize=(15, 3.0))
    for i, (title, what, where) in enumerate(STEPS):
        x = i * (width + gap)
        shade = "#dbe8f7" if title in QUICKSTART else "#eeeeee"
        ax.add_patch(FancyBboxPatch((x, 0), width, 1.6, boxstyle="round,pad=0.04", fc=shade, ec="#4a6a8a"))
        ax.text(x + width / 2, 1.32, title, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x + width / 2, 0.78, what, ha="center", va="center", fontsize=8.5)
        ax.text(x + width / 2, 0.18, where, ha="center", va="center", fontsize=8, family="monospace", color="#444")
        if i:
            ax.add_patch(FancyArrowPatch((x - gap + 0.04, 0.8), (x - 0.04, 0.8), arrowstyle="-|>",
                                         mutation_scale=14, color="#4a6a8a"))
    ax.text(0, -0.35, "blue: the steps `make quickstart` runs; each training stage is one [[stages]] entry "
            "of a recipe, run in order by tinylm run", fontsize=9, color="#333")
    ax.set_xlim(-0.2, len(STEPS) * (width + gap) - gap + 0.2)
    ax.set_ylim(-0.55, 1.8)
    ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(f"wrote {draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)}")
