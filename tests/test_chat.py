"""chat.py: the interactive loop through stdin, the one-prompt mode's exact stdout, history truncation by whole
turns, batch mode, and the win-rate arithmetic."""

import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_script

import chat
import common


def test_interactive_loop_through_stdin(demo):
    script = "tell me about cats\nand dogs ?\n/reset\ndescribe tea\n/quit\nnever read\n"
    p = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(demo / "sft"), "--greedy"],
                       input=script, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    assert out.count("bot> ") == 3 and "(history cleared)" in out
    answers = [line.split("bot> ", 1)[1] for line in out.splitlines() if "bot> " in line]
    # after /reset the history is empty: the third answer is the greedy answer to "describe tea" alone
    alone = run_script("chat.py", "--model", demo / "sft", "--prompt", "describe tea", "--greedy").stdout
    assert answers[2].strip() == alone.strip()
    # Ctrl-D (end of input) leaves cleanly too
    p = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(demo / "sft")], input="hi\n",
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.count("bot> ") == 1


def test_single_prompt_prints_exactly_the_answer(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = run_script("chat.py", "--model", demo / "sft", "--prompt", "tell me about cats", "--greedy",
                   "--max_new_tokens", "20")
    tok, model = AutoTokenizer.from_pretrained(demo / "sft"), AutoModelForCausalLM.from_pretrained(demo / "sft")
    ids = torch.tensor([common.encode_prompt(tok, common.to_messages("tell me about cats"))])
    out = model.generate(ids, do_sample=False, max_new_tokens=20, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    expect = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert p.stdout == expect + "\n"


def fit_reference(tokenizer, messages, budget):
    """Drop exchanges from the front, one user turn (and what follows it up to the next user turn) at a time."""
    while True:
        if len(common.encode_prompt(tokenizer, messages)) <= budget or len(messages) == 1:
            return messages
        nxt = [i for i in range(1, len(messages)) if messages[i]["role"] == "user"]
        messages = messages[nxt[0]:] if nxt else messages[-1:]


def test_history_truncation_keeps_whole_turns():
    tok = common.toy_tokenizer()
    rng = random.Random(0)
    msgs = []
    for i in range(6):
        p = rng.choice(common.toy_prompts("eval"))
        msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": common.toy_response(p, rng)}]
    msgs.append({"role": "user", "content": "tell me about cats"})
    full = len(common.encode_prompt(tok, msgs))
    for budget in (5, 30, 60, full // 2, full - 1, full):
        got = chat.fit_history(tok, msgs, budget)
        assert got == fit_reference(tok, msgs, budget)
        assert got[0]["role"] == "user" and got[-1] == msgs[-1] and got == msgs[len(msgs) - len(got):]
        assert len(common.encode_prompt(tok, got)) <= budget or len(got) == 1
    system = [{"role": "system", "content": "be kind"}]
    assert chat.fit_history(tok, system + msgs, 40)[0] == system[0]


def test_win_rate_against_reference():
    a, b = [1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.1]
    assert chat.win_rate(a, b) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    rng = random.Random(1)
    x, y = [rng.randint(0, 3) for _ in range(100)], [rng.randint(0, 3) for _ in range(100)]
    ref = (sum(i > j for i, j in zip(x, y)) + 0.5 * sum(i == j for i, j in zip(x, y))) / 100
    assert chat.win_rate(x, y) == pytest.approx(ref)


def test_batch_mode_and_compare_with_reward(demo, tmp_path):
    prompts = ["tell me about cats", "describe tea", "hey , describe soup"]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "a.jsonl"
    run_script("chat.py", "--model", demo / "sft", "--prompts", src, "--output", out, "--batch_size", "2")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and all(r["response"] for r in rows)
    p = run_script("chat.py", "--model", demo / "sft", "--compare", demo / "sft", "--reward", demo / "rm",
                   "--prompts", "toy", "--greedy", "--max_new_tokens", "16")
    # the same model greedily against itself: every prompt is a tie, so the win rate is exactly 0.5
    assert "win rate 0.500 (n=" in p.stdout and "mean gold" in p.stdout, p.stdout[-500:]
