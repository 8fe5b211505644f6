"""The documentation against the code: generated pages up to date, and every shell command shown in README.md
and docs/*.md either run here (on a small model, with small limits) or marked `# not run by the docs test:
<reason>`. Marked commands are still checked against the command line, so a renamed command or option fails."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_eval import make_checkpoint  # noqa: E402

from tinylm.cli import app, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKER = "# not run by the docs test:"
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# Limits that keep a documented command cheap on the test's small random model.
SMALL = {"--limit": "2", "--max-tokens": "8", "--samples": "2"}
GENERATES = {"eval", "generate"}
# The README's first two lines stay exactly as they are, unmarked: `make test` is this suite itself, and the
# quickstart's recipe trains in tests/test_recipes.py.
HEADLINE = {"make quickstart", "make test"}


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shell_commands(text: str) -> list[tuple[str, str | None]]:
    """(command, reason it is not run or None) for each command of each ```bash block, continuations joined."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # shlex drops the comment but keeps a `#` inside quotes
            command = shlex.join(shlex.split(line, comments=True))
            reason = line.rsplit(MARKER, 1)[1].strip() if MARKER in line else None
            out.append((command, reason))
    return out


def tinylm_argv(command: str) -> list[str] | None:
    """The arguments a command line hands to tinylm (after `tinylm`, `-m tinylm` or `python -m tinylm`)."""
    words = shlex.split(command)
    if words and words[0] == "tinylm":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "tinylm":
            return words[i + 2:]
    return None


def check_against_cli(argv: list[str]) -> str:
    """Walk the typer app along `argv`: every subcommand and option must exist. Returns the command's path."""
    command = typer.main.get_command(app)
    path = []
    words = list(argv)
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        name = words.pop(0)
        assert name in command.commands, f"`tinylm {' '.join(path + [name])}`: no such command"
        command, path = command.commands[name], path + [name]
    assert not hasattr(command, "commands"), f"`tinylm {' '.join(path)}` needs a subcommand"
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    for word in words:
        if word.startswith("-"):
            assert word.split("=")[0] in options, f"`tinylm {' '.join(path)}` has no option {word}"
    return " ".join(path)


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(encoding="utf-8"), flags=re.M))


def test_generated_pages_are_current():
    assert _gen_docs().stale() == [], "a generated page is out of date: run `make docs`"


def test_a_changed_docstring_makes_the_page_stale(monkeypatch):
    gen = _gen_docs()
    real = gen.field_docs
    monkeypatch.setattr(gen, "field_docs", lambda cls: {k: v + " (changed)" for k, v in real(cls).items()})
    assert gen.CONFIG_PAGE in gen.stale()


def test_config_page_covers_every_train_key():
    from tinylm.recipe import TrainConfig

    page = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` |" in page


def test_a_renamed_option_or_command_fails_the_check():
    assert check_against_cli(["eval", "CKPT", "--tasks", "arithmetic"]) == "eval"
    with pytest.raises(AssertionError, match="no option --taskz"):
        check_against_cli(["eval", "CKPT", "--taskz", "arithmetic"])
    with pytest.raises(AssertionError, match="no such command"):
        check_against_cli(["evaluate", "CKPT"])
    assert shell_commands("```bash\ntinylm run r.toml  # not run by the docs test: slow\n```") == [
        ("tinylm run r.toml", "slow")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_on_the_page_is_checked_and_the_cheap_ones_run(page, tmp_path, monkeypatch, capsys):
    commands = shell_commands(page.read_text(encoding="utf-8"))
    monkeypatch.chdir(ROOT)
    paths: dict[str, str] = {}  # run directories named on the page -> this test's stand-ins

    def stand_in(word: str) -> str:
        if not word.startswith("runs/"):
            return word
        if word not in paths:
            # The first run directory a page reads from is a checkpoint; the others are folders it writes.
            paths[word] = str(make_checkpoint(tmp_path / "run")) if not paths else str(tmp_path / word.replace("/", "_"))
        return paths[word]

    for command, reason in commands:
        argv = tinylm_argv(command)
        words = shlex.split(command)
        if argv is not None:
            name = check_against_cli(argv)
        elif words[0] == "make":
            targets = {w for w in words[1:] if "=" not in w}
            assert targets <= make_targets(), f"{page.name}: `{command}` names a missing make target"
        elif words[0] in ("python", "python3") and len(words) > 2 and words[1] == "-m":
            assert importlib.util.find_spec(words[2]), f"{page.name}: `{command}`: no module {words[2]}"
        elif words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"{page.name}: `{command}`: no script {words[1]}"
        if reason is not None or command in HEADLINE:
            assert reason != "", f"{page.name}: `{command}` is marked not run without a reason"
            continue
        if words[0] in ("python", "python3") and words[1] == "-c":
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            done = subprocess.run([sys.executable, "-c", words[2]], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, f"{page.name}: `{command}` failed: {done.stderr[-2000:]}"
            continue
        assert argv is not None, f"{page.name}: `{command}` is neither a tinylm command run here nor marked `{MARKER}`"
        argv = [stand_in(w) for w in argv]
        for i, word in enumerate(argv[:-1]):
            if word in SMALL:
                argv[i + 1] = SMALL[word]
        if name in GENERATES and "--max-tokens" not in argv:
            argv += ["--max-tokens", SMALL["--max-tokens"]]
        assert main(argv) == 0, f"{page.name}: `{command}` failed: {capsys.readouterr().err}"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_curve_draws_each_stage_in_the_recipes_order(tmp_path, monkeypatch):
    import json

    plot_loss = _script("plot_loss")
    run = tmp_path / "run"
    for stage, start in (("sft", 2.0), ("pretrain", 8.0)):  # written out of order on purpose
        (run / stage).mkdir(parents=True)
        rows = [{"step": s, "loss": start - s / 10} for s in range(1, 6)] + [{"step": 5, "val_loss": start}]
        (run / stage / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    (run / "run.json").write_text(json.dumps({"recipe": "quickstart", "source": "recipes/quickstart.toml"}))
    monkeypatch.chdir(ROOT)
    assert [d.name for d in plot_loss.stage_dirs(run)] == ["pretrain", "sft"]
    out = plot_loss.plot(run, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no training losses"):
        plot_loss.plot(tmp_path / "empty", tmp_path / "none.png")


def test_pipeline_diagram_draws_every_step(tmp_path):
    draw = _script("draw_pipeline")
    out = draw.draw(tmp_path / "pipeline.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (ROOT / "docs" / "img" / "pipeline.png").is_file()
    assert draw.QUICKSTART <= {title for title, _, _ in draw.STEPS}
