"""Research instruments: ppo.py --reward_fn, --report_to in every stage, and experiments/ (plot, ablate, overopt)."""

import json
import sys
import types

import pytest
import torch

import common
import common.generation
import common.reward_fn
import common.toy
import ppo
from conftest import ROOT, read_metrics, run_script

sys.path.insert(0, str(ROOT / "experiments"))

# ---------------------------------------------------------------------------------------------------------------
# --reward_fn


def write_fns(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length(prompts, responses):\n"
                 "    return [len(r.split()) for r in responses]\n"
                 "\n"
                 "def broken(prompts, responses):\n"
                 "    return [1 / 0 for r in responses]\n"
                 "\n"
                 "def short(prompts, responses):\n"
                 "    return [0.0]\n"
                 "\n"
                 "def nan(prompts, responses):\n"
                 "    return [float('nan')] * len(responses)\n"
                 "\n"
                 "def words(prompts, responses):\n"
                 "    return ['high'] * len(responses)\n")
    return f


def test_reward_fn_loads_from_a_file_or_a_module_and_checks_what_it_returns(tmp_path):
    f = write_fns(tmp_path)
    prompts, responses = [[{"role": "user", "content": "tell me about cats"}]] * 2, ["cats are nice .", "a b"]
    fn = common.reward_fn.load(f"{f}:length")
    assert common.reward_fn.call(fn, "x", prompts, responses, "cpu").tolist() == [4.0, 2.0]
    gold = common.reward_fn.load("common.toy:gold_reward_fn")
    expect = [common.toy.gold_score("tell me about cats", r) for r in responses]
    assert common.reward_fn.call(gold, "x", prompts, responses, "cpu").tolist() == pytest.approx(expect)
    for spec, needle in ((f"{f}:nope", "has no function nope"), (f"{tmp_path}/none.py:f", "no such file"),
                         ("length", "expected FILE.py:NAME"), ("no_such_module_xyz:f", "ModuleNotFoundError")):
        with pytest.raises(common.UserError, match=needle):
            common.reward_fn.load(spec)
    with pytest.raises(common.UserError, match=rf"ZeroDivisionError.*{f}:5\)"):  # names the line in the user's file
        common.reward_fn.call(common.reward_fn.load(f"{f}:broken"), "x", prompts, responses, "cpu")
    for name, needle in (("short", "expected a list of 2 numbers"), ("nan", "returned nan for response 0"),
                         ("words", "expected a list of 2 numbers")):
        with pytest.raises(common.UserError, match=needle):
            common.reward_fn.call(common.reward_fn.load(f"{f}:{name}"), "x", prompts, responses, "cpu")


def test_ppo_with_a_reward_function_and_no_reward_model(tiny_models, tmp_path):
    """--reward none --reward_fn: no reward model, the critic from the actor; train/reward is the function's score
    (here the response length in words), and an exception in the function is one line naming its file:line."""
    f = write_fns(tmp_path)
    flags = ["--actor", tiny_models["llama"], "--reward", "none", "--total_episodes", "32", "--rollout_batch_size",
             "16", "--num_eval_prompts", "8", "--eval_every", "0", "--max_new_tokens", "8", "--print_samples", "0"]
    run_script("ppo.py", *flags, "--reward_fn", f"{f}:length", "--output_dir", tmp_path / "o")
    rows = read_metrics(tmp_path / "o")
    train = [r for r in rows if "train/reward" in r]
    assert len(train) == 2 and all(r["train/reward"] == r["train/reward_fn"] > 0 for r in train)
    assert rows[0]["eval/reward"] == rows[0]["eval/reward_fn"] > 0 and "eval/gold" in rows[-1]
    p = run_script("ppo.py", *flags, "--reward_fn", f"{f}:broken", "--output_dir", tmp_path / "b", check=False)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr[-2000:]
    assert "ZeroDivisionError" in errors[0] and f"{f}:5" in errors[0]
    p = run_script("ppo.py", "--actor", tiny_models["llama"], "--reward", "none", "--output_dir", tmp_path / "n",
                   check=False)
    assert p.returncode != 0 and "error: --reward none needs --reward_fn" in p.stderr


