"""The pipeline runner: every stage of a recipe in order, each only when it has something left to do.

A stage's fingerprint covers its resolved settings and the fingerprint of the stage before it. A finished stage
with the same fingerprint is skipped; an interrupted one resumes from its newest checkpoint; a stage whose
settings changed (or that comes after one that ran again) starts over, and what it had produced is moved to
`DIR/.replaced/` rather than deleted. At the end the runner writes `DIR/eval.json` and `DIR/report.md`.

    DIR/run.json                 which recipe the directory belongs to
    DIR/<stage>/stage.json       the stage's fingerprint, whether it finished, its time and final metrics
    DIR/<stage>/metrics.jsonl    what its trainer logged; checkpoints/ beside it
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from tinylm.train import checkpoint
from tinylm.config import to_dict
from tinylm.files import atomic_write_json
from tinylm.errors import UserError
from tinylm.lock import LOCK_FILE, FolderLock
from tinylm.recipe import Recipe, Stage, pick_stage, resolve_stages

RUN_FILE = "run.json"
STAGE_FILE = "stage.json"


def stage_fingerprint(stage: Stage, previous: str, start: str | None = None) -> str:
    """`start`: where the stage's weights come from when that is not the stage before it."""
    settings = to_dict(stage.recipe)
    for cosmetic in ("source", "name"):
        settings.pop(cosmetic, None)
    # Neither where a stage writes nor how it spends memory makes its finished result stale.
    for key in ("out", "log_every", "loss_chunk", "activation_checkpointing"):
        settings["train"].pop(key, None)
    fields = {"objective": stage.objective, "settings": settings, "after": previous}
    if start is not None:
        fields["start"] = start
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def claim_directory(recipe: Recipe, out: Path) -> None:
    """Refuse a run directory written by another recipe; mark a new one as this recipe's."""
    found = _read_json(out / RUN_FILE)
    if found is not None and found.get("recipe") != recipe.name:
        raise UserError(f"{out} holds a run of recipe {found.get('recipe')!r}, not {recipe.name!r}: "
                        f"choose another --out")
    if found is None and out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise UserError(f"{out} is not empty and was not written by `tinylm run`: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if found is None:
        atomic_write_json(out / RUN_FILE, {"recipe": recipe.name, "source": recipe.source})


def plan(stages: list[Stage], from_stage: str | None, only: str | None) -> list[tuple[Stage, str, str]]:
    """(stage, fingerprint, action) in order; action is `skip`, `resume` or `start`."""
    forced = set()
    if from_stage:
        first = pick_stage(stages, from_stage).index
        forced = {s.name for s in stages if s.index >= first}
    if only:
        forced = {pick_stage(stages, only).name}
    out, previous, rerun = [], "", False
    for i, stage in enumerate(stages):
        usual = stages[i - 1].out if i else None
        start = None if stage.previous == usual else stage.previous.name if stage.previous else "scratch"
        fp = stage_fingerprint(stage, previous, start)
        previous = fp
        status = _read_json(stage.out / STAGE_FILE) or {}
        if only and stage.name not in forced:
            action = "skip"
        elif stage.name in forced or rerun or (status and status.get("fingerprint") != fp):
            action = "start"
        elif status.get("done"):
            action = "skip"
        else:
            action = "resume" if checkpoint.list_steps(stage.out) else "start"
        rerun = rerun or (action == "start" and not only)
        out.append((stage, fp, action))
    return out


def _set_aside(folder: Path, root: Path) -> None:
    """Move what an earlier run of a stage produced out of the way, never deleting it. The folder itself stays,
    with the lock this process holds on it."""
    produced = [p for p in folder.iterdir() if p.name != LOCK_FILE] if folder.is_dir() else []
    if produced:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        target = root / ".replaced" / f"{folder.name}-{stamp}"
        n = 1
        while target.exists():  # two replacements within one second keep both
            n += 1
            target = root / ".replaced" / f"{folder.name}-{stamp}-{n}"
        target.mkdir(parents=True)
        for path in produced:
            path.rename(target / path.name)


def final_evaluation(stage: Stage) -> dict:
    """The last task evaluation the final stage logged, in the shape `tinylm eval --json` prints."""
    path = stage.out / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    evals = [r["eval"] for r in rows if "eval" in r]
    return evals[-1] if evals else {}


def run_stages(recipe: Recipe, root: Path) -> list[Stage]:
    """The recipe's stages; a recipe without any is one `pretrain` stage, in a folder like any other."""
    if recipe.stages:
        return resolve_stages(recipe, root)
    return [Stage("pretrain", 0, "lm", recipe, root / "pretrain", None)]


def run(recipe: Recipe, backend, out: str | Path | None = None, from_stage: str | None = None,
        only: str | None = None, reporter=None) -> dict:
    """Run the recipe's stages that need it; returns {stage: status} for the report."""
    root = Path(out or recipe.train.out)
    stages = run_stages(recipe, root)
    plan(stages, from_stage, only)  # names checked before anything is written
    # One writer at a time: a second run would set aside the first one's live stage folder.
    with FolderLock(root, "run folder"):
        return _run_locked(recipe, backend, root, stages, from_stage, only, reporter)


def _run_locked(recipe: Recipe, backend, root: Path, stages: list[Stage], from_stage: str | None,
                only: str | None, reporter) -> dict:
    from tinylm.report import write_report
    from tinylm.stages import build_trainer

    steps = plan(stages, from_stage, only)  # again, now that no other writer can change the folder
    claim_directory(recipe, root)
    say = reporter.say if reporter is not None else (lambda text: None)
    for stage, fp, action in steps:
        if action == "skip":
            say(f"stage {stage.name}: up to date, skipped")
            continue
        with FolderLock(stage.out, "stage folder"):  # `tinylm train --out` on a stage folder is a writer too
            if action == "start":
                _set_aside(stage.out, root)
            say(f"stage {stage.name} ({stage.objective}): {'resuming' if action == 'resume' else 'starting'} "
                f"-> {stage.out}")
            status = {"fingerprint": fp, "done": False, "objective": stage.objective}
            atomic_write_json(stage.out / STAGE_FILE, status)
            t0 = time.time()
            trainer = build_trainer(stage, backend, resume=action == "resume", reporter=reporter)
            summary = trainer.fit()
        status.update(done=True, seconds=round(time.time() - t0, 1), steps=trainer.step,
                      tokens=trainer.step * trainer.data.tokens_per_step, summary=summary)
        atomic_write_json(stage.out / STAGE_FILE, status)
        loss = summary.get("loss")
        say(f"stage {stage.name}: done in {status['seconds']:.0f} s, {status['tokens']:,} tokens"
            + (f", final loss {loss:.4f}" if loss is not None else ""))
    results = final_evaluation(stages[-1])
    atomic_write_json(root / "eval.json", results)
    report = write_report(recipe, stages, root)
    say(f"report: {report}")
    return results
