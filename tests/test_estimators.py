"""ppo.py's critic-free estimators (--advantage_estimator), KL estimators and loss aggregation against slow
references written here; 1 vs 2 ranks and resume after SIGKILL with several samples per prompt."""

import math

import pytest
import torch
from conftest import kill_when, read_metrics, run_script, stage_module

ppo = stage_module("ppo")


def test_kl_estimators_against_the_formulas():
    logp, ref = torch.randn(3, 5), torch.randn(3, 5)
    for b in range(3):
        for t in range(5):
            r = float(logp[b, t] - ref[b, t])
            for name, expect in (("k1", r), ("k2", 0.5 * r * r), ("k3", math.exp(-r) - 1 + r)):
                got = ppo.kl_estimate(logp, ref, name)[b, t].item()
                assert got == pytest.approx(expect, rel=1e-5, abs=1e-6), name
    assert (ppo.kl_estimate(logp, ref, "k3") >= 0).all()
    rewards, kl = ppo.compute_rewards(torch.zeros(3), logp, ref, torch.ones(3, 5, dtype=torch.bool),
                                      torch.full((3,), 5), 0.5, "k3")
    assert torch.allclose(kl, ppo.kl_estimate(logp, ref, "k3")) and torch.allclose(rewards, -0.5 * kl)


def baseline_reference(scores, estimator, k):
    """One Python loop per group, each paper's formula written out."""
    out = []
    for g in range(0, len(scores), k):
        group = scores[g: g + k]
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
        for i, x in enumerate(group):
            if estimator == "grpo":
                out.append((x - mean) / (std + 1e-4))
            elif estimator == "dr_grpo":
                out.append(x - mean)
            elif estimator == "rloo":
                out.append(x - sum(y for j, y in enumerate(group) if j != i) / (k - 1))
            else:  # gae, reinforce_pp: no group baseline
                out.append(x)
    return out


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"])
def test_group_baselines_against_loops(estimator, k):
    torch.manual_seed(k)
    score = torch.randn(3 * k) * 3
    score[:k] = 1.25  # a group whose answers all scored the same: zero advantage (no NaN from a zero std)
    got = ppo.group_baseline(score, estimator, k)
    expect = baseline_reference(score.tolist(), estimator, k)
    assert got.tolist() == pytest.approx(expect, rel=1e-5, abs=1e-5)
    assert torch.isfinite(got).all()
    if estimator not in ("gae", "reinforce_pp"):
        assert got[:k].tolist() == [0.0] * k


def advantages_reference(score, logp, ref, lengths, estimator, k, kl_coef, gamma):
    """Critic-free advantages by hand: the baseline per group, then for every token the discounted sum of the rewards
    from it to the end (-kl_coef * k1 on every token, the adjusted score on the last), whitened over the batch's
    tokens for reinforce_pp."""
    adjusted = baseline_reference(score, estimator, k)
    adv = [[0.0] * logp.shape[1] for _ in score]
    for b, n in enumerate(lengths):
        for t in range(n):
            adv[b][t] = sum(gamma ** (u - t) * (-kl_coef * float(logp[b, u] - ref[b, u]) + (adjusted[b] if u == n - 1
                                                                                            else 0.0))
                            for u in range(t, n))
    if estimator == "reinforce_pp":
        real = [adv[b][t] for b, n in enumerate(lengths) for t in range(n)]
        mean = sum(real) / len(real)
        std = math.sqrt(sum((x - mean) ** 2 for x in real) / (len(real) - 1))
        adv = [[(x - mean) / std if t < lengths[b] else 0.0 for t, x in enumerate(row)] for b, row in enumerate(adv)]
    return adv


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_critic_free_advantages_with_a_finished_and_an_unfinished_answer(estimator):
    """The main loop's steps 4-5 for a critic-free run (group_baseline -> compute_rewards -> gae with no values and
    lam 1 -> whitening for reinforce_pp), with each group holding one answer that ended with EOS (short) and one that
    hit --max_new_tokens (full width, missing-EOS penalty already in its score)."""
    torch.manual_seed(1)
    k, T = 2, 6
    lengths = [3, 6, 6, 2, 4, 6]  # rows 1, 2 and 5 never emitted EOS
    score = [0.5, 1.5 - 1.0, 2.0 - 1.0, -0.3, 0.7, 0.2 - 1.0]
    logp, ref = torch.randn(6, T), torch.randn(6, T)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    adjusted = ppo.group_baseline(torch.tensor(score), estimator, k)
    rewards, _ = ppo.compute_rewards(adjusted, logp, ref, mask, torch.tensor(lengths), 0.1)
    adv, _ = ppo.gae(rewards, torch.zeros(6, T), mask, 0.9, 1.0)
    if estimator == "reinforce_pp":
        adv = ppo.masked_whiten(adv, mask)
    expect = advantages_reference(score, logp, ref, lengths, estimator, k, 0.1, 0.9)
    assert adv.tolist() == [pytest.approx(row, rel=1e-4, abs=1e-5) for row in expect]


def test_loss_aggregations_against_their_definitions():
    torch.manual_seed(3)
    lengths = torch.tensor([2, 5, 1, 4])
    mask = torch.arange(5)[None] < lengths[:, None]
    pg = torch.randn(4, 5)
    rows = [[float(pg[b, t]) for t in range(int(n))] for b, n in enumerate(lengths)]
    expect = {"token_mean": sum(map(sum, rows)) / sum(map(len, rows)),
              "seq_mean_token_mean": sum(sum(r) / len(r) for r in rows) / 4,
              "seq_mean_token_sum_norm": sum(sum(r) / 8 for r in rows) / 4}
    for agg, value in expect.items():
        count = mask.sum() if agg == "token_mean" else 4  # what main divides by: tokens or answers
        got = ppo.masked_sum(pg * ppo.loss_weights(lengths, agg, 8), mask) / count
        assert got.item() == pytest.approx(value, rel=1e-5), agg


