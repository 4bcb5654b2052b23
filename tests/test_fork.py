"""Forking ppo.py: the one place prompts become rollout rows, the metric sums, and the reference tests run against a
forked file (`pytest tests/test_ppo.py --script ppo_mine.py`)."""

import random
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT, script_env, stage_module

ppo = stage_module("ppo")


def rollout_prompts_reference(n_prompts, iteration, rank, per_rank, world, seed, k):
    """The indexing ppo.py had before it was one function, and the repeat written out."""
    per_iter = per_rank * world
    epoch, position = divmod(iteration, max(1, n_prompts // per_iter))
    order = list(range(n_prompts))
    random.Random(seed + epoch).shuffle(order)
    chunk = [order[(position * per_iter + j) % len(order)] for j in range(rank * per_rank, (rank + 1) * per_rank)]
    out = []
    for i in chunk:
        out += [i] * k
    return out


@pytest.mark.parametrize("n_prompts,per_rank,world", [(40, 4, 1), (40, 4, 2), (10, 4, 2), (7, 8, 1)])
def test_rollout_prompts_against_the_old_indexing(n_prompts, per_rank, world):
    for iteration in range(12):
        for k in (1, 2, 3):
            got = [ppo.rollout_prompts(n_prompts, iteration, r, per_rank, world, 5, k) for r in range(world)]
            assert got == [rollout_prompts_reference(n_prompts, iteration, r, per_rank, world, 5, k)
                           for r in range(world)]
            # one rank of twice the size draws the same global batch as two ranks
            if world == 2:
                assert sum(got, []) == ppo.rollout_prompts(n_prompts, iteration, 0, 2 * per_rank, 1, 5, k)


def test_kl_per_response_is_the_k1_sum_and_ignores_padding():
    logp, ref = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    logp[0, 4] = float("inf")  # padding never leaks in
    got = ppo.kl_per_response(logp, ref, mask)
    for b in range(3):
        expect = sum(float(logp[b, t] - ref[b, t]) for t in range(5) if mask[b, t])
        assert got[b].item() == pytest.approx(expect, abs=1e-6)


def test_reduce_sums_by_name():
    sums = Counter()
    sums.update(a=torch.tensor(1.5), b=2)
    sums.update(a=torch.tensor(0.5))
    assert ppo.reduce_sums(sums, torch.device("cpu")) == {"a": 2.0, "b": 2.0}


def test_reference_tests_run_against_a_fork(tmp_path):
    """--script swaps in the fork: a copy passes, and a fork whose GAE is wrong fails the reference test."""
    source = (ROOT / "ppo.py").read_text()
    same = tmp_path / "ppo_same.py"
    same.write_text(source)
    wrong = tmp_path / "ppo_wrong.py"
    assert source.count("next_values = F.pad(values[:, 1:], (0, 1))") == 1
    wrong.write_text(source.replace("next_values = F.pad(values[:, 1:], (0, 1))", "next_values = values"))

    def run(fork):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ppo.py",
                               "--script", str(fork), "-k", "gae_against or trim_keeps"], cwd=ROOT,
                              env=script_env(), capture_output=True, text=True, timeout=300)

    ok, bad = run(same), run(wrong)
    assert ok.returncode == 0, ok.stdout[-2000:]
    assert bad.returncode == 1 and "test_gae_against_python_loop" in bad.stdout, bad.stdout[-2000:]
    assert "passed" in bad.stdout  # trim_keeps_the_numbers still passes: the fork was imported, not the repo's
    usage = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_ppo.py", "--script", "nope.py", "-k",
                            "trim"], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert usage.returncode == 4 and "--script nope.py" in usage.stderr


def apply_doc_diff(source: str, block: str) -> str:
    """Apply a diff block of docs/forking.md: hunks separated by blank lines, each its context lines (a leading space)
    then the lines it adds (+) after them; each hunk's context must occur exactly once in `source`."""
    for hunk in block.strip("\n").split("\n\n"):
        lines = hunk.split("\n")
        context = "\n".join(x[1:] for x in lines if x.startswith(" ")) + "\n"
        added = "".join(x[1:] + "\n" for x in lines if x.startswith("+"))
        assert source.count(context) == 1, context
        source = source.replace(context, context + added)
    return source


def test_the_entropy_bonus_fork_in_the_docs(demo, few_prompts, tmp_path):
    """The entropy bonus of docs/forking.md, applied to ppo.py as written there: 4 changed lines, and a fork that
    works: the same first rollout (same seed) updated with --ent_coef 1 ends with a higher update entropy than with 0
    (a fork whose loss term were missing, or had the wrong sign, would not)."""
    import difflib
    import json

    from conftest import run_script

    doc = (ROOT / "docs" / "forking.md").read_text()
    block = doc.split("## An entropy bonus", 1)[1].split("```diff\n", 1)[1].split("```", 1)[0]
    source = (ROOT / "ppo.py").read_text()
    fork = apply_doc_diff(source, block)
    changed = [x for x in difflib.unified_diff(source.splitlines(), fork.splitlines(), lineterm="", n=0)
               if x[:1] in "+-" and not x.startswith(("+++", "---"))]
    assert len(changed) == 4 and all(x.startswith("+") for x in changed), changed
    (tmp_path / "ppo_entropy.py").write_text(fork)
    entropy = {}
    for coef in ("0", "1"):
        out = tmp_path / f"coef{coef}"
        run_script(tmp_path / "ppo_entropy.py", "--actor", demo / "sft", "--reward", demo / "rm", "--data",
                   few_prompts[1], "--eval_fraction", "0", "--learning_rate", "2e-4", "--total_episodes", "16",
                   "--rollout_batch_size", "16", "--mini_batch_size", "8", "--ppo_epochs", "2", "--ent_coef", coef,
                   "--output_dir", out)
        row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train/entropy" in x][0]
        entropy[coef] = row["train/update_entropy"]
        assert 0 < row["train/update_entropy"] < 20 and row["train/entropy"] > 0, row
    assert entropy["1"] > entropy["0"], entropy
