"""ppo.py: every piece of math against a slow, obvious reference; sampling equals the policy; end-to-end runs."""

import json
import math
import random
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import FAMILIES, ROOT, make_model, make_tokenizer, read_metrics, run_script, stage_module
from transformers.modeling_outputs import CausalLMOutputWithPast

import common
import common.data
import common.engines
import common.generation
import common.logprobs
import common.reward_fn
import common.toy

ppo = stage_module("ppo")  # the repo's, or a fork given with --script (conftest.py)


def rand_mask(B, T, seed=0):
    g = random.Random(seed)
    lengths = [g.randint(1, T) for _ in range(B)]
    return torch.tensor([[t < n for t in range(T)] for n in lengths]), torch.tensor(lengths)


def test_logprobs_with_temperature_against_loop():
    """seq_logprobs (the chunked head of common.logprobs.token_logprobs) against softmax(logits / T) token by token."""
    tok = make_tokenizer("llama")
    model = make_model("llama", tok).eval()
    torch.manual_seed(0)
    seq, n_prompt = torch.randint(3, len(tok), (2, 9)), 4
    attn = torch.ones_like(seq)
    attn[0, :2] = 0  # left padding
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=attn, position_ids=common.position_ids(attn)).logits
        for T in (1.0, 0.7, 2.0):
            got, ent = ppo.seq_logprobs(model, seq, attn, n_prompt, T, with_entropy=True, chunk_size=3)
            for b in range(2):
                for t in range(seq.shape[1] - n_prompt):
                    p = torch.softmax(logits[b, n_prompt - 1 + t].double() / T, -1)
                    assert got[b, t].item() == pytest.approx(math.log(p[seq[b, n_prompt + t]].item()), abs=1e-5)
                    assert ent[b, t].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)


def test_truncate_after_eos_against_loop():
    eos, pad = 2, 0
    resp = torch.tensor([[5, 6, 2, 7, 2], [2, 5, 5, 5, 5], [5, 6, 7, 8, 9], [5, 6, 7, 8, 2]])
    cleaned, mask, lengths, has_eos = ppo.truncate_after_eos(resp, eos, pad)
    for b, row in enumerate(resp.tolist()):
        n = row.index(eos) + 1 if eos in row else len(row)
        assert lengths[b] == n and bool(has_eos[b]) == (eos in row)
        assert mask[b].tolist() == [t < n for t in range(5)]
        assert cleaned[b].tolist() == row[:n] + [pad] * (5 - n)


