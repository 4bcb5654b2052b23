"""Benchmark (not a test): peak memory and time of the log-probs of a micro-batch, the old path (the LM head over
every position and the log-softmax of the whole fp32 B x T x V logits) against common.logprobs.token_logprobs (the
head on the response positions alone, chunked, each chunk recomputed in backward).

A random Qwen2-shaped model (hidden 64, 2 layers) isolates the head: at real vocabularies it is most of the memory.
Each case runs in a fresh subprocess; its peak is the process's peak resident memory (VmHWM, reset just before the
pass) minus its resident memory just before, i.e. what the pass adds to the model and the batch. Time: the best of
the first pass and --repeats more, as wall-clock seconds and as CPU seconds of the process (all threads; steadier
than wall-clock on a shared machine). Prints one JSON line per case.

    python bench/logprobs.py                                   # vocab 151936 and 32000, new path only
    python bench/logprobs.py --paths old new --vocabs 151936   # the old path needs ~12 GiB here: run it alone
    python bench/logprobs.py --chunk_sizes 256 512 1024 2048 --passes score
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import ppo  # noqa: E402


@dataclass
class Bench:
    paths: list[str] = field(default_factory=lambda: ["new"])
    """old (the whole logits, as before) and/or new (common.logprobs.token_logprobs)"""
    vocabs: list[int] = field(default_factory=lambda: [151936, 32000])
    """vocabulary sizes (Qwen2's 151936; Llama 2's 32000)"""
    passes: list[str] = field(default_factory=lambda: ["score", "train"])
    """score: no autograd, with entropy (the rollout's old log-probs); train: forward + backward (the PPO update)"""
    chunk_sizes: list[int] = field(default_factory=lambda: [1024])
    """--logprob_chunk_size values of the new path"""
    batch: int = 8
    """rows in the micro-batch"""
    prompt: int = 512
    """prompt tokens per row"""
    response: int = 512
    """response tokens per row"""
    repeats: int = 2
    """timed passes after the first (the reported time is the best)"""
    threads: int = 0
    """torch threads in each case (0: torch's default)"""
    case: str = ""
    """internal: run one case (path,vocab,pass,chunk) in this process"""


def logprobs_from_logits(logits, tokens, temperature):
    """log pi(token) under softmax(logits / T), from the full logits (ppo.py's before common.logprobs)."""
    logits = logits.float() / temperature
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def entropy_from_logits(logits, temperature):
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def old_seq_logprobs(model, seq, attn, n_prompt, temperature, with_entropy=False):
    """ppo.seq_logprobs before common.logprobs.token_logprobs."""
    logits = model(input_ids=seq, attention_mask=attn, position_ids=common.position_ids(attn), use_cache=False).logits
    logits = logits[:, n_prompt - 1: -1]
    logp = logprobs_from_logits(logits, seq[:, n_prompt:], temperature)
    return (logp, entropy_from_logits(logits, temperature)) if with_entropy else logp


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_case(b: Bench):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path, vocab, pass_, chunk = b.case.split(",")
    vocab, chunk = int(vocab), int(chunk)
    if b.threads:
        torch.set_num_threads(b.threads)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=b.prompt + b.response))
    seq = torch.randint(0, vocab, (b.batch, b.prompt + b.response))
    attn = torch.ones_like(seq)
    weights = torch.randn(b.batch, b.response)

    def one_pass():
        if pass_ == "score":
            with torch.no_grad():
                if path == "old":
                    return old_seq_logprobs(model, seq, attn, b.prompt, 0.7, True)
                return ppo.seq_logprobs(model, seq, attn, b.prompt, 0.7, True, chunk)
        logp = old_seq_logprobs(model, seq, attn, b.prompt, 0.7) if path == "old" else \
            ppo.seq_logprobs(model, seq, attn, b.prompt, 0.7, chunk_size=chunk)
        (logp * weights).sum().backward()
        model.zero_grad(set_to_none=False)  # the gradient buffers stay, as an optimizer keeps them

    one_pass()  # gradient buffers allocated, lazy initialisation done
    base = rss()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    t0, c0 = time.perf_counter(), time.process_time()
    one_pass()
    times, cpu = [time.perf_counter() - t0], [time.process_time() - c0]
    peak = peak_rss() - base
    for _ in range(b.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        one_pass()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"path": path, "vocab": vocab, "pass": pass_, "chunk": chunk if path == "new" else None,
                      "peak_above_model_gib": round(peak / 2**30, 3), "time_s": round(min(times), 3),
                      "cpu_s": round(min(cpu), 3),
                      "model_gib": round(n_params * 4 / 2**30, 3), "threads": torch.get_num_threads()}), flush=True)


def main(b: Bench):
    if b.case:
        return run_case(b)
    for vocab in b.vocabs:
        for pass_ in b.passes:
            for path in b.paths:
                for chunk in b.chunk_sizes if path == "new" else [0]:
                    args = [sys.executable, __file__, "--case", f"{path},{vocab},{pass_},{chunk}", "--batch",
                            str(b.batch), "--prompt", str(b.prompt), "--response", str(b.response), "--repeats",
                            str(b.repeats), "--threads", str(b.threads)]
                    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS":
                                                                                  "ignore"})
                    out = [line for line in p.stdout.splitlines() if line.startswith("{")]
                    print(out[-1] if out else json.dumps({"case": args[3], "failed": p.stderr[-2000:]}), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Bench))
