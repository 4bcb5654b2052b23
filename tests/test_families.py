"""Every script end to end on tiny random models of five families (GPT-2, OPT, Llama, Qwen2, GPT-NeoX), through the
JSONL data path: tokenizers without a pad token, with a BOS, with BOS == EOS (OPT) and with a chat template (Qwen2),
so padding, EOS, score-token and value-head code is exercised for each."""

import json
import math

import pytest
import torch
from conftest import FAMILIES, read_metrics, run_script

import common
import common.toy


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    sft = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]}
           for r in common.toy.toy_data("sft", "train")[:96]]
    pairs = [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"], "rejected": r["rejected"]}
             for r in common.toy.toy_data("pairs", "train")[:96]]
    prompts = [{"prompt": p} for p in common.toy.toy_prompts("ppo")[:64]]
    return {"sft": write_jsonl(d / "sft.jsonl", sft), "pairs": write_jsonl(d / "pairs.jsonl", pairs),
            "prompts": write_jsonl(d / "prompts.jsonl", prompts)}


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline(family, tiny_models, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    sft, rm, out = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    run_script("sft.py", "--model", tiny_models[family], "--data", data["sft"], "--output_dir", sft,
               "--max_steps", "4", "--per_device_batch_size", "8", "--eval_every", "0")
    tok, base_tok = AutoTokenizer.from_pretrained(sft), AutoTokenizer.from_pretrained(tiny_models[family])
    assert tok.get_vocab() == base_tok.get_vocab() and tok.pad_token == base_tok.pad_token  # None stays None
    vocab = AutoModelForCausalLM.from_pretrained(tiny_models[family]).get_input_embeddings().weight.shape[0]
    run_script("reward.py", "--model", sft, "--data", data["pairs"], "--output_dir", rm, "--max_steps", "4",
               "--per_device_batch_size", "8", "--eval_every", "0")
    reward = AutoModelForSequenceClassification.from_pretrained(rm)
    assert reward.config.pad_token_id == tok.pad_token_id and reward.config.num_labels == 1
    assert AutoTokenizer.from_pretrained(rm).get_vocab() == base_tok.get_vocab()
    run_script("ppo.py", "--actor", sft, "--reward", rm, "--data", data["prompts"], "--output_dir", out,
               "--total_episodes", "32", "--rollout_batch_size", "16", "--per_device_batch_size", "8",
               "--max_new_tokens", "8", "--num_eval_prompts", "4", "--save_critic")
    rows = read_metrics(out)
    assert rows[0]["step"] == 0 and all(math.isfinite(v) for v in rows[-1].values())
    assert 1 <= rows[-1]["train/response_len"] <= 8
    model = AutoModelForCausalLM.from_pretrained(out)
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    for m in (model, critic, reward):  # every stage's output has the base model's vocabulary
        assert m.get_input_embeddings().weight.shape[0] == vocab and m.config.vocab_size == vocab
    assert AutoTokenizer.from_pretrained(out).get_vocab() == base_tok.get_vocab()
    ids = torch.tensor([common.encode_prompt(tok, common.to_messages("tell me about cats"))])
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=common.pad_id(tok))
    assert gen.shape[1] > ids.shape[1]
    # chat.py's main in this process (its command line is tested in test_chat.py): it answers without an error
    import chat
    import tyro
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        chat.main(tyro.cli(chat.Args, args=["--model", str(out), "--prompt", "tell me about cats", "--max_new_tokens",
                                            "8", "--greedy"], use_underscores=True))
    finally:  # chat silences transformers' logging for good: give this process its own back
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