@pytest.mark.parametrize("k,stage,estimator", [(2, 0, "grpo"), (4, 3, "rloo")])
def test_two_ranks_match_one_rank_and_resume(demo, few_prompts, tmp_path, k, stage, estimator):
    """k answers per prompt: 1 rank and 2 ranks roll out the same groups (generate calls seeded by their place in the
    global batch, a group never split over ranks) and make the same updates (tolerance as in test_ppo.py). Both run
    one optimizer step an iteration: on one micro-batch a rank the update's forward runs while scoring (the ratio is
    exactly 1); grpo (KL in the loss) on 1 rank in two micro-batches scores in a forward of its own.
    The ZeRO-0 case is also killed (SIGKILL) after its first checkpoint and resumed: the same metrics and weights, bit
    for bit, and no critic anywhere."""
    from safetensors.torch import load_file

    prompts = 32 // k  # one iteration: 32 answers on one rank, 16 on each of two
    base = ["--actor", demo / "sft", "--reward", demo / "rm", *few_prompts, "--total_episodes", "64", "--eval_every",
            "0", "--num_eval_prompts", "8", "--print_samples", "0", "--generation_batch_size", str(prompts // 2),
            "--ppo_epochs", "1", "--zero_stage", stage, "--advantage_estimator", estimator,
            "--samples_per_prompt", k, "--save_every", "1"]
    if estimator == "grpo":
        base += ["--kl_in_loss", "--kl_estimator", "k3"]
    one = ["--rollout_batch_size", prompts, "--mini_batch_size", 32, "--per_device_batch_size",
           16 if estimator == "grpo" else 32]
    run_script("ppo.py", *base, *one, "--output_dir", tmp_path / "one")
    run_script("ppo.py", *base, "--rollout_batch_size", prompts // 2, "--mini_batch_size", 16,
               "--per_device_batch_size", 16, "--output_dir", tmp_path / "two", ranks=2)
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 3 and "train/value_loss" not in a[1] and "train/explained_variance" not in a[1]
    assert not (tmp_path / "one" / "checkpoints" / "critic").exists()
    assert b[1]["train/ratio"] == 1.0 and a[1]["train/clipfrac"] == 0.0  # the step's own forward
    assert a[1]["train/ratio"] == (1.0 if estimator == "rloo" else pytest.approx(1.0, abs=1e-5))
    for x, y in zip(a, b):
        for key in x:
            if key.startswith(("train/", "eval/")):
                assert y[key] == pytest.approx(x[key], rel=2e-3, abs=1e-4), (x["step"], key)
    if stage != 0:
        return
    out = tmp_path / "resumed"
    latest = out / "checkpoints" / "actor" / "latest"
    kill_when("ppo.py", *base, *one, "--output_dir", out,
              ready=lambda: latest.exists() and latest.read_text().strip() == "iter1")
    run_script("ppo.py", *base, *one, "--output_dir", out, "--resume")
    before, after = load_file(tmp_path / "one" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before)

    def strip(rows):  # wall-clock figures differ
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]

    assert strip(read_metrics(out)) == strip(a)


def test_bad_estimator_flags_are_one_line_errors(tmp_path):
    for flags, needle in ((["--advantage_estimator", "rloo"], "--samples_per_prompt 1"),
                          (["--advantage_estimator", "grpo", "--samples_per_prompt", "2", "--save_critic"],
                           "no critic")):
        p = run_script("ppo.py", *flags, "--output_dir", tmp_path / "x", check=False)
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode != 0 and "Traceback" not in p.stderr and len(errors) == 1 and needle in errors[0], p.stderr


def test_one_forward_for_scoring_and_update_matches_two(demo, few_prompts, tmp_path):
    """One optimizer step on fresh samples, PPO with its critic and the KL in the reward. With one micro-batch, the
    actor's and critic's forwards of the update run while scoring, with autograd, and give the old log-probs and
    values; with two, both are scored in forwards of their own. The same global batch makes the same update: the
    same metrics (one iteration: its row has the eval after the update), and the ratio exactly 1 with one forward."""
    base = ["--actor", demo / "sft", "--reward", demo / "rm", *few_prompts, "--total_episodes", "32", "--eval_every",
            "0", "--num_eval_prompts", "8", "--print_samples", "0", "--ppo_epochs", "1", "--rollout_batch_size", "16",
            "--samples_per_prompt", "2", "--mini_batch_size", "32"]
    run_script("ppo.py", *base, "--per_device_batch_size", "32", "--output_dir", tmp_path / "once")
    run_script("ppo.py", *base, "--per_device_batch_size", "16", "--output_dir", tmp_path / "twice")
    a, b = read_metrics(tmp_path / "once"), read_metrics(tmp_path / "twice")
    assert len(a) == len(b) == 2 and "train/value_loss" in a[1]
    for x, y in zip(a[1:], b[1:]):
        assert x["train/ratio"] == 1.0 and x["train/clipfrac"] == 0.0
        for key in x:
            if key.startswith(("train/", "eval/")):
                assert y[key] == pytest.approx(x[key], rel=2e-3, abs=1e-4), (x["step"], key)
