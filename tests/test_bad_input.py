"""Bad input through the real command line: exit code 2, one `error:` line, no traceback, nothing saved lost.

Every case runs `python -m tinylm` in a fresh process, as a user would. Add a case whenever a command or an
option lands.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from helpers_eval import make_checkpoint
from test_trainer import _recipe as train_recipe

from tinylm.train import checkpoint
from tinylm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli_command(args) -> list[str]:
    return [sys.executable, "-m", "tinylm", *map(str, args)]


def cli_env() -> dict:
    """This checkout first on the path, whether it is installed or not."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def run_cli(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)


def tree_digest(*roots: Path) -> dict[str, str]:
    """Checksum of every file under `roots` but mixture.json, a cache that every run rewrites for its length."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and path.name != "mixture.json":
                out[str(path)] = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return out


def unwritable(tmp: Path) -> Path:
    """A folder path that cannot be created: root may write anywhere but /sys."""
    if os.geteuid() == 0:
        return Path("/sys/tinylm-unwritable/out")
    locked = tmp / "unwritable"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o500)
    return locked / "out"


@dataclass
class World:
    """What was saved before the bad commands: a trained run, a checkpoint, its export, their recipes."""

    tmp: Path
    recipe: Path
    run: Path
    ckpt: Path
    hf: Path
    data: Path

    def saved(self) -> list[Path]:
        return [self.run, self.ckpt.parent.parent, self.hf, self.data]


@pytest.fixture(scope="module")
def world(tmp_path_factory, prepared):
    from tinylm.interop.hf import export_hf

    tmp = tmp_path_factory.mktemp("bad-input")
    recipe = train_recipe(tmp, prepared, steps=4)
    run = tmp / "run"
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(run), "--quiet"]) == 0
    ckpt = make_checkpoint(tmp / "ckpt-run")
    return World(tmp, recipe, run, ckpt, export_hf(ckpt, tmp / "hf"), prepared)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def copy_ckpt(w: World, tmp: Path) -> Path:
    return Path(shutil.copytree(w.ckpt, tmp / "ckpt-copy"))


def damaged_state(w: World, tmp: Path, content: bytes) -> Path:
    ckpt = copy_ckpt(w, tmp)
    (ckpt / "state.json").write_bytes(content)
    return ckpt


def state_with_text_dim(w: World, tmp: Path) -> Path:
    meta = json.loads((w.ckpt / "state.json").read_text())
    meta["model"]["dim"] = "abc"
    return damaged_state(w, tmp, json.dumps(meta).encode())


def truncated(w: World, tmp: Path) -> Path:
    ckpt = copy_ckpt(w, tmp)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    return ckpt


def text_source_recipe(tmp: Path, source: str, extra: str = "") -> Path:
    return write(tmp / "src.toml", f'[model]\npreset = "micro"\n[train]\nseq_len = 32\nbatch_size = 2\n'
                                   f'[data]\ndir = "{tmp / "data"}"\nworkers = 1\n[data.tokenizer]\nvocab_size = 300\n'
                                   f'[[data.sources]]\nname = "docs"\n{source}\n{extra}')


def missing_source(w: World, tmp: Path) -> Path:
    return text_source_recipe(tmp, f'type = "text"\npath = "{tmp / "no-such-book.txt"}"')


def malformed_jsonl(w: World, tmp: Path) -> Path:
    lines = '{"text": "a first document of a few words"}\n{"text": "broken\n'
    return text_source_recipe(tmp, f'type = "jsonl"\npath = "{write(tmp / "docs.jsonl", lines)}"')


def held_out_unlabelled(w: World, tmp: Path) -> Path:
    rows = '{"text": "a first labelled row", "label": "a"}\n{"text": "a row with no label"}\n'
    book = write(tmp / "book.txt", "A book of a few words.\n\nAnd a second paragraph of it.\n")
    return text_source_recipe(tmp, f'type = "text"\npath = "{book}"\nheld_out = "{write(tmp / "task.jsonl", rows)}"')


def no_validation_split(w: World, tmp: Path) -> Path:
    story = " ".join(f"river{i % 89} stone {i}" for i in range(300))  # one document, no repeated phrases
    return text_source_recipe(tmp, f'type = "text"\npath = "{write(tmp / "one.txt", story)}"')


def staged(w: World, tmp: Path, stages: str) -> Path:
    """The world's recipe with `[[stages]]` appended."""
    return write(tmp / "staged.toml", w.recipe.read_text() + "\n" + stages)