# ---------------------------------------------------------------------------------------------------------------
# --report_to


def test_report_to_a_missing_tracker_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(common.UserError, match=r"--report_to wandb: the `wandb` package is not installed"):
        common.check_report_to("wandb")
    with pytest.raises(common.UserError, match="expected one of none, tensorboard, wandb"):
        common.check_report_to("mlflow")
    common.check_report_to("none")


class Recorder:
    def __init__(self, *args, **kwargs):
        self.calls = [("init", args, kwargs)]

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))


def test_logger_sends_the_rows_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    """With fake tracker modules (neither package is a dependency): every numeric metric reaches the tracker at its
    step, the run's config goes with it, and metrics.jsonl is written the same."""
    import importlib.util

    made = []
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = lambda *a, **k: made.append(Recorder(*a, **k)) or made[-1]
    wandb = types.ModuleType("wandb")
    wandb.init = lambda *a, **k: made.append(Recorder(*a, **k)) or made[-1]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("wandb", "tensorboard")
                        else real(name, *a))
    for tracker in ("tensorboard", "wandb"):
        out = tmp_path / tracker
        out.mkdir()
        logger = common.Logger(str(out), 2, "ppo", report_to=tracker, config={"kl_coef": 0.1, "output_dir": out})
        logger.log(1, {"train/reward": 0.5, "train/kl_coef": 0.1, "note": "x"}, advance=1)
        logger.close()
        rec = made[-1]
        assert read_metrics(out) == [{"step": 1, "train/reward": 0.5, "train/kl_coef": 0.1, "note": "x"}]
        if tracker == "tensorboard":
            assert rec.calls[0][1] == (str(out / "tensorboard"),)
            scalars = [c[1] for c in rec.calls if c[0] == "add_scalar"]
            assert scalars == [("train/reward", 0.5, 1), ("train/kl_coef", 0.1, 1)]
            assert any(c[0] == "add_text" and '"kl_coef": 0.1' in c[1][1] for c in rec.calls)
        else:
            assert rec.calls[0][2]["name"] == "wandb" and rec.calls[0][2]["config"]["kl_coef"] == 0.1
            assert ("log", ({"train/reward": 0.5, "train/kl_coef": 0.1},), {"step": 1}) in rec.calls
            assert rec.calls[-1][0] == "finish"


def test_logger_writes_real_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = common.Logger(str(tmp_path), 2, "sft", report_to="tensorboard", config={"seed": 1})
    for step in (1, 2):
        logger.log(step, {"train/loss": 1.0 / step})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]


# ---------------------------------------------------------------------------------------------------------------
# experiments/


