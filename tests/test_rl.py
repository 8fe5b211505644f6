"""GRPO and DPO: advantages, weights and losses by hand, backend parity, grouped rollouts, bad input."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from helpers_eval import SHAPE, make_checkpoint  # noqa: E402
from tinylm import model  # noqa: E402
from tinylm.train import checkpoint  # noqa: E402
from tinylm.train import objectives  # noqa: E402
from tinylm.backends import get_backend  # noqa: E402
from tinylm.cli import main  # noqa: E402
from tinylm.train.optim import OptimConfig  # noqa: E402
from tinylm.post.rl import GroupedPrefill, group_advantages, token_weights  # noqa: E402
from tinylm.train.step import TrainModule  # noqa: E402


def test_group_advantages_by_hand():
    rewards = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 1.0, 1.0]]
    # Group means 0.5, 1 and 1; unbiased stds sqrt(1/3), 0 and sqrt(2/3).
    none = group_advantages(rewards, "none")
    np.testing.assert_allclose(none, [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [1, -1, 0, 0]])
    group = group_advantages(rewards, "group")
    s1, s3 = np.sqrt(1 / 3) + 1e-4, np.sqrt(2 / 3) + 1e-4
    np.testing.assert_allclose(group, [[0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1], [0, 0, 0, 0],
                                       [1 / s3, -1 / s3, 0, 0]])


MASK = np.array([[0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)  # 2, 1 and 0 (masked) completion tokens


@pytest.mark.parametrize("loss_type, want", [
    # grpo: 1 / (tokens of the row x rows); dr_grpo: 1 / (rows x max_completion_length 4); dapo: 1 / all tokens.
    ("grpo", [[0, 1 / 6, 1 / 6, 0], [0, 0, 1 / 3, 0], [0, 0, 0, 0]]),
    ("dr_grpo", [[0, 1 / 12, 1 / 12, 0], [0, 0, 1 / 12, 0], [0, 0, 0, 0]]),
    ("dapo", [[0, 1 / 3, 1 / 3, 0], [0, 0, 1 / 3, 0], [0, 0, 0, 0]]),
])
def test_token_weights_by_hand(loss_type, want):
    np.testing.assert_allclose(token_weights(MASK, loss_type, 4), want)


def _grpo_batch(scale_rewards, loss_type, seed=0):
    """Three rows of tokens with completion tokens in MASK, their rewards' advantages broadcast per row, and
    old log-probabilities nudged away from the current ones so that both sides of the clip are reached."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, SHAPE.vocab_size, (3, 5))
    adv = group_advantages([[1.0, 0.0, 0.0]], scale_rewards).reshape(3, 1).repeat(4, axis=1)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "advantages": adv.astype(np.float32),
            "weights": token_weights(MASK, loss_type, 4).astype(np.float32)}


def _current_logp(b, params, batch):
    return -b.to_numpy({"x": model.token_losses(b.ops, params, b.tokens(batch["inputs"]), b.tokens(batch["targets"]),
                                                 SHAPE)})["x"].astype(np.float64)


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_equals_hand_computed(loss_type, scale_rewards):
    b = get_backend("torch")
    params = b.from_numpy(model.init_params(SHAPE, 0))
    batch = _grpo_batch(scale_rewards, loss_type)
    logp = _current_logp(b, params, batch)
    # Ratios 1.5 (above 1 + 0.28), 0.5 (below 1 - 0.2) and 1.1 (inside) on the completion tokens.
    old = logp - np.log(np.array([[1, 1.5, 0.5, 1], [1, 1, 1.1, 1], [1, 1, 1, 1]]))
    ref = logp + 0.3
    batch.update(old_logprobs=old.astype(np.float32), ref_logprobs=ref.astype(np.float32))
    eps, eps_high, beta = 0.2, 0.28, 0.05
    got = b.item(objectives.grpo(eps, eps_high, beta)(b.ops, params, TrainModule(
        b, SHAPE, OptimConfig()).to_backend(batch), SHAPE))
    ratio = np.exp(logp - old)
    a = batch["advantages"].astype(np.float64)
    surrogate = np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps_high) * a)
    k3 = np.exp(0.3) - 0.3 - 1
    want = ((-surrogate + beta * k3) * batch["weights"]).sum()
    assert abs(got - want) < 1e-5 * max(1.0, abs(want)), (got, want)


def _dpo_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, SHAPE.vocab_size, (4, 6))  # 2 chosen rows, then their 2 rejected rows
    weights = np.zeros((4, 5), np.float32)
    weights[:, 2:] = 1.0
    weights[1, 4] = 0.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
            "ref_logps": np.array([-20.0, -21.0, -19.5, -22.0], np.float32),
            "pair_weights": np.array([0.5, 0.5], np.float32)}


