"""`make gpu-check`: everything worth knowing from a short loan of one GPU, in one JSON file.

In order, each part in a process of its own with what is left of an overall time budget (8 minutes), the file
rewritten after each part so that a run cut short still says what it measured:

- `tests`: the GPU tests (`pytest -m gpu`, what `make test-gpu` runs);
- `bench`: the bench's CUDA training rows in bf16, eager and compiled: `mobilellm-125m` (seq 2048, batch 16)
  and SmolLM2-135M's shape (random weights of it), MFU against the data sheet's peak;
- `sft`: the real-model recipe's SFT stage for a fixed number of steps (skipped when the recipe or the
  imported model is absent);
- `grpo`: one GRPO step on the 135M shape, 8 x 8 completions of 128 tokens, with its peak memory.

`--dry-run` runs every part on the CPU at toy sizes (tests collected, not run; the recipe checked by `tinylm
info`, not trained), so that the code paths are exercised where no GPU is:
`python -m tinylm.bench.gpu_check --dry-run --out gpu-check.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tinylm.bench.memory import in_fresh_process

BUDGET_S = 480.0
"""The whole check's time limit: 8 minutes on one H100."""
PART_LIMITS = {"tests": 120.0, "bench": 240.0, "sft": 90.0, "grpo": 90.0}
"""Most seconds each part may take, within what is left of `BUDGET_S`."""
RECIPE, STAGE, MODEL = "recipes/smollm2-reasoning.toml", "sft", "models/smollm2-135m-instruct"
SFT_STEPS = 20
BENCH_CASES = {"mobilellm-125m": ({"preset": "mobilellm-125m", "vocab_size": 32000}, 2048, 16, 10),
               "smollm2-135m-shape": ({"preset": "mobilellm-125m", "vocab_size": 49152}, 2048, 16, 10)}
"""Row name -> (model config, sequence length, batch, timed steps) of the CUDA rows."""
DRY_CASE = ({"preset": "micro", "vocab_size": 256}, 32, 2, 1)


def bench_row(name: str, config: dict, seq_len: int, batch: int, steps: int, compiled: bool) -> dict:
    """One bf16 training row of `config` on this process's torch device, MFU against its peak (a GPU's data
    sheet; on a CPU the cached measured peak)."""
    from tinylm.backends import get_backend
    from tinylm.bench.suite import _measure
    from tinylm.mfu import cached_peak
    from tinylm.model import ModelConfig

    backend = get_backend("torch", "float32")
    case = (name, ModelConfig(**config), seq_len, batch, steps)
    return _measure(backend, case, "bfloat16", cached_peak(backend, "bfloat16"), compiled)


def _tests(dry_run: bool, limit: float) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    command += ["--collect-only"] if dry_run else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    lines = done.stdout.strip().splitlines()
    # pytest exits 5 when it collects nothing (no GPU tests at all): not a failure of the GPU.
    return {"status": "ok" if done.returncode in (0, 5) else "failed", "returncode": done.returncode,
            "summary": lines[-1] if lines else done.stderr[-500:]}


def _bench(dry_run: bool, limit: float) -> dict:
    cases = {"micro": DRY_CASE} if dry_run else BENCH_CASES
    rows, start = [], time.perf_counter()
    for name, (config, seq_len, batch, steps) in cases.items():
        for compiled in (False,) if dry_run else (False, True):  # compiling a step takes minutes on a CPU
            left = limit - (time.perf_counter() - start)
            kwargs = {"name": name, "config": config, "seq_len": seq_len, "batch": batch, "steps": steps,
                      "compiled": compiled}
            try:
                if left < 5:
                    raise subprocess.TimeoutExpired("bench_row", left)
                rows.append(in_fresh_process(__name__, "bench_row", kwargs, f"bench row {name}", timeout=left))
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # the next row may still fit
                rows.append({"name": name, "compiled": compiled, "error": str(e)[-1500:]})
    return {"status": "failed" if any("error" in r for r in rows) else "ok", "rows": rows}


def _sft(dry_run: bool, limit: float, root: Path) -> dict:
    recipe, init = root / RECIPE, root / MODEL
    if not recipe.is_file() or not (init / "checkpoints").is_dir():
        missing = RECIPE if not recipe.is_file() else MODEL
        return {"status": "skipped", "why": f"{missing} is absent (the real-model recipe needs `make real-model`)"}
    steps = f"stages.{STAGE}.train.steps={SFT_STEPS}"
    if dry_run:  # the recipe and the override checked, not trained
        command = [sys.executable, "-m", "tinylm", "info", str(recipe), "--set", steps]
    else:
        out = root / "runs" / "gpu-check"
        command = [sys.executable, "-m", "tinylm", "train", str(recipe), "--stage", STAGE, "--set", steps,
                   "--out", str(out), "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=root)
    result = {"status": "ok" if done.returncode == 0 else "failed", "returncode": done.returncode,
              "steps": SFT_STEPS, "seconds_wall": round(time.perf_counter() - start, 1),
              "output_tail": (done.stdout + done.stderr)[-1500:]}
    log = root / "runs" / "gpu-check" / STAGE / "metrics.jsonl"
    if not dry_run and log.is_file():
        result["last_metrics"] = json.loads(log.read_text().splitlines()[-1])
    return result


def _grpo(dry_run: bool, limit: float) -> dict:
    sizes = dict(config={"preset": "micro", "vocab_size": 256}, prompts=2, group=2, prompt_len=4, new_tokens=4,
                 backend_name="torch") if dry_run else dict(backend_name="torch")
    row = in_fresh_process("tinylm.bench.real_shape", "step_memory", {"kind": "grpo", **sizes}, "GRPO step",
                           timeout=limit)
    return {"status": "ok", "row": row}


def run(out: str | Path = "gpu-check.json", dry_run: bool = False, budget: float = BUDGET_S,
        root: Path | None = None, echo=print) -> dict:
    """Every part in turn, each given what is left of `budget` (at most its `PART_LIMITS`); a part that fails
    or runs out of time is recorded as such and the next one runs. Returns what was written to `out`."""
    from tinylm.bench.suite import machine

    root = Path(root or Path.cwd())
    began = time.perf_counter()
    report = {"dry_run": dry_run, "budget_s": budget, "machine": machine(), "device": _device(), "parts": {}}
    parts = {"tests": lambda left: _tests(dry_run, left), "bench": lambda left: _bench(dry_run, left),
             "sft": lambda left: _sft(dry_run, left, root), "grpo": lambda left: _grpo(dry_run, left)}
    path = Path(out)
    for name, part in parts.items():
        left = min(PART_LIMITS[name], budget - (time.perf_counter() - began))
        start = time.perf_counter()
        if left < 5:
            result = {"status": "skipped", "why": "the check's time budget is spent"}
        else:
            try:
                result = part(left)
            except subprocess.TimeoutExpired:
                result = {"status": "timed out", "why": f"over its {left:.0f} s"}
            except RuntimeError as e:  # a child process failed: its error is the result
                result = {"status": "failed", "why": str(e)[-1500:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["parts"][name] = result
        report["seconds"] = round(time.perf_counter() - began, 1)
        path.write_text(json.dumps(report, indent=2) + "\n")
        echo(f"gpu-check {name}: {result['status']} in {result['seconds']:.1f} s")
    return report


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinylm.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check.json", help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="every part at toy sizes on the CPU")
    args = parser.parse_args(argv)
    if not args.dry_run and _device() == "cpu":
        print("gpu-check: no CUDA device here (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    report = run(args.out, args.dry_run)
    return 0 if all(p["status"] in ("ok", "skipped") for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
