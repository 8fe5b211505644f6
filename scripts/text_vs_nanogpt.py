"""The text recipe against nanoGPT's character-level CPU example, on one text, with the same held-out tail:

    python scripts/text_vs_nanogpt.py TEXT NANOGPT_DIR [WORK_DIR]

NANOGPT_DIR is a checkout of karpathy/nanoGPT (its `train.py` and `model.py` are used as they are). The first
90% of TEXT's characters train both, the last 10% score both, in bits per byte: nanoGPT's split of its own
`prepare.py`, so that neither side is scored on text near what it trained on. nanoGPT runs the command line its
README gives for a CPU (4 x 128, context 64, 2000 iterations); tinylm runs `recipes/shakespeare.toml` unchanged
but for the path. Each side's final model scores every character of the tail once, in windows of its context.
Prints one line per side and writes WORK_DIR/result.json.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NANOGPT_CPU_EXAMPLE = ("config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 "
                       "--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 "
                       "--lr_decay_iters=2000 --dropout=0.0").split()


def split(text: str) -> tuple[str, str]:
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def nanogpt(train: str, tail: str, repo: Path, name: str) -> dict:
    """Trains nanoGPT's CPU example on `train` (its character vocabulary taken from the whole text, as its
    `prepare.py` does) and scores `tail` with its saved checkpoint."""
    chars = sorted(set(train + tail))
    index = {c: i for i, c in enumerate(chars)}
    data = repo / "data" / name
    data.mkdir(parents=True, exist_ok=True)
    for part, text in (("train", train), ("val", tail)):
        np.array([index[c] for c in text], dtype=np.uint16).tofile(data / f"{part}.bin")
    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                                                  "stoi": index}))
    out = f"out-{name}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py", *NANOGPT_CPU_EXAMPLE, f"--dataset={name}", f"--out_dir={out}"],
                   cwd=repo, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    sys.path.insert(0, str(repo))
    import torch
    from model import GPT, GPTConfig  # nanoGPT's own model class

    saved = torch.load(repo / out / "ckpt.pt", map_location="cpu")
    gpt = GPT(GPTConfig(**saved["model_args"]))
    gpt.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    gpt.eval()
    ids, window, nats = np.array([index[c] for c in tail], dtype=np.int64), saved["model_args"]["block_size"], 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            x, y = ids[start:start + window], ids[start + 1:start + window + 1]
            logits, _ = gpt(torch.tensor(x[:len(y)])[None], torch.tensor(y)[None])
            nats -= torch.log_softmax(logits[0].float(), -1).gather(-1, torch.tensor(y)[:, None]).sum().item()
    return {"bpb": nats / (math.log(2) * len(tail[1:].encode())), "seconds": seconds,
            "iterations": int(saved["iter_num"])}


def tinylm(train_path: Path, tail_path: Path, work: Path) -> dict:
    run = work / "tinylm"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tinylm", "train", "recipes/shakespeare.toml", "--backend", "torch",
                    "--quiet", "--out", str(run / "run"), "--set", f"data.dir={run / 'data'}",
                    "--set", f"data.sources.text.path={train_path}"], check=True)
    seconds = time.perf_counter() - start
    scored = subprocess.run([sys.executable, "-m", "tinylm", "eval", str(run / "run"), "--tasks",
                             f"text:{tail_path}", "--json"], check=True, capture_output=True, text=True).stdout
    return {"bpb": next(iter(json.loads(scored).values()))["bpb"], "seconds": seconds}


def main(text_path: str, repo: str, work: str | None = None) -> None:
    text = Path(text_path).read_text(encoding="utf-8")
    name = Path(text_path).stem
    root = Path(work or f"runs/vs-nanogpt-{name}")
    root.mkdir(parents=True, exist_ok=True)
    train, tail = split(text)
    (root / "train.txt").write_text(train, encoding="utf-8")
    (root / "tail.txt").write_text(tail, encoding="utf-8")
    result = {"text": name, "bytes": len(text.encode()), "tail_bytes": len(tail.encode()),
              "nanogpt": nanogpt(train, tail, Path(repo).resolve(), f"vs-{name}"),
              "tinylm": tinylm(root / "train.txt", root / "tail.txt", root)}
    (root / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    for side in ("tinylm", "nanogpt"):
        r = result[side]
        print(f"{name} ({result['bytes']:,} bytes, tail {result['tail_bytes']:,}): {side} {r['bpb']:.3f} bits per "
              f"byte on the held-out tail, trained in {r['seconds']:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python scripts/text_vs_nanogpt.py TEXT NANOGPT_DIR [WORK_DIR]")
    main(*sys.argv[1:])