def test_dpo_loss_equals_hand_computed():
    b = get_backend("torch")
    params = b.from_numpy(model.init_params(SHAPE, 0))
    batch = _dpo_batch()
    logps = (_current_logp(b, params, batch) * batch["weights"]).sum(axis=1)
    ratio = logps - batch["ref_logps"]
    z = 0.1 * (ratio[:2] - ratio[2:])
    want = np.mean(np.log1p(np.exp(-z)))
    got = b.item(objectives.dpo(0.1)(b.ops, params, TrainModule(b, SHAPE, OptimConfig()).to_backend(batch), SHAPE))
    assert abs(got - want) < 1e-5, (got, want)


@pytest.mark.parametrize("which", ["grpo", "dpo"])
def test_losses_and_gradients_agree_between_backends(which):
    pytest.importorskip("mlx.core")
    weights = model.init_params(SHAPE, 0)
    if which == "grpo":
        batch = _grpo_batch("group", "dapo", seed=1)
        logp = _current_logp(get_backend("torch"), get_backend("torch").from_numpy(weights), batch)
        batch["old_logprobs"] = (logp - np.log(np.linspace(0.6, 1.4, 12).reshape(3, 4))).astype(np.float32)
        batch["ref_logprobs"] = (logp + 0.2).astype(np.float32)
        objective = objectives.grpo(0.2, 0.28, 0.04)
    else:
        batch, objective = _dpo_batch(seed=1), objectives.dpo(0.1)
    out = {}
    for name in ("torch", "mlx"):
        b = get_backend(name)
        module = TrainModule(b, SHAPE, OptimConfig(), "float32", objective)
        loss, grads = module.loss_and_grads(b.from_numpy(weights), [batch])
        out[name] = b.item(loss), b.to_numpy(grads)
    (lt, gt), (lm, gm) = out["torch"], out["mlx"]
    assert abs(lt - lm) < 1e-4
    assert any(np.abs(g).max() > 1e-6 for g in gt.values())
    for k in gt:
        assert np.abs(gt[k] - gm[k]).max() < 1e-4, k


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grouped_prefill_draws_what_a_plain_batch_draws(tmp_path, temperature):
    from tinylm.generate import Model, SamplingConfig, generate_ids, load_model

    lm, tok, _ = load_model(make_checkpoint(tmp_path / "m"), "torch")
    prompts = [tok.encode("The cat sat").ids, tok.encode("Birds can fly, fish").ids]
    group = [p for p in prompts for _ in range(3)]
    cfg = SamplingConfig(max_tokens=6, temperature=temperature, seed=3)
    calls = []
    real_start = Model.start
    lm.start = lambda tokens, keep: calls.append(tokens.shape[0]) or real_start(lm, tokens, keep)
    grouped = generate_ids(GroupedPrefill(lm, 3), tok, group, cfg, pad_id=0)
    assert calls == [2]  # one prefill row per prompt, not per completion
    plain = generate_ids(Model(lm.backend, lm.shape, lm.params), tok, group, cfg, pad_id=0)
    assert [c.tokens for c in grouped] == [c.tokens for c in plain]
    if temperature:
        assert len({tuple(c.tokens) for c in grouped[:3]}) > 1  # a group's completions differ


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_rollout_old_logprobs_come_from_the_sampler(tmp_path, backend):
    from types import SimpleNamespace

    from tinylm.recipe import TrainConfig
    from tinylm.post.rl import GRPOConfig, RLData

    if backend == "mlx":
        pytest.importorskip("mlx.core")
    init = checkpoint.load(make_checkpoint(tmp_path / "m"), with_optimizer=False)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"What is {a} plus {a}?", "answer": str(2 * a)}) + "\n"
                             for a in (1, 23, 456)))
    cfg = GRPOConfig(tasks=[f"qa:{tasks}"], prompts_per_step=3, num_generations=3, max_completion_length=10,
                     temperature=0.7)
    data = RLData(cfg, init, TrainConfig(), 1)
    b = get_backend(backend)
    module = TrainModule(b, init.shape, OptimConfig(), "float32", objectives.grpo(0.2, 0.2, 0.0))
    full_pass, calls = module.token_losses, []
    module.token_losses = lambda *args: calls.append(1) or full_pass(*args)
    params = b.from_numpy(init.params)
    data.attach(SimpleNamespace(backend=b, shape=init.shape, module=module, params=params, dtype="float32"))
    batch, _ = data.rollout(params, 0)
    assert calls == []  # no second forward pass over the sampled rows
    on = batch["weights"] > 0
    assert on.sum() >= 9
    want = -full_pass(params, {"inputs": batch["inputs"], "targets": batch["targets"]})
    np.testing.assert_allclose(batch["old_logprobs"][on], want[on], atol=1e-4)
    # In a lower compute dtype the objective's own forward supplies them, so each batch's first ratio stays 1.
    data.trainer.dtype = "bfloat16"
    data.rollout(params, 0)
    assert calls == [1]