def write_run(folder, args: dict, rows: list[dict]):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_labels_runs_by_the_arguments_that_differ(tmp_path):
    import plot

    base = {"kl_coef": 0.05, "seed": 1, "output_dir": "x", "temperature": 1.0}
    rows = [{"step": 0, "eval/gold": 0.5}, {"step": 1, "train/kl": 0.1}, {"step": 2, "eval/gold": 0.6}]
    runs = []
    for i, change in enumerate(({}, {"kl_coef": 0.0}, {"kl_coef": 0.0, "seed": 2})):
        write_run(tmp_path / f"r{i}", base | change | {"output_dir": f"r{i}"}, rows)
        runs.append(str(tmp_path / f"r{i}"))
    args = [plot.load_run(r)[0] for r in runs]
    assert plot.run_labels(runs, args) == ["kl_coef=0.05, seed=1", "kl_coef=0.0, seed=1", "kl_coef=0.0, seed=2"]
    assert plot.run_labels(runs[:1] + [str(tmp_path / "r0" / "metrics.jsonl")], args[:1] * 2) == ["r0", "r0"]
    assert plot.series(plot.load_run(runs[0])[1], "eval/gold") == ([0, 2], [0.5, 0.6])
    pytest.importorskip("matplotlib")
    plot.plot(runs, ("eval/gold", "train/kl", "eval/absent"), str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_table_is_mean_and_sample_std_over_seeds():
    import ablate

    runs = [{"eval/gold": g, "eval/reward": 1.0, "eval/kl": 2.0, "length": 9.0} for g in (0.5, 0.7, 0.9)]
    text = ablate.table({"baseline": runs, "one seed": runs[:1]}, {"eval/gold": 0.4, "eval/kl": 0.0})
    lines = text.splitlines()
    assert lines[2] == "| SFT policy (before PPO) | | 0.400 |  | 0.000 |  |"
    assert lines[3] == "| baseline | 3 | 0.700 ± 0.200 | 1.000 ± 0.000 | 2.000 ± 0.000 | 9.000 ± 0.000 |"
    assert lines[4] == "| one seed | 1 | 0.500 | 1.000 | 2.000 | 9.000 |"


def test_ablation_patches_change_what_they_say(monkeypatch):
    """Each patch of experiments/ablate.py, applied to ppo.py/common (and undone after the test)."""
    import ablate

    monkeypatch.setattr(ppo, "seq_logprobs", ppo.seq_logprobs)
    monkeypatch.setattr(common.generation, "generation_config", common.generation.generation_config)
    monkeypatch.setattr(common, "disable_dropout", common.disable_dropout)
    tok = common.toy.toy_tokenizer()
    model = common.toy.toy_model(tok).eval()
    seq = torch.randint(3, len(tok), (2, 7))
    attn = torch.ones_like(seq)
    with torch.no_grad():
        at_one, at_half = ppo.seq_logprobs(model, seq, attn, 3, 1.0), ppo.seq_logprobs(model, seq, attn, 3, 0.5)
        assert not torch.allclose(at_one, at_half)
        ablate.logprobs_without_temperature()  # every log-prob of ppo.py goes through seq_logprobs
        torch.testing.assert_close(ppo.seq_logprobs(model, seq, attn, 3, 0.5), at_one)
        torch.testing.assert_close(ppo.ref_logprobs(model, model, seq, attn, 3, 0.5, 1024), at_one)
    ablate.greedy_rollouts()
    args = ppo.Args(temperature=0.7)
    config = common.generation.generation_config
    rollout, evaluation = config(args, tok), config(args, tok)
    assert rollout.do_sample is False and evaluation.do_sample is True
    ablate.dropout_on(0.1)
    model = common.toy.toy_model(tok)
    common.disable_dropout(model)
    assert all(m.attention_dropout == 0.1 for m in model.modules() if hasattr(m, "attention_dropout"))
    assert any(hasattr(m, "attention_dropout") for m in model.modules())


def test_overopt_curve_and_summary():
    import overopt

    rows = [{"step": 0, "eval/kl": -0.01, "eval/gold": 0.5, "eval/reward": 0.0}, {"step": 1, "train/kl": 1.0},
            {"step": 8, "eval/kl": 4.0, "eval/gold": 0.8, "eval/reward": 1.0},
            {"step": 16, "eval/kl": 9.0, "eval/gold": 0.6, "eval/reward": 2.0}]
    points = overopt.curve(rows)
    assert points == [(0.0, 0.5, 0.0), (2.0, 0.8, 1.0), (3.0, 0.6, 2.0)]
    line = overopt.summary({0.05: points}).splitlines()[2]
    assert line == "| 0.05 | 0.500 | 0.800 (2.00) | 0.600 | 0.000 | 2.000 | 3.00 |"


def test_every_stage_refuses_a_missing_tracker_before_writing(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    for script in ("sft.py", "reward.py", "ppo.py"):
        p = run_script(script, "--report_to", "wandb", "--output_dir", tmp_path / script, check=False)
        errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        assert p.returncode == 1 and errors == [
            "error: --report_to wandb: the `wandb` package is not installed (pip install wandb); metrics.jsonl is "
            "written without it"], p.stderr[-2000:]
        assert not (tmp_path / script).exists()
