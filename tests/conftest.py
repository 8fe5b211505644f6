import importlib.util
import os
from pathlib import Path

import pytest

# fp32 reference math on CPU: keep thread counts fixed so runs are bit-for-bit repeatable.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The MLX backend loads the BLAS that mlx binds when it is first imported: before any test module imports
# mlx.core itself, or every MLX test in the process would run on the Linux wheel's reference BLAS.
if importlib.util.find_spec("mlx") is not None:
    import tinylm.backends.mlx  # noqa: F401

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_toml(root) -> str:
    """The `[data]` section of the test recipes: two small built-in synthetic sources, a 512-token BPE."""
    return f"""
[data]
dir = "{root}"
val_fraction = 0.05
[data.tokenizer]
vocab_size = 512
[[data.sources]]
name = "arithmetic"
type = "synthetic"
generator = "arithmetic"
num_docs = 300
[[data.sources]]
name = "stories"
type = "synthetic"
generator = "stories"
num_docs = 300
"""


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Prepared once per test session with the real pipeline; tests must not modify it."""
    from tinylm.config import read_toml
    from tinylm.recipe import Recipe
    from tinylm.config import from_dict
    from tinylm.data.prepare import prepare

    root = tmp_path_factory.mktemp("prepared") / "data"
    path = root.parent / "data.toml"
    path.write_text(data_toml(root))
    prepare(from_dict(Recipe, read_toml(path), str(path)).data, progress=False)
    return root