SFT_STAGE = '[[stages]]\nname = "sft"\nobjective = "sft"\n[[stages.sft.sources]]\nname = "c"\ntype = "synthetic"\n' \
            'generator = "comparison"\nnum_docs = 20\n'


def assert_newest_checkpoint_is_finite(w: World, tmp: Path) -> None:
    if checkpoint.list_steps(tmp / "div"):
        params = checkpoint.load(tmp / "div").params
        assert all(np.isfinite(v).all() for v in params.values())


def assert_absent(name: str) -> Callable[[World, Path], None]:
    def check(w: World, tmp: Path) -> None:
        assert not (tmp / name).exists(), f"{name} was written by a command that failed"
    return check


def hf_copy(w: World, tmp: Path, weights: bytes | None = None, **config) -> Path:
    """The world's export with `model.safetensors` replaced by `weights` and `config` merged into its config."""
    folder = Path(shutil.copytree(w.hf, tmp / "hf-copy"))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    return folder


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 429184\n"


def prepared_copy(w: World, tmp: Path, name: str, content: str | bytes) -> Path:
    """A copy of the world's prepared data with file `name` rewritten (or cut to its first third for b"")."""
    folder = Path(shutil.copytree(w.data, tmp / "data-copy"))
    target = folder / name
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 3] if content == b"" else
                       content if isinstance(content, bytes) else content.encode())
    return folder