def test_masked_mean_and_whiten_against_reference():
    torch.manual_seed(1)
    x = torch.randn(4, 6) * 3 + 2
    mask, _ = rand_mask(4, 6)
    vals = [x[b, t].item() for b in range(4) for t in range(6) if mask[b, t]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    assert ppo.masked_mean(x, mask).item() == pytest.approx(mean, rel=1e-5)
    w = ppo.masked_whiten(x, mask)
    for b in range(4):
        for t in range(6):
            expect = (x[b, t].item() - mean) / math.sqrt(var + 1e-8) if mask[b, t] else 0.0
            assert w[b, t].item() == pytest.approx(expect, abs=1e-4)
    w2 = ppo.masked_whiten(x, mask, shift_mean=False)
    assert w2[mask].mean().item() == pytest.approx(mean, abs=1e-4)


def test_rewards_put_kl_on_every_token_and_score_on_the_eos():
    torch.manual_seed(2)
    B, T = 4, 7
    mask, lengths = rand_mask(B, T, seed=3)
    logp, ref_logp, score = torch.randn(B, T), torch.randn(B, T), torch.randn(B)
    rewards, kl = ppo.compute_rewards(score, logp, ref_logp, mask, lengths, kl_coef=0.1)
    for b in range(B):
        for t in range(T):
            real = t < int(lengths[b])
            expect_kl = (logp[b, t] - ref_logp[b, t]).item() if real else 0.0
            expect = -0.1 * expect_kl
            if t == int(lengths[b]) - 1:  # the last real token: the EOS when the response has one
                expect += score[b].item()
            assert rewards[b, t].item() == pytest.approx(expect, abs=1e-6)
            assert kl[b, t].item() == pytest.approx(expect_kl, abs=1e-6)


def gae_reference(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        last = 0.0
        for t in reversed(range(int(lengths[b]))):
            next_v = values[b, t + 1].item() if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_against_python_loop(gamma, lam):
    torch.manual_seed(4)
    B, T = 5, 9
    mask, lengths = rand_mask(B, T, seed=5)
    rewards, values = torch.randn(B, T), torch.randn(B, T)  # garbage after the end must be ignored
    ref = gae_reference(rewards, values, lengths, gamma, lam)
    for block in (256, 4, 2, 1):  # one block, and blocks continued by the advantage after them (T=9: uneven)
        adv, ret = ppo.gae(rewards, values, mask, gamma, lam, block=block)
        assert torch.allclose(adv, ref, atol=1e-5), block
        assert torch.allclose(ret, (ref + values) * mask, atol=1e-5), block


def test_clipped_losses_against_reference():
    torch.manual_seed(5)
    logp, old, adv = torch.randn(50), torch.randn(50), torch.randn(50)
    loss, clipped, ratio = ppo.policy_loss(logp, old, adv, 0.2)
    for i in range(50):
        r = math.exp(logp[i].item() - old[i].item())
        a = adv[i].item()
        expect = max(-a * r, -a * min(max(r, 0.8), 1.2))
        assert loss[i].item() == pytest.approx(expect, rel=1e-5, abs=1e-6)
        assert ratio[i].item() == pytest.approx(r, rel=1e-5)
        assert clipped[i].item() == float(-a * min(max(r, 0.8), 1.2) > -a * r)  # the clip decided the loss
    v, old_v, ret = torch.randn(50), torch.randn(50), torch.randn(50)
    vl, _ = ppo.value_loss(v, old_v, ret, 0.2)
    for i in range(50):
        vc = old_v[i].item() + min(max(v[i].item() - old_v[i].item(), -0.2), 0.2)
        expect = 0.5 * max((v[i].item() - ret[i].item()) ** 2, (vc - ret[i].item()) ** 2)
        assert vl[i].item() == pytest.approx(expect, rel=1e-5, abs=1e-6)


def test_adaptive_kl_controller():
    # Ziegler et al.: proportional error clipped to +-0.2, scaled by n_steps / horizon
    assert ppo.adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 512) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 3.0, 6.0, 10000, 512) == pytest.approx(0.1 * (1 - 0.2 * 512 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 6.6, 6.0, 1000, 100) == pytest.approx(0.1 * (1 + 0.1 * 100 / 1000))


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_sampling_distribution_is_the_policy_and_padding_does_not_change_logprobs(family):
    """The distribution generation.sample draws each token from (the model's logits at that step, tempered) gives our
    forward's log-probs (so PPO's ratio is about the policy that sampled; the model's own generation_config, a top_k
    and a repetition penalty here, is not used), and a row's log-probs are the same alone and inside a left-padded
    batch (absolute positions)."""
    tok = common.load_tokenizer("toy") if family == "toy" else make_tokenizer(family)
    model = make_model(family, tok)
    for field, value in dict(top_k=7, repetition_penalty=1.3, min_p=0.9, epsilon_cutoff=3e-3,
                             suppress_tokens=[5, 6]).items():  # model defaults that must not reach PPO's sampling
        setattr(model.generation_config, field, value)
    model.eval()
    prompts = [common.encode_prompt(tok, common.to_messages(p)) for p in ["tell me about cats", "hey , describe tea"]]
    args = ppo.Args(temperature=0.7, max_new_tokens=6)
    cfg = common.generation.generation_config(args, tok)

    class Engine:  # the bits of a DeepSpeed engine that generate() uses
        module = model

    torch.manual_seed(0)
    padded = common.pad(prompts, common.pad_id(tok), side="left")
    attn = common.pad([[1] * len(p) for p in prompts], 0, side="left")
    step_logits = []  # the logits each step of sample() drew its token from
    hook = model.register_forward_hook(lambda module, inputs, out: step_logits.append(out.logits[:, -1]))
    sequences = common.generation.sample(model, padded, attn, cfg)
    hook.remove()
    n_prompt = padded.shape[1]
    gen = sequences[:, n_prompt:]
    scores = (torch.stack(step_logits[:gen.shape[1]], 1) / 0.7).log_softmax(-1)
    gen_logp = torch.gather(scores, -1, gen.unsqueeze(-1)).squeeze(-1)
    _, mask, _, _ = ppo.truncate_after_eos(gen, tok.eos_token_id, common.pad_id(tok))
    full_attn = torch.cat([attn, mask.long()], 1)
    with torch.no_grad():
        logp = ppo.seq_logprobs(model, sequences, full_attn, n_prompt, 0.7)
    assert torch.allclose(logp[mask], gen_logp[mask], atol=1e-4)
    # row 0 alone, unpadded, gives the same log-probs as inside the batch
    n0 = len(prompts[0])
    row = torch.cat([torch.tensor(prompts[0]), gen[0][mask[0]]])[None]
    with torch.no_grad():
        alone = ppo.seq_logprobs(model, row, torch.ones_like(row), n0, 0.7)
    assert torch.allclose(alone[0], logp[0][mask[0]], atol=1e-4)
    # the whole generate() helper: rows end at their first EOS, padding after it
    torch.manual_seed(0)
    rollout, n_prompt2 = ppo.generate(Engine, prompts, tok, cfg, 0, False, torch.device("cpu"))
    assert n_prompt2 == n_prompt
    assert (rollout["seq"][:, n_prompt:][~rollout["mask"]] == common.pad_id(tok)).all()


def test_exponential_race_draws_each_token_with_its_probability():
    """generation.sample's draw, argmax(p / E) with E ~ Exp(1), against the probabilities themselves: 200k draws of a
    distribution with a zero, a tiny and a large entry land within 5 standard errors of p (chi-square-like check)."""
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), -9.0, 1.0]]).repeat(200_000, 1)

    class Model(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return CausalLMOutputWithPast(logits=logits[: len(input_ids), None])

    cfg = transformers.GenerationConfig(do_sample=True, temperature=0.8, max_new_tokens=1, eos_token_id=[99],
                                        pad_token_id=0)
    torch.manual_seed(0)
    ids = torch.zeros(len(logits), 1, dtype=torch.long)
    drawn = common.generation.sample(Model(), ids, torch.ones_like(ids), cfg)[:, 1]
    p = torch.softmax(logits[0] / 0.8, -1).double()
    freq = torch.bincount(drawn, minlength=len(p)).double() / len(drawn)
    se = (p * (1 - p) / len(drawn)).sqrt()
    assert freq[3] == 0 and ((freq - p).abs() <= 5 * se + 1e-9).all(), (freq, p)


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_greedy_is_hf_generate_on_each_row_alone(family):
    """generation.sample with the KV cache on a left-padded batch gives, greedily, HF generate()'s tokens for each
    prompt alone (no padding): positions, masks and the cache are right for every family; rows stop at EOS, then
    pad."""
    tok = make_tokenizer(family)
    torch.manual_seed(0)
    model = make_model(family, tok)
    model.eval()
    prompts = [common.encode_prompt(tok, common.to_messages(p)) for p in ["tell me about cats", "hi", "hey , tea"]]
    cfg = common.generation.generation_config(ppo.Args(max_new_tokens=10), tok, greedy=True)
    padded = common.pad(prompts, common.pad_id(tok), side="left")
    ours = common.generation.sample(model, padded, common.pad([[1] * len(p) for p in prompts], 0, side="left"), cfg)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            alone = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   generation_config=cfg)[0, len(p):]
        row = ours[i, padded.shape[1]:]
        assert row[:len(alone)].tolist() == alone.tolist() and (row[len(alone):] == common.pad_id(tok)).all()


