"""common.logprobs.token_logprobs (chunked LM head, only at the scored positions) against the straightforward
implementation it replaced, kept here as the slow reference: whole fp32 logits, log-softmax over all of them."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, ROOT, make_model, make_tokenizer, script_env

import common
import common.logprobs
import ppo
import sft


def ref_seq_logprobs(model, seq, attn, n_prompt, temperature, with_entropy=False):
    """ppo.seq_logprobs before chunking: the head over every position, log-softmax of the whole fp32 logits."""
    logits = model(input_ids=seq, attention_mask=attn, position_ids=common.position_ids(attn), use_cache=False).logits
    logits = logits[:, n_prompt - 1: -1].float() / temperature
    logp = torch.gather(logits, -1, seq[:, n_prompt:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    full = torch.log_softmax(logits, -1)
    return (logp, -(full.exp() * full).sum(-1)) if with_entropy else logp


def ref_token_nll(model, batch):
    """sft.token_nll before chunking."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=common.position_ids(batch["attention_mask"]), use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:],
                                            reduction="none")
    mask = batch["loss_mask"][:, 1:]
    return (nll * mask).sum(), mask.sum()


def rollout_batch(vocab: int, pad: int, seed: int = 0):
    """3 rows of left-padded prompts (width 6) + right-padded responses (width 7), as ppo.generate returns them."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, vocab, (3, 13), generator=g)
    attn = torch.ones_like(seq)
    for b, (n_p, n_r) in enumerate([(6, 7), (2, 4), (4, 1)]):
        attn[b, : 6 - n_p] = 0
        attn[b, 6 + n_r:] = 0
    return seq.masked_fill(attn == 0, pad), attn


def sft_batch(vocab: int, pad: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    rows = [(torch.randint(3, vocab, (n,), generator=g).tolist(), [t >= k for t in range(n)])
            for n, k in [(11, 4), (5, 2), (8, 8)]]  # the last row has no trained token
    return sft.collate(rows, pad, "cpu")


def grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(got: dict, want: dict):
    assert got.keys() == want.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.fixture(scope="module")
def models() -> dict:
    out = {}
    for family in FAMILIES:
        tok = make_tokenizer(family)
        out[family] = (make_model(family, tok), tok.pad_token_id if tok.pad_token_id is not None else 0)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_seq_logprobs_entropy_and_gradients_match_reference(models, family):
    model, pad = models[family]
    seq, attn = rollout_batch(model.config.vocab_size, pad)
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want_lp, want_ent = ref_seq_logprobs(model, seq, attn, 6, 0.7, with_entropy=True)
        for chunk in (1, 4, 21, 1024):  # chunks cross rows; the last is one chunk for all
            lp, ent = ppo.seq_logprobs(model, seq, attn, 6, 0.7, with_entropy=True, chunk_size=chunk)
            torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=0)
            torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)
    (ref_seq_logprobs(model, seq, attn, 6, 0.7) * weights).sum().backward()
    want = grads(model)
    (ppo.seq_logprobs(model, seq, attn, 6, 0.7, chunk_size=4) * weights).sum().backward()
    assert_grads_close(grads(model), want)
    # with autograd and the entropy (ppo.py's one forward for the rollout and the update): the same figures, and the
    # gradients of the log-probs alone and of log-probs and entropy together (a fork's entropy bonus)
    ent_weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(3))
    ref_lp, ref_ent = ref_seq_logprobs(model, seq, attn, 6, 0.7, with_entropy=True)
    ((ref_lp * weights).sum() + (ref_ent * ent_weights).sum()).backward()
    want_both = grads(model)
    lp, ent = ppo.seq_logprobs(model, seq, attn, 6, 0.7, with_entropy=True, chunk_size=4)
    torch.testing.assert_close(lp.detach(), want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.detach(), want_ent, atol=1e-5, rtol=0)
    (lp * weights).sum().backward(retain_graph=True)
    assert_grads_close(grads(model), want)
    ((lp * weights).sum() + (ent * ent_weights).sum()).backward()
    assert_grads_close(grads(model), want_both)


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_and_ptx_loss_and_gradients_match_reference(models, family):
    model, pad = models[family]
    batch = sft_batch(model.config.vocab_size, pad)
    want_nll, want_n = ref_token_nll(model, batch)
    want_nll.backward()
    want = grads(model)
    nll, n = sft.token_nll(model, batch, chunk_size=3)
    assert n.item() == want_n.item() == 7 + 3
    assert nll.item() == pytest.approx(want_nll.item(), abs=1e-5)
    nll.backward()
    assert_grads_close(grads(model), want)
    rows = [(ids.tolist()[: int(a.sum())], m.tolist()[: int(a.sum())])
            for ids, m, a in zip(batch["input_ids"], batch["loss_mask"], batch["attention_mask"])]
    ptx = ppo.ptx_nll(model, rows, pad, "cpu", chunk_size=5)
    assert ptx.item() == pytest.approx(want_nll.item(), abs=1e-5)
    ptx.backward()
    assert_grads_close(grads(model), want)


def test_no_trained_token_gives_zero_loss_that_backpropagates(models):
    model, pad = models["llama"]
    batch = sft_batch(model.config.vocab_size, pad)
    batch["loss_mask"][:] = False
    nll, n = sft.token_nll(model, batch)
    assert nll.item() == 0.0 and n.item() == 0 and nll.requires_grad
    nll.backward()  # what engine.backward needs: a scalar with a graph


@pytest.mark.parametrize("script", [sft, ppo])
def test_bad_chunk_size_is_a_one_line_error_that_writes_nothing(script, tmp_path):
    with pytest.raises(SystemExit, match="--logprob_chunk_size 0: expected >= 1"):
        script.main(script.Args(logprob_chunk_size=0, output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_head_forward_restored(models):
    model, pad = models["gpt2"]
    seq, attn = rollout_batch(model.config.vocab_size, pad)
    head = model.get_output_embeddings()
    ppo.seq_logprobs(model, seq, attn, 6, 1.0)
    assert "forward" not in head.__dict__
    with pytest.raises(IndexError):  # a failure inside the forward still puts the head back
        ppo.seq_logprobs(model, seq.clamp(max=10 ** 6) + 10 ** 6, attn, 6, 1.0)
    assert "forward" not in head.__dict__


def test_lora_with_adapter_on_the_head_and_disabled(models):
    from peft import LoraConfig, get_peft_model

    base, pad = models["qwen2"]
    import copy

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # peft starts B at 0 (a no-op adapter): make it matter
                p.normal_(0, 0.1)
    seq, attn = rollout_batch(base.config.vocab_size, pad)
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(3))
    (ref_seq_logprobs(model, seq, attn, 6, 1.3) * weights).sum().backward()
    want = grads(model)
    assert any("lm_head" in n for n in want)
    lp = ppo.seq_logprobs(model, seq, attn, 6, 1.3, chunk_size=5)
    (lp * weights).sum().backward()
    assert_grads_close(grads(model), want)
    with torch.no_grad(), model.disable_adapter():
        off = ppo.seq_logprobs(model, seq, attn, 6, 1.3, chunk_size=5)
        torch.testing.assert_close(off, ref_seq_logprobs(base, seq, attn, 6, 1.3), atol=1e-5, rtol=0)
    assert (off - lp).abs().max() > 1e-3  # the adapter mattered


def test_head_with_bias_and_frozen_head(models):
    """The linear-head autograd Function with a bias, and with a frozen head (only the body trained)."""
    import copy

    base, pad = models["llama"]
    model = copy.deepcopy(base)
    torch.manual_seed(4)
    model.lm_head = torch.nn.Linear(64, base.config.vocab_size, bias=True)
    seq, attn = rollout_batch(base.config.vocab_size, pad)
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(5))
    for frozen in (False, True):
        model.lm_head.requires_grad_(not frozen)
        (ref_seq_logprobs(model, seq, attn, 6, 0.9) * weights).sum().backward()
        want = grads(model)
        assert ("lm_head.bias" in want) != frozen
        (ppo.seq_logprobs(model, seq, attn, 6, 0.9, chunk_size=4) * weights).sum().backward()
        assert_grads_close(grads(model), want)


def test_models_that_transform_logits_take_the_plain_path():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=2.0))
    seq, attn = rollout_batch(97, 0)
    lp, ent = ppo.seq_logprobs(model, seq, attn, 6, 0.7, with_entropy=True, chunk_size=4)
    want_lp, want_ent = ref_seq_logprobs(model, seq, attn, 6, 0.7, with_entropy=True)
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)


ZERO3 = """
import torch, deepspeed
from conftest import make_model, make_tokenizer  # puts the repo on sys.path
import common, ppo, sft
from test_logprobs import ref_seq_logprobs, ref_token_nll, rollout_batch, sft_batch

