"""Defaults that fit: a default that conflicts with the model or another flag adapts (and says so once on stderr);
a conflict between two flags the user set stays a one-line error."""

import json

import pytest
from conftest import make_tokenizer, run_script

import common
import common.flags
import common.toy
import ppo


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A tiny Llama with a 128-token context: a causal LM and a reward model (sequence classifier) beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    d = tmp_path_factory.mktemp("ctx128")
    tok = make_tokenizer("llama")
    tok.add_special_tokens({"pad_token": "<pad>"})
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d / "lm")
    cfg.num_labels = 1
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(d / "rm")
    for sub in ("lm", "rm"):
        tok.save_pretrained(d / sub)
    return d


def test_model_context_and_max_seq_len(short_context, capsys):
    assert common.flags.model_context(str(short_context / "lm")) == 128
    assert common.flags.model_context("toy") == common.toy.TOY_CONTEXT
    assert common.flags.fit_max_seq_len(None, 128) == 128 and "--max_seq_len 128" in capsys.readouterr().err
    assert common.flags.fit_max_seq_len(None, 4096) == 512 and capsys.readouterr().err == ""
    assert common.flags.fit_max_seq_len(None, None) == 512
    assert common.flags.fit_max_seq_len(100, 128) == 100
    with pytest.raises(common.UserError, match="--max_seq_len 300 is longer than the model's context of 128"):
        common.flags.fit_max_seq_len(300, 128)


def test_micro_batch_fits_small_data(capsys):
    assert common.flags.fit_micro_batch(None, 1000, 2, "examples") == 16 and capsys.readouterr().err == ""
    assert common.flags.fit_micro_batch(None, 20, 2, "examples") == 10 and "--per_device_batch_size 10" in \
        capsys.readouterr().err
    assert common.flags.fit_micro_batch(None, 1, 2, "pairs") == 1
    assert common.flags.fit_micro_batch(4, 1, 2, "pairs") == 4  # set by the user: kept (main reports the conflict)


@pytest.mark.parametrize("rollout,mini,micro,gas,expect", [
    (64, 0, None, 1, (16, 16)),   # the defaults
    (8, 0, None, 1, (8, 8)),      # --rollout_batch_size 8 alone
    (24, 0, None, 1, (12, 12)),
    (7, 0, None, 1, (7, 7)),
    (64, 32, None, 1, (16, 32)),  # --mini_batch_size set: micro divides it
    (24, 24, None, 1, (12, 24)),
    (32, 0, None, 4, (8, 32)),    # --gradient_accumulation_steps 4: micro x 4 divides the rollout
    (64, 0, 4, 1, (4, 4)),        # everything set by the user is kept
])
def test_ppo_batch_sizes_adapt_to_what_the_user_set(rollout, mini, micro, gas, expect):
    args = ppo.Args(rollout_batch_size=rollout, mini_batch_size=mini, per_device_batch_size=micro,
                    gradient_accumulation_steps=gas)
    got = common.flags.fit_batch_sizes(args)
    assert got == expect
    assert got[1] % got[0] == 0 and rollout % got[1] == 0


def test_ppo_and_chat_run_on_a_128_token_model_with_defaults(short_context, tmp_path):
    lm, rm = short_context / "lm", short_context / "rm"
    p = run_script("ppo.py", "--actor", lm, "--reward", rm, "--rollout_batch_size", "8", "--total_episodes", "8",
                   "--output_dir", tmp_path / "ppo")
    assert "--per_device_batch_size 8" in p.stderr and "--max_seq_len 128" in p.stderr
    assert json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "tell me about cats " * 20}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    p = run_script("chat.py", "--model", lm, "--prompts", prompts, "--output", tmp_path / "a.jsonl")
    assert "answers of up to 64 tokens" in p.stderr
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows)
    # two flags the user set that conflict stay an error
    p = run_script("ppo.py", "--actor", lm, "--reward", rm, "--rollout_batch_size", "8", "--per_device_batch_size",
                   "16", "--output_dir", tmp_path / "bad", check=False)
    assert p.returncode == 1
    assert "\nerror: --rollout_batch_size 8 x --samples_per_prompt 1 must be a multiple" in p.stderr