def _synced_sample(rank: int, port: int, ends: list, out: dict):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    class Model(torch.nn.Module):  # the EOS (id 1) comes at step ends[rank]; counts its forwards
        calls = 0

        def forward(self, input_ids, **kwargs):
            Model.calls += 1
            logits = torch.zeros(len(input_ids), 1, 4)
            logits[:, :, 1 if Model.calls > ends[rank] else 2] = 9.0
            return CausalLMOutputWithPast(logits=logits, cache=torch.zeros(0))

    cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=[1], pad_token_id=0)
    ids = torch.ones(2, 3, dtype=torch.long)
    seq = common.generation.sample(Model(), ids, torch.ones_like(ids), cfg, synced_gpus=True)
    out[rank] = (Model.calls, seq[0, 3:].tolist())
    dist.destroy_process_group()


def test_sample_with_synced_gpus_runs_every_rank_until_all_have_ended():
    """ZeRO-3 through the partition hooks (--generate_sharded) needs every rank in every forward: a rank whose rows
    have all ended goes on (emitting pad) until the other's have too."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_synced_sample, args=(port, [2, 5], out), nprocs=2, start_method="fork")  # fork: no re-import
    assert out[0] == (6, [2, 2, 1, 0, 0, 0]) and out[1] == (6, [2, 2, 2, 2, 2, 1])  # pad (0) after rank 0's EOS


def test_zero3_generation_uses_the_plain_linear_and_gives_the_swap_back(monkeypatch):
    """Under ZeRO-3, generation runs with torch's own F.linear (not DeepSpeed's memory-saving replacement, a Python
    call per layer per token) in eval mode; afterwards the replacement and train mode are back, even after an error."""
    import contextlib

    import deepspeed.runtime.zero.stage3 as stage3
    import torch.nn.functional as F

    monkeypatch.setattr(stage3, "unwrap_model_for_generation", lambda engine: contextlib.nullcontext())
    swapped = lambda *a, **k: None  # noqa: E731  (stands for ZeRO-3's replacement)
    monkeypatch.setattr(F, "linear", swapped)

    class Model(torch.nn.Linear):
        def generate(self, **kwargs):
            return None

    class Engine:
        module = Model(2, 2)

    for fail in (False, True):
        with contextlib.suppress(RuntimeError), common.generation.generation_mode(Engine, 3, sharded=False):
            assert F.linear is common.generation.TORCH_LINEAR is not swapped and not Engine.module.training
            if fail:
                raise RuntimeError
        assert F.linear is swapped and Engine.module.training
    with common.generation.generation_mode(Engine, 3, sharded=True):  # through the hooks: nothing swapped
        assert F.linear is swapped


def test_trim_keeps_the_numbers():
    """Host-side lengths give the same cut as reading the masks (the slow way), and the trimmed rows keep every
    real token."""
    seq = torch.tensor([[0, 0, 5, 6, 7, 8, 0], [0, 4, 5, 6, 7, 0, 0]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    prompt_lens = [int(a.sum()) for a in attn[:, :4]]  # reference: read off the masks
    resp_lens = [int(m.sum()) for m in mask]
    s, a, n_prompt, width = ppo.trim(seq, attn, 4, prompt_lens, resp_lens)
    assert (prompt_lens, resp_lens) == ([2, 3], [2, 1]) and n_prompt == 3 and width == 2
    assert s.tolist() == [[0, 5, 6, 7, 8], [4, 5, 6, 7, 0]] and a.sum() == attn.sum()


def test_minibatches_are_the_same_global_draw_however_the_rollout_is_split():
    """PPO's mini-batches over a global batch of 48 rows in 4 mini-batches: on 1, 2, 3 or 4 ranks (each rank holding
    a contiguous share, as rollout_prompts gives it) mini-batch j is the same set of global rows; each epoch uses
    every row once; another epoch or iteration draws other mini-batches. With blocks of 2 rows a mini-batch (groups of
    2 answers), the two answers of a prompt land in one mini-batch sometimes, not never."""
    def global_batches(world, key, per_block=1):
        n = 48 // world
        per_rank = [ppo.minibatches(n, 4, rank * n, key, per_block) for rank in range(world)]
        return [sorted(rank * n + i for rank in range(world) for i in per_rank[rank][j]) for j in range(4)]

    for per_block, worlds in ((1, (2, 3, 4)), (2, (2, 3))):  # (each rank's share a whole number of blocks)
        one = global_batches(1, (0, 5, 0), per_block)
        assert sorted(sum(one, [])) == list(range(48)) and all(len(b) == 12 for b in one)
        assert all(global_batches(w, (0, 5, 0), per_block) == one for w in worlds)
        assert global_batches(1, (0, 5, 1), per_block) != one and global_batches(1, (0, 6, 0), per_block) != one
    assert one != [list(range(j, 48, 4)) for j in range(4)]  # not a fixed stride: drawn per block
    together = sum(any({2 * g, 2 * g + 1} <= set(b) for b in one) for g in range(24))
    assert 0 < together < 24


def test_ptx_batch_is_one_global_draw_however_it_is_split():
    """Every rank draws the same global PPO-ptx batch and takes its share; the token count is that of the global
    batch (assistant tokens, the first position never predicted), so the loss is a global token-mean."""
    rng = random.Random(0)
    ptx = [([1] * n, [False] * 2 + [bool(rng.random() < 0.6) for _ in range(n - 2)]) for n in range(3, 40)]
    one, n_one = ppo.ptx_batch(ptx, (1, 2, 0, 3), 8, 0, 8)
    halves = [ppo.ptx_batch(ptx, (1, 2, 0, 3), 8, r, 4) for r in (0, 1)]
    assert halves[0][0] + halves[1][0] == one and halves[0][1] == halves[1][1] == n_one
    assert n_one == sum(sum(m[1:]) for _, m in one)
    assert ppo.ptx_batch(ptx, (1, 2, 0, 4), 8, 0, 8)[0] != one  # another mini-batch, another draw
    assert len(ppo.ptx_batch(ptx[:3], (0,), 8, 0, 8)[0]) == 8  # fewer rows than the batch: drawn with replacement


def test_ema_update_against_a_loop():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    expect = {k: torch.zeros_like(v) for k, v in ema.items()}
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        common.engines.update_ema(ema, model, 0.75, 0)
        for k, v in model.state_dict().items():
            expect[k] = 0.75 * expect[k] + 0.25 * v
    assert all(torch.allclose(ema[k], expect[k]) for k in ema)
    # a bf16 actor whose fp32 master weights (DeepSpeed's) move by small steps: the fp32 copy follows the exact
    # average; kept in bf16 (8 bits of mantissa) most of each 0.008 * (w - ema) would round away
    model, master = torch.nn.Linear(64, 64).to(torch.bfloat16), torch.randn(64, 64) * 0.02
    with torch.no_grad():
        model.weight.copy_(master)
    ema, exact = common.engines.ema_copy(model), model.weight.detach().double().clone()
    start = exact.clone()
    assert ema["weight"].dtype == torch.float32
    for _ in range(1000):
        master += 1e-5
        with torch.no_grad():
            model.weight.copy_(master)
        common.engines.update_ema(ema, model, 0.992, 0)
        exact = 0.992 * exact + 0.008 * model.weight.detach().double()
    error = (ema["weight"].double() - exact).abs().mean() / (exact - start).abs().mean()
    assert error < 0.01, error  # in bf16 the same loop is off by 47% of the movement


def test_gpu_metrics_count_flops_as_dsc_does(monkeypatch):
    """2 x params FLOPs per token for each forward (generation: one of the actor), 6 x for forward + backward."""
    n = {"actor": 10, "critic": 7, "ref": 10, "reward": 7}
    assert common.engines.gpu_metrics(n, 100, 4, False, 2.0) == {} or torch.cuda.is_available()  # none on a CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    for forward_once, forwards in ((False, 10 + 10 + 7 + 10 + 7), (True, 10 + 10 + 7)):
        flops = 2 * 100 * forwards + 6 * 100 * 4 * (10 + 7)
        assert common.engines.gpu_metrics(n, torch.tensor(100), 4, forward_once, 2.0) == {
            "throughput/tflops": pytest.approx(flops / 2.0 / 1e12), "memory/peak_gb": 3.0}


# ---------------------------------------------------------------------------------------------------------------
# end to end on the demo


def test_first_ratio_is_one_with_frozen_weights(demo, tmp_path):
    run_script("ppo.py", "--actor", demo / "sft", "--reward", demo / "rm", "--output_dir", tmp_path / "p",
               "--total_episodes", "64", "--learning_rate", "0", "--critic_learning_rate", "0",
               "--num_eval_prompts", "8", "--generation_batch_size", "2")  # fewer rows a call than samples printed
    row = [r for r in read_metrics(tmp_path / "p") if "train/ratio" in r][0]
    assert row["train/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert row["train/approx_kl"] < 1e-8 and row["train/clipfrac"] == 0.0
    assert abs(row["train/kl"]) < 1e-5  # actor == reference: no KL at all


def test_demo_reward_rises(demo, tmp_path):
    # 8 iterations of 64 (the last 4 against the first 4); measured: the mean rises by ~1.7, 2.2 after 20 iterations
    run_script("ppo.py", "--actor", demo / "sft", "--reward", demo / "rm", "--output_dir", tmp_path / "p",
               "--total_episodes", "512", "--eval_every", "0", "--num_eval_prompts", "32")
    rows = read_metrics(tmp_path / "p")
    train = [r["train/reward"] for r in rows if "train/reward" in r]
    assert sum(train[-4:]) / 4 > sum(train[:4]) / 4 + 0.2, train
    assert rows[0]["step"] == 0 and "eval/gold" in rows[0] and "eval/kl" in rows[-1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "p")


def test_resume_after_sigkill_matches_an_uninterrupted_run(demo, few_prompts, tmp_path):
    """Kill a run (SIGKILL) right after its iteration-2 checkpoint, resume it, and reach the very same weights and
    metrics as a run that was never stopped (CPU, fixed seed: bit-exact; the adaptive KL coefficient goes on from
    the checkpoint's). Resumed with `--resume_changes kl_coef`, the new --kl_coef is the one used."""
    from conftest import kill_when
    from safetensors.torch import load_file

    common_args = ["--actor", demo / "sft", "--reward", demo / "rm", *few_prompts, "--total_episodes", "256",
                   "--eval_every", "0", "--save_every", "2", "--num_eval_prompts", "8", "--print_samples", "0",
                   "--adaptive_kl", "--target_kl", "0.1", "--kl_horizon", "100"]
    run_script("ppo.py", *common_args, "--output_dir", tmp_path / "a")
    out = tmp_path / "b"
    latest = out / "checkpoints" / "actor" / "latest"
    kill_when("ppo.py", *common_args, "--output_dir", out,
              ready=lambda: latest.exists() and latest.read_text().strip() == "iter2")
    assert not (out / "config.json").exists()  # killed before the end: no final model
    shutil.copytree(out, tmp_path / "c")
    run_script("ppo.py", *common_args, "--output_dir", out, "--resume")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    def strip(rows):  # wall-clock figures differ
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]

    assert strip(read_metrics(out)) == strip(read_metrics(tmp_path / "a"))
    coefs = [r["train/kl_coef"] for r in read_metrics(out) if "train/kl_coef" in r]
    assert coefs[2] != 0.05  # adapted (by 1 +- 0.2 x 64 / 100 an iteration): resumed as 0.05, the rows would differ
    run_script("ppo.py", *common_args, "--output_dir", tmp_path / "c", "--resume", "--resume_changes", "kl_coef",
               "--kl_coef", "0.2")
    assert [r["train/kl_coef"] for r in read_metrics(tmp_path / "c") if "train/kl_coef" in r][2] == 0.2