def _rl_recipe(tmp_path, init, grpo="", extra="", group=3):
    tasks = tmp_path / "tasks.jsonl"
    if not tasks.exists():
        tasks.write_text("".join(json.dumps({"prompt": f"What is {a} plus {a}?", "answer": str(2 * a)}) + "\n"
                                 for a in range(1, 9)))
    path = tmp_path / "rl.toml"
    path.write_text(f"""
[model]
preset = "micro"
[train]
steps = 4
log_every = 1
ckpt_every = 2
init_from = "{init}"
[optim]
lr = 1e-3
{extra}
[[stages]]
name = "rl"
objective = "grpo"
[stages.grpo]
tasks = ["qa:{tasks}"]
prompts_per_step = 2
num_generations = {group}
max_completion_length = 6
{grpo}
""")
    return path


def test_rl_stage_runs_and_logs_its_metrics(tmp_path):
    init = make_checkpoint(tmp_path / "init")
    out = tmp_path / "run"
    recipe = _rl_recipe(tmp_path, init, grpo="beta = 0.04\nnum_iterations = 2\nloss_type = \"grpo\"")
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(ln) for ln in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for key in ("reward", "accuracy", "zero_std_groups", "completion_length", "clip_fraction", "kl"):
            assert key in r and np.isfinite(r[key]), key
    # The first step of each rollout batch runs on the weights that sampled it: ratio 1, nothing clipped, and
    # the KL to the starting weights is 0 on the very first step.
    assert steps[0]["clip_fraction"] == 0.0 and abs(steps[0]["kl"]) < 1e-6 and steps[2]["clip_fraction"] == 0.0
    assert steps[1]["kl"] > 0
    assert [c.name for c in sorted((out / "rl" / "checkpoints").iterdir())]
    assert checkpoint.load(out / "rl").step == 4


def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_rl_and_preference_input_is_one_line(tmp_path, capsys):
    init = make_checkpoint(tmp_path / "init")
    out = tmp_path / "run"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    # A group of one.
    recipe = _rl_recipe(tmp_path, init, group=1)
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert "rl.toml" in err and "num_generations must be at least 2" in err
    # An RL task file whose second record has no answer.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1 + 1?", "answer": "2"}) + "\n" + json.dumps({"prompt": "2 + 2?"}) + "\n")
    recipe.write_text(recipe.read_text().replace("num_generations = 1", "num_generations = 2").replace(str(tmp_path / "tasks.jsonl"),
                                                                                   str(bad)))
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert "bad.jsonl:2" in err and "answer" in err
    # num_iterations that checkpoints would split.
    good = _rl_recipe(tmp_path, init, grpo="num_iterations = 3")
    assert main(["train", str(good), "--backend", "torch", "--out", str(out), "--quiet"]) == 2
    assert "grpo.num_iterations" in _one_error_line(capsys)
    # A preference file whose second pair has no rejected response.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Name a bird.", "chosen": "A robin.", "rejected": "A fish."}) + "\n" +
                     json.dumps({"prompt": "Name a fish.", "chosen": "A trout."}) + "\n")
    dpo = tmp_path / "dpo.toml"
    dpo.write_text(f'[train]\ninit_from = "{init}"\n[[stages]]\nname = "dpo"\nobjective = "dpo"\n'
                   f'[stages.dpo]\npath = "{pairs}"\n')
    assert main(["train", str(dpo), "--backend", "torch", "--out", str(out), "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert "pairs.jsonl:2" in err and "rejected" in err
    after = sorted(p.name for p in tmp_path.rglob("*"))
    assert not out.exists() and set(after) - set(before) <= {"rl.toml", "bad.jsonl", "pairs.jsonl", "dpo.toml",
                                                               "tasks.jsonl"}


def _pairs_file(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} plus {a}?", "chosen": f"{a} + {a} = {2 * a}\n#### {2 * a}",
             "rejected": f"{a} + {a} = {2 * a + 1}\n#### {2 * a + 1}"} for a in range(1, 9)]
    rows.append({"chosen": [{"role": "user", "content": "Name a bird."}, {"role": "assistant", "content": "A robin."}],
                 "rejected": [{"role": "user", "content": "Name a bird."}, {"role": "assistant", "content": "A fish."}]})
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pairs


def test_dpo_stage_widens_the_reward_margin(tmp_path):
    init = make_checkpoint(tmp_path / "init")
    recipe = tmp_path / "dpo.toml"
    recipe.write_text(f'[train]\ninit_from = "{init}"\nlog_every = 1\nseq_len = 48\n[optim]\nname = "adamw"\n'
                      f'lr = 3e-3\n[[stages]]\nname = "dpo"\nobjective = "dpo"\n[stages.dpo]\n'
                      f'path = "{_pairs_file(tmp_path)}"\npairs_per_step = 3\nepochs = 4\n')
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(ln) for ln in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12  # 9 pairs x 4 epochs / 3 per step
    # Before the first update the policy is the reference: every implicit reward is 0 and the loss is log 2.
    assert abs(rows[0]["reward_margin"]) < 1e-5 and abs(rows[0]["loss"] - np.log(2)) < 1e-5
    assert rows[-1]["reward_margin"] > 0.05 and rows[-1]["reward_accuracy"] > 0.5
    assert rows[-1]["loss"] < np.log(2)
