"""--dtype bf16 as a tested path on the CPU: sft -> reward -> ppo -> chat, scoring and training agreeing at learning
rate 0, and the value head, rewards, advantages and losses in fp32."""

import json

import pytest
import torch
from conftest import read_metrics, run_script

import common.engines
import ppo


def test_value_head_computes_in_fp32_on_a_bf16_body():
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).bfloat16()
    values = common.engines.ValueModel(model)
    ids = torch.randint(1, 64, (3, 9))
    attn = torch.ones_like(ids)
    out = values(ids, attn)
    assert out.dtype == torch.float32 and model.score.weight.dtype == torch.bfloat16  # weights untouched
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    reference = sum(hidden[..., i].double() * model.score.weight[0, i].double() for i in range(32))  # fp64 dot
    assert torch.allclose(out.double(), reference, atol=1e-5)
    bf16_head = torch.nn.functional.linear(hidden, model.score.weight).squeeze(-1)  # what HF computes
    assert (bf16_head.double() - reference).abs().max() > 1e-4  # so the check above can tell the difference


def test_rollout_math_is_fp32_for_bf16_inputs():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    lengths = mask.sum(1)
    logp, ref = torch.randn(2, 3).bfloat16(), torch.randn(2, 3).bfloat16()
    rewards, kl = ppo.compute_rewards(torch.randn(2), logp, ref, mask, lengths, 0.05)
    adv, ret = ppo.gae(rewards, torch.randn(2, 3).bfloat16(), mask, 1.0, 0.95)
    assert {rewards.dtype, kl.dtype, adv.dtype, ret.dtype, ppo.masked_whiten(adv, mask).dtype} == {torch.float32}


def test_bf16_pipeline_end_to_end(tiny_models, tmp_path):
    """A tiny Llama through every stage in bf16 (bf16 runs slowly on CPUs without bf16 units: a few steps each)."""
    import common

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    sft_data = write("sft.jsonl", common.toy.toy_data("sft", "train")[:40])
    pairs = write("pairs.jsonl", common.toy.toy_data("pairs", "train")[:40])
    prompts = write("prompts.jsonl", common.toy.toy_data("prompts", "train")[:24])
    bf16 = ["--dtype", "bf16", "--eval_every", "0", "--per_device_batch_size", "8"]
    run_script("sft.py", *bf16, "--model", tiny_models["llama"], "--data", sft_data, "--eval_fraction", "0.2",
               "--output_dir", tmp_path / "sft", "--max_steps", "4", "--learning_rate", "3e-3")
    run_script("reward.py", *bf16, "--model", tmp_path / "sft", "--data", pairs, "--eval_fraction", "0.2",
               "--output_dir", tmp_path / "rm", "--max_steps", "4")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["reward_std"] > 0
    # learning rate 0: the training forward must see exactly the distribution that scored the rollout
    run_script("ppo.py", *bf16, "--actor", tmp_path / "sft", "--reward", tmp_path / "rm", "--data", prompts,
               "--eval_fraction", "0.34", "--output_dir", tmp_path / "ppo", "--total_episodes", "16",
               "--rollout_batch_size", "16", "--ppo_epochs", "2", "--learning_rate", "0",
               "--critic_learning_rate", "0", "--max_new_tokens", "12")
    rows = read_metrics(tmp_path / "ppo")
    (train,) = [r for r in rows if "train/ratio" in r]
    assert train["train/ratio"] == pytest.approx(1.0, abs=1e-3), train
    assert train["train/clipfrac"] < 0.01 and train["train/approx_kl"] < 1e-4, train
    assert abs(train["train/kl"]) < 1e-3, train  # actor == reference
    assert all(v == v and abs(v) != float("inf") for r in rows for v in r.values())  # finite, no NaN
    p = run_script("chat.py", "--dtype", "bf16", "--model", tmp_path / "ppo", "--prompt", "tell me about cats",
                   "--greedy", "--max_new_tokens", "8")
    assert p.stdout.strip()