def utf16_task(w: World, tmp: Path) -> Path:
    return write(tmp / "mine.jsonl", (json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n").encode("utf-16"))


@dataclass
class Case:
    id: str
    argv: Callable[[World, Path], list]
    needle: str
    """Text the error line must contain: the cause, the option, the file or the setting."""
    check: Callable[[World, Path], None] = field(default=lambda w, tmp: None)
    slow: bool = False
    """Cases that train or load a backend before they fail; the fast suite runs the rest."""


def _train(w: World, tmp: Path, *more) -> list:
    return ["train", w.recipe, "--backend", "torch", "--quiet", *more]


CASES = [
    # Command-line usage errors, whichever copy of click raises them.
    Case("eval_limit_0", lambda w, t: ["eval", w.ckpt, "--tasks", "arithmetic", "--limit", "0"], "--limit"),
    Case("max_tokens_0", lambda w, t: ["generate", w.ckpt, "--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
    Case("temperature_negative", lambda w, t: ["generate", w.ckpt, "--prompt", "x", "--temperature", "-1"],
         "--temperature"),
    Case("top_p_2", lambda w, t: ["generate", w.ckpt, "--prompt", "x", "--top-p", "2"], "--top-p"),
    Case("max_tokens_word", lambda w, t: ["generate", w.ckpt, "--prompt", "x", "--max-tokens", "abc"],
         "--max-tokens"),
    Case("unknown_option", lambda w, t: ["train", w.recipe, "--bogus"], "--bogus"),
    Case("missing_option", lambda w, t: ["eval", w.ckpt], "--tasks"),
    Case("train_without_arguments", lambda w, t: ["train"], "RECIPE"),
    Case("unknown_command", lambda w, t: ["trian", w.recipe], "trian"),
    # Recipes.
    Case("missing_recipe", lambda w, t: ["info", t / "nope.toml"], "nope.toml"),
    Case("malformed_recipe", lambda w, t: ["info", write(t / "bad.toml", "[train\nsteps = 3\n")], "bad.toml"),
    Case("binary_recipe", lambda w, t: ["info", write(t / "bin.toml", b"\xff\xfe\x00[train]")], "bin.toml"),
    Case("unknown_key", lambda w, t: ["info", write(t / "r.toml", "[train]\nstepz = 3\n")], "train.stepz"),
    Case("wrong_type", lambda w, t: ["info", write(t / "r.toml", "[train]\nsteps = 'many'\n")], "train.steps"),
    Case("unknown_set_key", lambda w, t: ["info", w.recipe, "--set", "foo.bar=1"], "--set foo.bar=1"),
    Case("ckpt_every_0", lambda w, t: _train(w, t, "--out", t / "new", "--set", "train.ckpt_every=0"),
         "--set train.ckpt_every=0", assert_absent("new")),
    Case("eval_rows_0", lambda w, t: _train(w, t, "--out", t / "new", "--set", "train.eval_every=2",
                                            "--set", "train.eval_rows=0"), "train.eval_rows", assert_absent("new")),
    Case("nan_lr", lambda w, t: ["info", w.recipe, "--set", "optim.lr=nan"], "optim.lr"),
    Case("negative_seed", lambda w, t: ["info", w.recipe, "--set", "train.seed=-1"], "train.seed"),
    Case("negative_loss_chunk", lambda w, t: ["info", w.recipe, "--set", "train.loss_chunk=-1"], "train.loss_chunk"),
    Case("unknown_dtype", lambda w, t: _train(w, t, "--out", t / "new", "--set", "train.dtype=fp8"),
         "train.dtype must be one of float32, bfloat16, float16, auto", assert_absent("new")),
    Case("info_seq_len_over_max", lambda w, t: ["info", w.recipe, "--set", "train.seq_len=100000"], "max_seq_len"),
    Case("unknown_preset", lambda w, t: ["info", w.recipe, "--set", "model.preset=huge"], "huge"),
    Case("unknown_backend", lambda w, t: _train(w, t, "--out", t / "new", "--backend", "tpu"), "tpu",
         assert_absent("new")),
    Case("shard_params_on_mlx", lambda w, t: ["train", w.recipe, "--backend", "mlx", "--quiet", "--out", t / "new",
                                              "--set", "train.shard_params=true"], "the mlx backend cannot shard",
         assert_absent("new/checkpoints"), slow=True),
    Case("shard_params_compiled", lambda w, t: _train(w, t, "--out", t / "new", "--set", "train.shard_params=true",
                                                      "--set", "train.compile=true"), "train.compile",
         assert_absent("new/checkpoints"), slow=True),
    # Data.
    Case("missing_data", lambda w, t: ["data", "prepare", missing_source(w, t)], "no-such-book.txt"),
    Case("malformed_jsonl_line", lambda w, t: ["data", "prepare", malformed_jsonl(w, t)], "docs.jsonl line 2"),
    Case("held_out_task_without_label", lambda w, t: ["data", "prepare", held_out_unlabelled(w, t)],
         "task.jsonl' line 2 has no 'label' field"),
    Case("no_validation_documents", lambda w, t: ["train", no_validation_split(w, t), "--backend", "torch",
                                                  "--out", t / "new", "--quiet"], "validation",
         assert_absent("new/checkpoints"), slow=True),
    # Checkpoints and runs.
    Case("missing_checkpoint", lambda w, t: ["generate", t / "nowhere", "--prompt", "x"], "nowhere"),
    Case("truncated_safetensors", lambda w, t: ["generate", truncated(w, t), "--prompt", "x"], "model.safetensors"),
    Case("state_json_text_dim", lambda w, t: ["generate", state_with_text_dim(w, t), "--prompt", "x"],
         "model.dim"),
    Case("state_json_binary", lambda w, t: ["generate", damaged_state(w, t, b"\x80\xff\x00\x01"), "--prompt", "x"],
         "state.json"),
    Case("wrong_shape_resume", lambda w, t: _train(w, t, "--out", w.run, "--resume", "--set", "model.dim=128",
                                                   "--set", "train.steps=8"), "shape", slow=True),
    Case("run_exists_without_resume", lambda w, t: _train(w, t, "--out", w.run), "--resume", slow=True),
    Case("diverging_run", lambda w, t: _train(w, t, "--out", t / "div", "--set", "optim.lr=1e6",
                                              "--set", "train.ckpt_every=1", "--set", "train.keep_checkpoints=1",
                                              "--set", "train.steps=30"), "diverged",
         assert_newest_checkpoint_is_finite),
    # Evaluation and interop.
    Case("unknown_task", lambda w, t: ["eval", w.ckpt, "--tasks", "mmlu_pro_max"], "mmlu_pro_max"),
    Case("unknown_export_format", lambda w, t: ["export", w.ckpt, "--to", "onnx", t / "x"], "onnx",
         assert_absent("x")),
    Case("export_into_non_empty", lambda w, t: ["export", w.ckpt, "--to", "hf", w.hf], "--force"),
    Case("import_into_existing_run", lambda w, t: ["import", w.hf, "--out", w.run], "--force"),
    Case("import_unsupported_arch", lambda w, t: ["import", write(t / "hf" / "config.json", json.dumps(
        {"architectures": ["MambaForCausalLM"]})).parent, "--out", t / "o"], "MambaForCausalLM", assert_absent("o")),
    # The filesystem.
    Case("out_is_a_file", lambda w, t: _train(w, t, "--out", write(t / "file", "x")), "a file is where a folder",
         slow=True),
    Case("out_unwritable", lambda w, t: _train(w, t, "--out", unwritable(t)), "unwritable", slow=True),
    Case("export_unwritable", lambda w, t: ["export", w.ckpt, "--to", "hf", unwritable(t)], "unwritable"),
    Case("import_unwritable", lambda w, t: ["import", w.hf, "--out", unwritable(t)], "unwritable"),
    Case("eval_output_unwritable", lambda w, t: ["eval", w.ckpt, "--tasks", "arithmetic", "--limit", "1",
                                                 "--max-tokens", "2", "--output", unwritable(t) / "r.json"],
         "unwritable", slow=True),
    # Stages, SFT and the runner.
    Case("unknown_stage", lambda w, t: _train(w, t, "--out", t / "new", "--stage", "rl"), "unknown stage 'rl'"),
    Case("run_only_unknown_stage", lambda w, t: ["run", w.recipe, "--out", t / "new", "--only", "rl"],
         "unknown stage 'rl'", check=assert_absent("new"), slow=True),
    Case("set_unknown_stage", lambda w, t: ["info", staged(w, t, SFT_STAGE), "--set", "stages.rl.optim.lr=1"],
         "no entry named 'rl'"),
    Case("unknown_objective", lambda w, t: ["info", staged(w, t, '[[stages]]\nname = "x"\nobjective = "ppo"\n')],
         "ppo"),
    Case("unknown_key_in_stage", lambda w, t: ["info", staged(w, t, '[[stages]]\nname = "x"\n[stages.train]\n'
                                                                 'stepz = 3\n')], "train.stepz"),
    Case("sft_without_weights", lambda w, t: ["train", staged(w, t, SFT_STAGE), "--backend", "torch", "--quiet",
                                              "--out", t / "new"], "no weights to start from", slow=True),
    Case("task_file_without_answer", lambda w, t: ["eval", w.ckpt, "--tasks", write(t / "mine.jsonl", json.dumps(
        {"prompt": "What is 1 + 1?"}) + "\n")], "mine.jsonl:1", slow=True),
    # Damaged files a user really has: a clone without git-lfs, a broken config, a half-copied data folder.
    Case("import_git_lfs_pointer", lambda w, t: ["import", hf_copy(w, t, LFS_POINTER), "--out", t / "o"],
         "model.safetensors is a git-lfs pointer", assert_absent("o")),
    Case("import_random_bytes", lambda w, t: ["import", hf_copy(w, t, np.random.default_rng(0).bytes(4096)),
                                              "--out", t / "o"], "model.safetensors is not a safetensors file",
         assert_absent("o")),
    Case("import_zero_heads", lambda w, t: ["import", hf_copy(w, t, num_attention_heads=0), "--out", t / "o"],
         "num_attention_heads must be a positive integer", assert_absent("o")),
    Case("import_null_rms_norm_eps", lambda w, t: ["import", hf_copy(w, t, rms_norm_eps=None), "--out", t / "o"],
         "rms_norm_eps must be a positive number", assert_absent("o")),
    Case("manifest_is_a_list", lambda w, t: ["info", w.recipe, "--set", f"data.dir={prepared_copy(w, t, 'manifest.json', '[]')}"],
         "manifest.json is damaged"),
    Case("manifest_without_vocab_size", lambda w, t: ["info", w.recipe, "--set", "data.dir=" + str(prepared_copy(
        w, t, "manifest.json", '{"sources": {}}'))], "has no `vocab_size`"),
    Case("truncated_prepared_tokenizer", lambda w, t: _train(w, t, "--out", t / "new", "--set", "data.dir=" + str(
        prepared_copy(w, t, "tokenizer.json", b""))), "tokenizer.json is not a tokenizer.json",
         assert_absent("new"), slow=True),
    Case("utf16_task_file", lambda w, t: ["eval", w.ckpt, "--tasks", utf16_task(w, t)], "mine.jsonl is not UTF-8"),
    Case("eval_output_is_a_folder", lambda w, t: ["eval", w.ckpt, "--tasks", "arithmetic", "--output", t],
         "is a folder"),
    Case("data_dir_unwritable", lambda w, t: ["data", "prepare", w.recipe, "--set", f"data.dir={unwritable(t)}"],
         "unwritable"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(world, tmp_path, case):
    argv = case.argv(world, tmp_path)
    before = tree_digest(*world.saved())
    result = run_cli(argv, cwd=tmp_path)
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert "Traceback" not in result.stderr
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert case.needle in err, err
    assert tree_digest(*world.saved()) == before, "a failed command changed what was saved before"
    case.check(world, tmp_path)


def test_chat_with_standard_input_closed_ends_cleanly(world, tmp_path):
    result = subprocess.run(cli_command(["chat", world.ckpt]), cwd=tmp_path, env=cli_env(), capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "standard input is closed" in result.stderr