def test_ema_is_saved_and_follows_its_decay(demo, few_prompts, tmp_path):
    """--ema end to end at its two extremes: decay 1 keeps the initial (SFT) weights, decay 0 the final actor's."""
    from safetensors.torch import load_file

    flags = ["--actor", demo / "sft", "--reward", demo / "rm", *few_prompts, "--total_episodes", "64",
             "--eval_every", "0", "--num_eval_prompts", "8", "--print_samples", "0", "--ema"]
    for decay in ("1", "0"):
        run_script("ppo.py", *flags, "--ema_decay", decay, "--output_dir", tmp_path / decay)
    sft, final = load_file(demo / "sft" / "model.safetensors"), load_file(tmp_path / "0" / "model.safetensors")
    kept, last = (load_file(tmp_path / d / "ema" / "model.safetensors") for d in ("1", "0"))
    assert set(kept) == set(sft) == set(last)
    assert all(torch.equal(kept[k], sft[k]) for k in sft) and all(torch.equal(last[k], final[k]) for k in final)
    assert not all(torch.equal(final[k], sft[k]) for k in sft)  # the actor did move


@pytest.fixture(scope="module")
def rank_flags(demo, few_prompts, tmp_path_factory):
    """flags(stage, ranks): 32 answers an iteration in two shuffled mini-batches of 16, one micro-batch of 16 on 1
    rank, 8 on each of 2 ranks (a mean per micro-batch would differ from the global one), with PPO-ptx (its loss is
    a token-mean over the global ptx batch as well) on 64 of the demo's demonstrations."""
    import json

    ptx = tmp_path_factory.mktemp("ptx") / "ptx.jsonl"
    ptx.write_text("".join(json.dumps(r) + "\n" for r in common.toy.toy_data("sft", "train")[:64]))

    def flags(stage, ranks):
        n = 32 // ranks
        return ["--actor", demo / "sft", "--reward", demo / "rm", *few_prompts, "--total_episodes", "64",
                "--eval_every", "0", "--num_eval_prompts", "16", "--generation_batch_size", "16", "--ppo_epochs", "1",
                "--print_samples", "0", "--ptx_data", ptx, "--ptx_coef", "0.5", "--zero_stage", stage,
                "--rollout_batch_size", n, "--mini_batch_size", n // 2, "--per_device_batch_size", n // 2]

    return flags


@pytest.fixture(scope="module")
def one_rank_run(rank_flags, tmp_path_factory):
    """The 1-rank ZeRO-0 run that every 2-rank run below must reproduce."""
    out = tmp_path_factory.mktemp("ppo-one-rank") / "one"
    run_script("ppo.py", *rank_flags(0, 1), "--output_dir", out)
    return out


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_match_one_rank(rank_flags, one_rank_run, tmp_path, stage):
    """The same global batch gives the same run on 1 rank (ZeRO-0) and 2 ranks (ZeRO-0, ZeRO-2 with --offload,
    ZeRO-3). Every generate call is seeded by its place in the global batch, so both runs draw the same samples; the
    two mini-batches of an iteration are the same global rows however they are split (ppo.minibatches), so the
    updates must agree up to float reduction order. Tolerance 2e-3 relative: fp32 sums in a different order,
    compounded over 2 iterations (4 steps) of Adam (whose first steps move every weight by ~lr whatever the gradient's
    size)."""
    run_script("ppo.py", *rank_flags(stage, 2), "--output_dir", tmp_path / "two",
               *(["--offload"] if stage == 2 else []), ranks=2)
    one, two = read_metrics(one_rank_run), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 3 and "train/ptx_loss" in one[1]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            if k.startswith(("train/", "eval/")):
                assert b[k] == pytest.approx(a[k], rel=2e-3, abs=1e-4), (a["step"], k)


@pytest.fixture(scope="module")
def tiny_pair(tiny_models, tmp_path_factory):
    """A tiny llama actor and a reward model made from it (same tokenizer), plus a NaN-scoring reward model."""
    from transformers import AutoModelForSequenceClassification

    d = tmp_path_factory.mktemp("pair")
    tok = common.load_tokenizer(tiny_models["llama"])
    for name, poison in (("rm", False), ("nan_rm", True)):
        rm = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=1)
        if poison:
            torch.nn.init.constant_(rm.score.weight, float("nan"))
        rm.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


