"""lm-evaluation-harness on an exported model agrees with `tinylm eval` on the same local examples."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_eval import make_checkpoint  # noqa: E402

from tinylm.eval import harness  # noqa: E402
from tinylm.eval.tasks import load_task  # noqa: E402
from tinylm.generate import load_model  # noqa: E402
from tinylm.interop.hf import export_hf  # noqa: E402

ROWS = [
    {"context": "The cat sat on the", "choices": ["mat", "dog and looked at the sun"], "label": 0},
    {"context": "Birds can", "choices": ["fly", "swim", "walk every day"], "label": 2},
    {"context": "The sun rises in the", "choices": ["east", "west"], "label": 1},
    {"context": "One, two,", "choices": ["three", "five", "cat"], "label": 0},
    {"context": "Question: What is 12 plus 7?\nAnswer:", "choices": ["19", "21", "nineteen"], "label": 0},
    {"context": "People can ", "choices": ["walk", "fly to the moon"], "label": 1},
]

TASK_YAML = """task: tinylm_parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_lm_eval_hf_matches_tinylm_eval(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lm_eval.tasks import TaskManager

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ckpt = make_checkpoint(tmp_path / "run", seed=1)
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tinylm_parity.yaml").write_text(TASK_YAML.format(path=data))

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
                                  tasks=["tinylm_parity"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  batch_size=1, device="cpu", log_samples=True)
    theirs = out["results"]["tinylm_parity"]

    lm, tok, ck = load_model(ckpt, "torch")
    task = load_task(f"mc:{data}")
    ours = harness.run_tasks(lm, tok, [task], ck.meta)["mc"]["metrics"]
    assert ours["acc"] == pytest.approx(theirs["acc,none"])
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"])

    # The agreement is per choice, not by luck of the argmax: the log-likelihoods themselves match.
    scorer = harness.Scorer(lm, tok, ck.meta)
    for sample in sorted(out["samples"]["tinylm_parity"], key=lambda s: s["doc_id"]):
        ex = task.examples[sample["doc_id"]]
        mine = scorer.loglikelihoods([scorer.split_pair(ex.context, " " + c) for c in ex.choices])
        np.testing.assert_allclose([r[0][0] for r in sample["resps"]], mine, atol=1e-3)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
