"""chat.py: the interactive loop through stdin, the one-prompt mode's exact stdout, batch mode (in order, and the
same answers as one prompt at a time), history truncation by whole turns, the win-rate arithmetic, and compare +
reward mode against scores recomputed here."""

import functools
import io
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, ROOT

import chat
import common
import common.data
import common.toy

MAX_NEW = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and two threads spin against each other when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """The demo model trained for a few steps (it answers in demo words and stops at EOS), saved after 40 steps
    (`early`) and 80 (`policy`), and a tiny GPT-2 reward model (absolute positions: padding mistakes show)."""
    from transformers import AutoModelForSequenceClassification, GPT2Config

    d = tmp_path_factory.mktemp("chat")
    tok = common.toy.toy_tokenizer()
    torch.manual_seed(0)
    model = common.toy.toy_model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data, rng = common.data.load_data("toy", "sft"), random.Random(0)
    for step in range(1, 81):
        rows = [common.encode_conversation(tok, r["messages"])[0] for r in rng.sample(data, 16)]
        ids, attn = common.pad(rows, tok.pad_token_id), common.pad([[1] * len(r) for r in rows], 0)
        model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(attn == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
        if step in (40, 80):
            model.save_pretrained(d / ("early" if step == 40 else "policy"))
            tok.save_pretrained(d / ("early" if step == 40 else "policy"))
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    cfg.reward_mean, cfg.reward_std = 0.25, 2.0
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(d / "rm")
    tok.save_pretrained(d / "rm")
    return {k: str(d / k) for k in ("policy", "early", "rm")}


@functools.cache
def plain(folder: str, reward: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    return AutoTokenizer.from_pretrained(folder), cls.from_pretrained(folder).eval()


def greedy(folder: str, messages: list[dict]) -> str:
    """The reference answer: plain transformers, one unpadded prompt in the training format."""
    tok, model = plain(folder)
    ids = torch.tensor([common.encode_prompt(tok, messages)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def run_chat(*args, stdin: str = "") -> subprocess.CompletedProcess:
    """chat.py as a user runs it (one thread: two spin against each other when the CPU is shared)."""
    p = subprocess.run([sys.executable, str(ROOT / "chat.py"), *map(str, args)], input=stdin, capture_output=True,
                       text=True, timeout=180, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def untied_copy(folder: str, dest) -> str:
    """The model with an output layer of its own: a random model with tied embeddings only repeats its last token
    (often a space), which would make the padding test compare empty answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.randn_like(head.weight))
    model.config.tie_word_embeddings = False
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(folder).save_pretrained(dest)
    return str(dest)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_interactive_loop_through_stdin(ckpts):
    u1, u2 = "tell me about cats", "hey , describe winter"
    script = f"{u1}\n{u2}\n/reset\n{u2}\n/quit\nnever answered\n"
    p = run_chat("--model", ckpts["policy"], "--greedy", "--max_new_tokens", MAX_NEW, stdin=script)
    chunks = p.stdout.split("bot> ")
    answers = [c.split("\nyou> ")[0].strip() for c in chunks[1:]]
    assert len(answers) == 3 and "(history cleared)" in chunks[2], p.stdout  # /quit: the last line is not read
    a1 = greedy(ckpts["policy"], [user(u1)])
    a2 = greedy(ckpts["policy"], [user(u1), bot(a1), user(u2)])
    assert answers == [a1, a2, greedy(ckpts["policy"], [user(u2)])]  # the third one saw no history
    # the checks can tell: the history changes the answer, so a kept or a lost history would show
    assert a2 != answers[2] != greedy(ckpts["policy"], [user(u1), bot(a1), user(u2), bot(a2), user(u2)])


def test_interactive_end_of_input_and_a_long_history(ckpts, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("tell me about cats\n\n/reset\n"))  # then Ctrl-D
    chat.main(chat.Args(model=ckpts["policy"], greedy=True, max_new_tokens=MAX_NEW))
    out = capsys.readouterr().out
    assert out.count("bot> ") == 1 and out.count("you> ") == 4 and "(history cleared)" in out
    # a context of 30 prompt tokens holds about two exchanges: older ones are dropped, and the chat goes on
    monkeypatch.setattr(sys, "stdin", io.StringIO("describe tea\n" * 4))
    chat.main(chat.Args(model=ckpts["policy"], greedy=True, max_new_tokens=MAX_NEW, max_context=MAX_NEW + 30))
    out, err = capsys.readouterr()
    assert out.count("bot> ") == 4 and "(dropped the oldest turns to fit 30 tokens)" in err


def test_single_prompt_prints_exactly_the_answer(ckpts):
    p = run_chat("--model", ckpts["policy"], "--prompt", "tell me about cats", "--greedy", "--max_new_tokens", MAX_NEW)
    expect = greedy(ckpts["policy"], [user("tell me about cats")])
    assert expect and p.stdout == expect + "\n"


def fit_reference(tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """Try every suffix that starts at a user turn, longest first, behind the system message if there is one;
    else the last user turn alone."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"]
    for i in starts:
        if len(common.encode_prompt(tokenizer, system + messages[i:])) <= budget:
            return system + messages[i:]
    return system + messages[starts[-1]:]


def test_history_truncation_keeps_whole_turns():
    tok = common.toy.toy_tokenizer()
    rng = random.Random(0)
    msgs = []
    for _ in range(6):
        p = rng.choice(common.toy.toy_prompts("eval"))
        msgs += [user(p), bot(common.toy.toy_response(p, rng))]
    msgs.append(user("tell me about cats"))
    full = len(common.encode_prompt(tok, msgs))
    for budget in (3, 30, 60, full // 2, full - 1, full):
        got = chat.fit_history(tok, msgs, budget)
        assert got == fit_reference(tok, msgs, budget)
        assert got[0]["role"] == "user" and got == msgs[len(msgs) - len(got):]
    assert len(chat.fit_history(tok, msgs, full - 1)) == len(msgs) - 2  # one whole exchange dropped
    system = [{"role": "system", "content": "be kind"}]
    for budget in (10, 40, 80):
        assert chat.fit_history(tok, system + msgs, budget) == fit_reference(tok, system + msgs, budget)


def test_win_rate_against_reference():
    assert chat.win_rate([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    rng = random.Random(1)
    a, b = [rng.randint(0, 3) for _ in range(200)], [rng.randint(0, 3) for _ in range(200)]
    wins = ties = 0
    for x, y in zip(a, b):
        wins += x > y
        ties += x == y
    assert chat.win_rate(a, b) == pytest.approx((wins + ties / 2) / 200)


@pytest.mark.parametrize("family", ["toy"] + FAMILIES)
def test_batch_mode_in_order_and_same_as_one_at_a_time(family, ckpts, tiny_models, tmp_path, capsys):
    folder = ckpts["policy"] if family == "toy" else untied_copy(tiny_models[family], tmp_path / "model")
    prompts = ["tell me about cats", "hey , describe soup please , in a few words", "tea ?"]
    src, out = tmp_path / "p.jsonl", tmp_path / "a.jsonl"
    multi = [user("describe tea"), bot("tea is warm ."), user("and coffee ?")]
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts) + json.dumps({"messages": multi}))
    args = dict(model=folder, greedy=True, max_new_tokens=8)
    chat.main(chat.Args(prompts=str(src), output=str(out), batch_size=3, **args))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts + [multi]
    capsys.readouterr()
    for p in prompts:  # left padding, KV cache and batching leave each greedy answer as it is alone
        chat.main(chat.Args(prompt=p, **args))
    assert capsys.readouterr().out == "".join(r["response"] + "\n" for r in rows[:3])
    assert all(r["response"] for r in rows)


def test_compare_and_reward(ckpts, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    chat.main(chat.Args(model=ckpts["policy"], compare=ckpts["early"], reward=ckpts["rm"], prompts="toy",
                        output=str(out), greedy=True, max_new_tokens=MAX_NEW))
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = common.toy.toy_prompts("eval")
    assert [r["prompt"] for r in rows] == prompts
    # rw_eval: the logit at the last token of prompt + answer + EOS, one unpadded row at a time
    tok, rm = plain(ckpts["rm"], reward=True)
    for r in rows[:6]:
        for key in ("", "_compare"):
            answer = tok(r["response" + key], add_special_tokens=False)["input_ids"]
            ids = common.encode_prompt(tok, [user(r["prompt"])]) + answer + [tok.eos_token_id]
            ref = rm(torch.tensor([ids])).logits[0, 0].item()
            assert r["reward" + key] == pytest.approx(ref, abs=1e-4)
            assert r["gold" + key] == common.toy.gold_score(r["prompt"], r["response" + key])
    win = {k: chat.win_rate([r[k] for r in rows], [r[k + "_compare"] for r in rows]) for k in ("reward", "gold")}
    assert (f"win rate of {ckpts['policy']} over {ckpts['early']}: reward {win['reward']:.2f} (n={len(prompts)}), "
            f"gold {win['gold']:.2f}") in printed.splitlines()
    assert "normalises with mean 0.250, std 2.000" in printed
    # printed side by side when there is no --output
    chat.main(chat.Args(model=ckpts["policy"], compare=ckpts["early"], reward=ckpts["rm"], prompt="describe tea",
                        greedy=True, max_new_tokens=MAX_NEW))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1] describe tea" and lines[1].split()[0] == ckpts["policy"]
    assert lines[2].split()[0] == ckpts["early"] and lines[-1].endswith("(n=1)")


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no such model folder"):
        chat.main(chat.Args(model=str(tmp_path / "missing"), prompt="hi"))
    with pytest.raises(SystemExit, match="not both"):
        chat.main(chat.Args(model=str(tmp_path), prompt="hi", prompts="toy"))


def test_a_reward_model_given_as_the_chat_model_is_one_line(ckpts):
    """`--model ./reward_ckpt` loaded the classifier's body under a causal LM head and answered nonsense, silently."""
    with pytest.raises(SystemExit, match="is a sequence classifier .* pass it as --reward"):
        chat.main(chat.Args(model=ckpts["rm"], prompt="hi"))