def assert_clean_error(p, out, *needles):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    line = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and all(n in line[0] for n in needles), p.stderr[-2000:]
    assert not (out / "config.json").exists()


def test_reward_tokenizer_mismatch_is_refused(tiny_models, tiny_pair, tmp_path):
    p = run_script("ppo.py", "--actor", tiny_models["gpt2"], "--reward", tiny_pair / "rm", "--data", "toy",
                   "--output_dir", tmp_path / "o", check=False)
    assert_clean_error(p, tmp_path / "o", "--reward", "--reward_tokenizer")
    assert not (tmp_path / "o").exists()


def main_error(*argv) -> str:
    """ppo.py's main in this process (no start-up of its own) on command-line flags: the message it stops with."""
    import tyro

    with pytest.raises(SystemExit) as stop:
        ppo.main(tyro.cli(ppo.Args, args=list(map(str, argv)), use_underscores=True))
    return str(stop.value.code)


def test_bad_flags_give_one_line_errors(tiny_models, tiny_pair, tmp_path):
    # the flags checked before any set-up, in this process: a UserError (SystemExit) whose message is one line
    for flags, needles in ((["--actor", tiny_models["llama"], "--zero_stage", "4"], ["--zero_stage 4"]),
                           (["--actor", tmp_path / "nope"], ["--actor", "no such model folder"])):
        message = main_error(*flags, "--reward", tiny_pair / "rm", "--output_dir", tmp_path / "o")
        assert message.startswith("error: ") and "\n" not in message and all(n in message for n in needles), message
        assert not (tmp_path / "o" / "config.json").exists()
    # as a user sees it, from a subprocess: one stderr line, no traceback, a non-zero exit
    p = run_script("ppo.py", "--actor", tiny_models["llama"], "--reward", tiny_pair / "rm", "--advantage_estimator",
                   "grpo", "--output_dir", tmp_path / "o", check=False)
    assert_clean_error(p, tmp_path / "o", "--samples_per_prompt 1", "needs at least 2")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"messages": [{"role": "assistant", "content": "b"}]}\n')
    p = run_script("ppo.py", "--actor", tiny_models["llama"], "--reward", tiny_pair / "rm", "--data", bad,
                   "--output_dir", tmp_path / "o", check=False)
    assert_clean_error(p, tmp_path / "o", "p.jsonl:2", "messages", "user turn")
    assert not (tmp_path / "o").exists()