common.init_distributed()
tok = make_tokenizer("{family}")
model = make_model("{family}", tok)
config = common.ds_config(3, 3, 1, torch.float32, grad_clip=0.0)
opt = torch.optim.AdamW(model.parameters(), lr=0.0)
engine = deepspeed.initialize(model=model, optimizer=opt, config=config)[0]
seq, attn = rollout_batch(model.config.vocab_size, 0)
batch = sft_batch(model.config.vocab_size, 0)
weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
with torch.no_grad():
    got, want = ppo.seq_logprobs(engine, seq, attn, 6, 0.7, True, 4), ref_seq_logprobs(engine, seq, attn, 6, 0.7, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)

def full_grads(loss):
    engine.backward(loss)
    out = [deepspeed.utils.safe_get_full_grad(p).clone() for p in engine.module.parameters()]
    engine.step()
    return out

for new, ref in [(lambda: (ppo.seq_logprobs(engine, seq, attn, 6, 0.7, chunk_size=4) * weights).sum(),
                  lambda: (ref_seq_logprobs(engine, seq, attn, 6, 0.7) * weights).sum()),
                 (lambda: sft.token_nll(engine, batch, 3)[0], lambda: ref_token_nll(engine, batch)[0])]:
    want = full_grads(ref())
    got = full_grads(new())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
print("ok", len(want))
"""


def test_zero3_forward_and_gradients_match_reference():
    """One rank of ZeRO-3 (parameters partitioned; the head gathered by DeepSpeed's hooks for the chunked head's
    forward and for the recomputation in backward), in a subprocess so the process group stays out of pytest."""
    code = textwrap.dedent(ZERO3).format(family="gpt2")  # GPT-2: a head tied to the input embedding
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", env=script_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout[-3000:] + p.stderr[-5000:]
