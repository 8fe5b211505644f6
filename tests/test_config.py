import pytest

from tinylm import recipe as recipes
from tinylm.cli import main
from tinylm.errors import UserError


def _write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    path = _write(tmp_path, '[model]\npreset = "micro"\n[train]\nsteps = 7\nseq_len = 32\n')
    r = recipes.load(path, ["train.steps=20", "optim.lr=1e-3", "optim.name=muon"])
    assert r.train.steps == 20 and r.train.seq_len == 32 and r.train.batch_size == 8
    assert r.optim.lr == 1e-3 and r.optim.name == "muon" and r.model.preset == "micro"
    assert r.train.dtype == "float32"  # "auto" only where a recipe asks for it: tests stay exact fp32
    assert recipes.load(path, ["train.dtype=auto"]).train.dtype == "auto"


@pytest.mark.parametrize(
    "text, overrides, needle, blamed",
    [
        ("[train]\nstepz = 3\n", [], "train.stepz", "file"),
        ("[train]\nsteps = 'many'\n", [], "train.steps", "file"),
        ("[model]\npreset = 3\n", [], "model.preset", "file"),
        ("", ["optim.lr=fast"], "optim.lr", "--set optim.lr=fast"),
        ("", ["nosuch.key=1"], "nosuch", "--set nosuch.key=1"),
        ("[train]\nsteps = 0\n", [], "train.steps", "file"),
        ("[train]\nsteps = 5\n", ["train.ckpt_every=0"], "train.ckpt_every", "--set train.ckpt_every=0"),
        ("[optim]\nlr = nan\n", [], "optim.lr", "file"),
        ("[train]\ndtype = \"fp8\"\n", [], "train.dtype", "file"),
        ("", ["train.dtype=bf16"], "train.dtype", "--set train.dtype=bf16"),
    ],
)
def test_bad_keys_and_types_name_the_key_and_its_origin(tmp_path, text, overrides, needle, blamed):
    """A value from the file names the file; a value from `--set` names the flag."""
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        recipes.load(path, overrides)
    assert needle in str(e.value)
    assert str(e.value).startswith(str(path) if blamed == "file" else blamed)


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.toml" in err and "\n" not in err and "Traceback" not in err
    path = _write(tmp_path, "[train]\nbogus = 1\n")
    assert main(["train", str(path), "--backend", "torch"]) == 2
    assert "train.bogus" in capsys.readouterr().err


def test_info_json_reports_params_and_flops(tmp_path, capsys):
    import json

    path = _write(tmp_path, '[model]\npreset = "micro"\n')
    assert main(["info", str(path), "--set", "model.preset=mobilellm-125m", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["params"] - 124.6e6) < 0.2e6
    assert report["flops_per_token"] > 6 * 100e6


def test_set_enters_a_list_of_tables_by_name_or_index(tmp_path):
    path = _write(tmp_path, '[[data.sources]]\nname = "a"\npath = "a.txt"\n[[data.sources]]\nname = "b"\npath = "b.txt"\n')
    r = recipes.load(path, ["data.sources.b.path=other.txt", "data.sources.0.chunk_chars=500"])
    assert [(s.name, s.path, s.chunk_chars) for s in r.data.sources] == [("a", "a.txt", 500), ("b", "other.txt", 0)]
    for bad, needle in [("data.sources.c.path=x", "names: a, b"), ("data.sources.path=x", "is a list")]:
        with pytest.raises(UserError, match=needle):
            recipes.load(path, [bad])