def test_non_finite_reward_stops_before_any_update(tiny_models, tiny_pair, tmp_path):
    data = tmp_path / "p.jsonl"  # no held-out prompts: no step-0 evaluation, whose NaN would stop the run first
    data.write_text("".join(json.dumps({"prompt": f"tell me about {t}"}) + "\n" for t in common.toy.TOPICS))
    p = run_script("ppo.py", "--actor", tiny_models["llama"], "--reward", tiny_pair / "nan_rm", "--critic",
                   tiny_pair / "rm", "--total_episodes", "64", "--data", data, "--eval_fraction", "0",
                   "--output_dir", tmp_path / "o", check=False)
    assert_clean_error(p, tmp_path / "o", "step 1", "reward", "nan")
    assert not (tmp_path / "o" / "metrics.jsonl").exists() and not (tmp_path / "o" / "config.json").exists()


def negative_share(folder, prompts) -> float:
    """Share of negative words among the adjectives of sampled answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = [common.encode_prompt(tok, common.to_messages(p)) for p in prompts]
    batch = common.pad(ids, tok.pad_token_id, side="left")
    attn = common.pad([[1] * len(i) for i in ids], 0, side="left")
    torch.manual_seed(0)
    out = model.generate(input_ids=batch, attention_mask=attn, do_sample=True, top_k=0, max_new_tokens=16,
                         pad_token_id=tok.pad_token_id)
    words = " ".join(tok.batch_decode(out[:, batch.shape[1]:], skip_special_tokens=True)).split()
    neg, pos = sum(w in common.toy.NEGATIVE for w in words), sum(w in common.toy.POSITIVE for w in words)
    return neg / max(1, neg + pos)


def test_any_preference_file_moves_the_policy(demo, tmp_path):
    """Preferences the demo does not have, opposite to its gold score: pairs that prefer gloomy answers (the same
    answer with negative adjectives over positive ones). A reward model trained on that file must move the policy
    toward negative words."""
    rng = random.Random(0)
    rows = []
    for p in common.toy.toy_prompts("reward"):
        for _ in range(5):
            words = common.toy.toy_response(p, rng).split()
            gloomy = [rng.choice(common.toy.NEGATIVE) if w in common.toy.POSITIVE else w for w in words]
            sunny = [rng.choice(common.toy.POSITIVE) if w in common.toy.NEGATIVE else w for w in words]
            if gloomy != sunny:
                rows.append({"prompt": p, "chosen": " ".join(gloomy), "rejected": " ".join(sunny)})
    pairs = tmp_path / "gloomy.jsonl"
    pairs.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    # the learning rate of the demo's tiny models (a JSONL file gets the default for real models, 1e-5, under which
    # a 1M-parameter model barely learns the pairs and PPO exploits what little its reward model knows)
    run_script("reward.py", "--model", demo / "sft", "--data", pairs, "--output_dir", tmp_path / "rm",
               "--max_steps", "60", "--eval_every", "0", "--learning_rate", "5e-4")
    assert read_metrics(tmp_path / "rm")[-1]["eval/accuracy"] > 0.95
    # 8 iterations of 64 (measured after 20: a share of 0.40 -> 0.97)
    run_script("ppo.py", "--actor", demo / "sft", "--reward", tmp_path / "rm", "--output_dir", tmp_path / "p",
               "--total_episodes", "512", "--eval_every", "0", "--num_eval_prompts", "16")
    prompts = common.toy.toy_prompts("eval")[:64] * 2
    before, after = negative_share(demo / "sft", prompts), negative_share(tmp_path / "p", prompts)
    assert after > before + 0.25, (before, after)
    print(f"negative share {before:.2f} -> {after:.2f}")


def test_encode_prompts_encodes_a_repeated_prompt_like_the_first():
    tok = common.toy.toy_tokenizer()
    records = common.data.load_data("toy", "prompts")[:300]  # 300 draws from ~115 distinct prompts
    ids, _, kept = common.data.encode_prompts(records, tok, 488, "left", "toy")
    assert ids == [common.encode_prompt(tok, r["prompt"]) for r in records] and kept == records
    repeat = next(j for j in range(1, len(records)) if records[j]["prompt"] == records[0]["prompt"])
    assert ids[repeat] is not ids[0]  # rows never share a list


def test_the_arithmetic_task(tmp_path):
    """experiments/arithmetic.py: its reward reads the answer's last number; held-out pairs are never trained on."""
    fn = common.reward_fn.load(f"{ROOT}/experiments/arithmetic.py:reward")
    prompt = [{"role": "user", "content": "What is 13 + 4? Answer with just the number."}]
    answers = ["17", "13 + 4 = 17.", "13 + 4 = 18", "", "17 or 18", "-17"]
    assert fn([prompt] * len(answers), answers) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    subprocess.run([sys.executable, f"{ROOT}/experiments/arithmetic.py", str(tmp_path)], check=True)
    train, held = ({json.loads(line)["prompt"] for line in open(tmp_path / f"{s}.jsonl")} for s in ("train", "eval"))
    assert (len(train), len(held)) == (336, 64) and not train & held


def test_a_reward_function_cannot_escape(tmp_path, monkeypatch, capsys):
    """--reward_fn gets copies (its edits cannot change the stored prompts), a sys.exit() in it or at its import is
    the one-line error, and a slow call is named on stderr while it runs."""
    import time

    prompts, responses = [[{"role": "user", "content": "hi"}]], ["hello"]

    def edits(p, r):
        p[0][0]["content"] = "changed"
        r[0] = "changed"
        return [1.0]

    assert common.reward_fn.call(edits, "x:edits", prompts, responses, "cpu").tolist() == [1.0]
    assert prompts[0][0]["content"] == "hi" and responses == ["hello"]
    with pytest.raises(common.UserError, match=r"--reward_fn x:quits raised SystemExit: 0 \("):
        common.reward_fn.call(lambda p, r: sys.exit(0), "x:quits", prompts, responses, "cpu")
    (tmp_path / "rf.py").write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(common.UserError, match=r"loading .*rf.py raised SystemExit"):
        common.reward_fn.load(f"{tmp_path}/rf.py:f")
    monkeypatch.setattr(common.reward_fn, "SLOW_S", 0.05)
    common.reward_fn.call(lambda p, r: time.sleep(0.3) or [0.0], "x:slow", prompts, responses, "cpu")
    assert "note: --reward_fn x:slow has been running for 0.05 s on 1 responses" in capsys.readouterr().err
