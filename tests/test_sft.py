"""sft.py: the response-only loss against a slow reference, truncation, clean errors, the demo end to end, a JSONL
run, 1 rank == 2 ranks under ZeRO-0/2/3 and offload, resume after SIGKILL, and the non-finite guard."""

import ast
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_when, read_metrics, run_script, script_path, stage_module
from test_common import reference_mask  # the whole text tokenised, each answer by its offsets

import common
import common.data
import common.toy

sft = stage_module("sft")  # the repo's, or a fork given with --script (conftest.py)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Subprocesses run with one OpenMP thread: on 2 cores shared with other busy processes, a second thread made the
    demo's steps ~100x slower (the threads wait for each other at every op); on idle cores one thread costs ~25%."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


TURNS = [{"role": "user", "content": "tell me about cats"}, {"role": "assistant", "content": "cats are lovely ."},
         {"role": "user", "content": "and dogs ?"}, {"role": "assistant", "content": "dogs are fun and warm ."}]


@pytest.mark.parametrize("family,template", [("gpt2", False), ("llama", False), ("opt", False), ("qwen2", True),
                                             ("qwen2", False)])
def test_loss_is_the_nll_of_assistant_tokens_only(family, template, tiny_models):
    """collate + token_nll on a right-padded batch == a per-row loop over each row alone, summing -log p(token)
    only where the *label* is an assistant token (answers and their EOS), for single- and multi-turn records."""
    tok = common.load_tokenizer(tiny_models[family])
    if not template:
        tok.chat_template = None
    model = common.load_causal_lm(tiny_models[family], torch.float32, tok).eval()
    records = [{"messages": TURNS[:2]}, {"messages": TURNS},
               {"messages": common.to_messages("describe rain") + [{"role": "assistant", "content": "rain ."}]}]
    examples, n_cut = sft.tokenize(records, tok, 512, "left", "test")
    assert n_cut == 0
    batch = sft.collate(examples, common.pad_id(tok), "cpu")
    with torch.no_grad():
        total, count = sft.token_nll(model, batch)
    ref_total, ref_count = 0.0, 0
    for (ids, mask), r in zip(examples, records):
        expect = reference_mask(tok, ids, r["messages"])
        assert mask == expect
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for t in range(1, len(ids)):
            if expect[t]:
                ref_total -= logp[t - 1, ids[t]].item()
                ref_count += 1
    assert count.item() == ref_count
    assert total.item() == pytest.approx(ref_total, rel=1e-5)
    assert batch["attention_mask"].sum().item() == sum(len(e[0]) for e in examples)


def test_long_examples_are_cut_from_the_left_and_counted(tiny_models):
    tok = common.load_tokenizer(tiny_models["llama"])
    long = {"messages": [{"role": "user", "content": "tell me about cats " * 20}, TURNS[1]]}
    short = {"messages": TURNS[:2]}
    full, full_mask = common.encode_conversation(tok, long["messages"])
    examples, n_cut = sft.tokenize([short, long, short], tok, 24, "left", "data.jsonl")
    assert len(examples[0][0]) <= 24 < len(full) and n_cut == 1
    assert examples[1] == (full[:1] + full[-23:], full_mask[:1] + full_mask[-23:])  # the BOS, the answer and its
    assert examples[1][0][0] == tok.bos_token_id  # EOS survive, the prompt's start goes
    assert examples[1][0][-1] == tok.eos_token_id and sum(examples[1][1]) == sum(full_mask)
    assert examples[0] == common.encode_conversation(tok, short["messages"])
    with pytest.raises(common.UserError) as e:
        sft.tokenize([short, long], tok, 24, "error", "data.jsonl")
    assert "data.jsonl record 2" in e.value.code and "--max_seq_len 24" in e.value.code  # (records not from a file)
    # a conversation that ends with a long user turn keeps, cut from the left, none of its trained tokens: dropped
    # (a batch of only such records divided by zero trained tokens); none left at all is a one-line error
    late = {"messages": [*TURNS[:2], {"role": "user", "content": "and dogs ? " * 30}]}
    examples, n_cut = sft.tokenize([short, late, short], tok, 24, "left", "data.jsonl")
    assert examples == [examples[0]] * 2 and n_cut == 1
    with pytest.raises(common.UserError) as e:
        sft.tokenize([late], tok, 24, "left", "data.jsonl")
    assert "no record keeps an answer token within --max_seq_len 24" in e.value.code


# ---------------------------------------------------------------------------------------------------------------
# the command line


def test_help_lists_every_flag_with_its_doc():
    tree = ast.parse(script_path("sft.py").read_text())
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    docs = {}
    for a, b in zip(args.body, args.body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(b.value.value.split())
    fields = [a.target.id for a in args.body if isinstance(a, ast.AnnAssign)]
    assert sorted(docs) == sorted(fields)  # every field has a docstring
    p = subprocess.run([sys.executable, str(script_path("sft.py")), "--help"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0
    text = " ".join(p.stdout.replace("│", " ").split())
    for name, doc in docs.items():
        assert f"--{name} " in text or f"--{name}," in text, name
        assert doc[:60] in text, name


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def toy_jsonl(path: Path, n: int) -> Path:
    """Demo demonstrations as JSONL, half as prompt/response, half as message lists."""
    rows = [r if i % 2 else {"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]}
            for i, r in enumerate(common.toy.toy_data("sft", "train")[:n])]
    return write_jsonl(path, rows)


BAD_RUNS = {  # name: (extra flags, what the one-line error must say); {bad}/{run} are filled in below
    "malformed_jsonl": (["--data", "{bad}"], "bad.jsonl:2: malformed JSON"),
    "no_assistant_turn": (["--data", "{noasst}"], "noasst.jsonl:1: field 'messages'"),
    "missing_model": (["--model", "{tmp}/no_such_model"], "no_such_model: no such model folder"),
    "missing_model_or_hub_name": (["--model", "models/no_such_model"], "cannot load a tokenizer"),
    "zero_stage_5": (["--zero_stage", "5"], "--zero_stage 5"),
    "truncation_error": (["--data", "{long}", "--max_seq_len", "40", "--truncation", "error", "--eval_fraction",
                          "0.3"], "long.jsonl:7: "),  # its line, though lines 4-5 are held out
    "output_dir_holds_a_run": (["--output_dir", "{run}"], "holds another run"),
    "overwrite_a_folder_that_is_no_run": (["--output_dir", "{notrun}", "--overwrite"], "has no args.json"),
    "output_dir_of_user_files": (["--output_dir", "{notrun}"], "holds files and no run of these scripts"),  # said
}  # "pass --overwrite", which then refused


IN_PROCESS = ("zero_stage_5", "output_dir_holds_a_run", "overwrite_a_folder_that_is_no_run",
              "output_dir_of_user_files")  # no subprocess start


@pytest.mark.parametrize("case", BAD_RUNS)
def test_bad_input_is_a_one_line_error_and_writes_nothing(case, tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "yo"}, '{"prompt": "hi", "response": '])
    write_jsonl(tmp_path / "noasst.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    rows = [json.loads(line) for line in toy_jsonl(tmp_path / "long.jsonl", 8).read_text().splitlines()]
    rows[6] = {"prompt": "tell me about cats " * 30, "response": "cats are fun ."}
    write_jsonl(tmp_path / "long.jsonl", rows)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.json").write_text("{}")
    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "precious.txt").write_text("keep me")
    before = sorted(f.relative_to(tmp_path) for f in tmp_path.rglob("*"))
    flags, expect = BAD_RUNS[case]
    names = {k: tmp_path / f"{k}.jsonl" for k in ("bad", "noasst", "long")} | {"tmp": tmp_path}
    names |= {"run": tmp_path / "run", "notrun": tmp_path / "notrun"}
    flags = [f.format(**names) for f in flags]
    out = tmp_path / "out"
    argv = ["--output_dir", out, "--max_steps", "2", "--per_device_batch_size", "2", *flags]
    if case in IN_PROCESS:  # refused before any set-up: sft's main in this process, a UserError (SystemExit)
        import tyro

        with pytest.raises(SystemExit) as stop:
            sft.main(tyro.cli(sft.Args, args=list(map(str, argv)), use_underscores=True))
        lines = str(stop.value.code).splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    else:  # as a user sees it: one stderr line, status 1, no traceback
        p = run_script("sft.py", *argv, check=False, timeout=120, env_extra={"HF_HUB_OFFLINE": "1"})  # a hub name
        assert p.returncode == 1  # fails at once
        lines = [line for line in p.stderr.splitlines() if line.strip() and not line.startswith("note: ")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], p.stderr
        assert "Traceback" not in p.stdout + p.stderr
    assert not out.exists()
    assert sorted(f.relative_to(tmp_path) for f in tmp_path.rglob("*")) == before  # nothing else touched


# ---------------------------------------------------------------------------------------------------------------
# end to end


def eval_loss_of(folder, examples: list) -> float:
    """The token-mean NLL of a saved checkpoint on tokenised examples, computed here with plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            s, n = sft.token_nll(model, sft.collate(examples[i: i + 64], 0, "cpu"))  # pad: any id, masked
            total, count = total + s.item(), count + n.item()
    return total / count


def test_demo_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    run_script("sft.py", "--output_dir", out, "--max_steps", "60", "--eval_every", "30")
    rows = read_metrics(out)
    evals = [r for r in rows if "eval/ppl" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 61))
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert evals[-1]["eval/ppl"] < evals[0]["eval/ppl"] / 10  # about 450 (random) -> about 20
    assert evals[-1]["eval/ppl"] == pytest.approx(math.exp(evals[-1]["eval/loss"]), rel=1e-4)
    args = json.loads((out / "args.json").read_text())
    assert args["max_steps"] == 60 and args["model"] == "toy" and args["output_dir"] == str(out)
    # the saved folder is the trained model: plain transformers reproduces the logged final eval loss
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    examples, _ = sft.tokenize(common.data.load_data("toy", "sft", split="eval"), tok, 512, "left", "toy")
    assert eval_loss_of(out, examples) == pytest.approx(evals[-1]["eval/loss"], abs=1e-4)
    ids = torch.tensor([common.encode_prompt(tok, common.to_messages("tell me about cats"))])
    gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    words = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split()
    vocab = set(common.toy.TOPICS + common.toy.POSITIVE + common.toy.NEGATIVE + common.toy.VERBS + ["and", "."])
    assert words and sum(w in vocab for w in words) >= len(words) / 2  # demo words, not random bytes


def test_jsonl_run_with_lora_on_a_model_without_pad_token(tiny_models, tmp_path):
    """GPT-2 (no pad token; Conv1D layers, whose LoRA delta is transposed) trained with LoRA on a JSONL file: the
    folder holds plain merged weights that reproduce the run's own final eval loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = toy_jsonl(tmp_path / "sft.jsonl", 120)
    out = tmp_path / "out"
    p = run_script("sft.py", "--model", tiny_models["gpt2"], "--data", data, "--output_dir", out, "--max_steps", "12",
                   "--per_device_batch_size", "8", "--learning_rate", "3e-3", "--eval_fraction", "0.2",
                   "--eval_every", "0", "--max_seq_len", "24", "--lora_rank", "4")
    tok, base_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    assert tok.pad_token_id is None and tok.get_vocab() == base_tok.get_vocab()  # gpt2 had none: none was added
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    assert model.get_input_embeddings().weight.shape == base.get_input_embeddings().weight.shape
    assert model.config.pad_token_id is None and model.config.vocab_size == base.config.vocab_size
    assert not (out / "adapter_config.json").exists() and not any("lora" in k for k in final_weights(out))
    examples, n_cut = sft.tokenize(common.data.load_data(str(data), "sft"), tok, 24, "left", "x")
    assert n_cut > 0 and f"{n_cut} examples truncated from the left to 24 tokens" in p.stdout
    assert "96 train / 24 eval examples" in p.stdout
    rows = read_metrics(out)
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"] - 0.1
    _, evals = common.data.split_eval(examples, 0.2, 42)
    assert eval_loss_of(out, evals) == pytest.approx(rows[-1]["eval/loss"], abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# ranks, ZeRO stages, offload; resume; non-finite guard


def final_weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "model.safetensors")


# Tolerances. ZeRO-0: bit-exact. The 2-rank all-reduce adds the same two micro-batch gradients that 1 rank accumulates
# (a two-term fp32 sum is commutative) and the loss scales (x world x accumulation, / accumulation, / world) are powers
# of two. ZeRO-2/3 (any rank count; offload too) flatten gradients into buckets and compute the clipping norm over
# them in another order, so gradients differ by fp32 rounding (~1e-7 relative); Adam normalises each coordinate, so
# weights move apart by rounding-level amounts: measured max |dw| after 8 steps at lr 1e-3 was 5e-7 (ZeRO-2) and
# 6e-6 (ZeRO-3). Allowed: 5e-5 on weights (lr / 20), 1e-5 on logged losses (logged to 1e-6). Eval batches are cut
# differently on 1 and 2 ranks (other padding, other matmul shapes), so eval/loss always gets LOSS_TOL.
LOSS_TOL, WEIGHT_TOL = 1e-5, 5e-5


def assert_same_run(a, b, loss_tol: float, weight_tol: float):
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key, tol in (("train/loss", loss_tol), ("train/lr", 0.0), ("eval/loss", LOSS_TOL)):
            assert (key in x) == (key in y)
            if key in x:
                assert abs(x[key] - y[key]) <= tol, (x["step"], key, x[key], y[key])
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= weight_tol


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The flags of the comparison runs (13 eval examples: 2 ranks get 7 + 6, one of them padded) and a 1-rank run
    with 2 micro-batches of 4 accumulated: the same global batch of 8 as 2 ranks x 4."""
    d = tmp_path_factory.mktemp("ref")  # 64 training examples: encoding the demo's 6000 would take seconds a run
    flags = ["--max_steps", "8", "--eval_every", "4", "--data", toy_jsonl(d / "train.jsonl", 64), "--eval_data",
             toy_jsonl(d / "eval.jsonl", 13)]
    run_script("sft.py", *flags, "--per_device_batch_size", "4", "--gradient_accumulation_steps", "2",
               "--output_dir", d / "sft")
    return d / "sft", flags


@pytest.mark.parametrize("stage", [0, 3])  # ZeRO-2 on 2 ranks: test_reward.py and test_ppo.py's rank tests
def test_two_ranks_match_one_rank_with_accumulation(stage, reference, tmp_path):
    ref, flags = reference
    run_script("sft.py", *flags, "--per_device_batch_size", "4", "--zero_stage", stage, "--output_dir",
               tmp_path / "sft", ranks=2)
    assert_same_run(ref, tmp_path / "sft", *((0.0, 0.0) if stage == 0 else (LOSS_TOL, WEIGHT_TOL)))


def test_accumulation_equals_one_bigger_batch(reference, tmp_path):
    """The loss is a token mean over the global batch (PPO_DETAILS 5), not a mean of micro-batch means: 1 x 8 ==
    2 x 4 accumulated. (Micro-batch means would move the weights ~7e-3 apart here; different padding ~4e-6.)"""
    ref, flags = reference
    run_script("sft.py", *flags, "--per_device_batch_size", "8", "--output_dir", tmp_path / "sft")
    assert_same_run(ref, tmp_path / "sft", LOSS_TOL, WEIGHT_TOL)


@pytest.mark.parametrize("stage", [3])  # ZeRO-2 with --offload: test_reward.py and test_ppo.py's rank tests
def test_offload_gives_the_same_numbers(stage, reference, tmp_path):
    ref, flags = reference
    run_script("sft.py", *flags, "--per_device_batch_size", "4", "--gradient_accumulation_steps", "2",
               "--zero_stage", stage, "--offload", "--output_dir", tmp_path / "sft")
    assert_same_run(ref, tmp_path / "sft", LOSS_TOL, WEIGHT_TOL)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_models, tmp_path):
    """Kill (SIGKILL) a run a few steps after its step-20 checkpoint, resume it, and get the very same metric rows
    and final weights as a run never stopped: data order (across an epoch boundary), optimizer, scheduler and the RNG
    (a GPT-2 with dropout on, so the RNG state matters) all come back."""
    model = Path(shutil.copytree(tiny_models["gpt2"], tmp_path / "gpt2_dropout"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}))
    data = toy_jsonl(tmp_path / "sft.jsonl", 100)  # 96 train examples: epoch 2 starts at step 25
    flags = ["--model", model, "--data", data, "--eval_fraction", "0.04", "--max_steps", "40", "--learning_rate",
             "1e-3", "--per_device_batch_size", "4", "--save_every", "10", "--eval_every", "1"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_script("sft.py", *flags, "--output_dir", ref)
    latest, log = out / "checkpoints" / "latest", out / "metrics.jsonl"
    # killed once rows after a checkpoint past step 10 exist: resume must drop them
    kill_when("sft.py", *flags, "--output_dir", out, ready=lambda: latest.exists() and latest.read_text().strip()
              not in ("", "step10") and len(log.read_text().splitlines()) > 22)
    tag = latest.read_text().strip()
    assert tag in ("step20", "step30")
    assert not (out / "config.json").exists() and read_metrics(out)[-1]["step"] > int(tag[4:])
    p = run_script("sft.py", *flags, "--output_dir", out, "--resume")
    assert f"at step {tag[4:]}" in p.stdout
    drop = "throughput/tokens_per_s"  # wall-clock
    ra, rb = ([{k: v for k, v in r.items() if k != drop} for r in read_metrics(d)] for d in (ref, out))
    assert ra == rb and [r["step"] for r in rb] == list(range(41))
    wa, wb = final_weights(ref), final_weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-exact


def test_non_finite_loss_stops_the_run_and_saves_nothing(tmp_path):
    """A learning rate of 1e30 blows the weights up within a few steps: the run stops with the step in a one-line
    error, writes no model and does not log the bad step. It has no checkpoint to resume: --resume says so,
    --overwrite starts a clean log."""
    out = tmp_path / "out"
    flags = ["--max_steps", "8", "--per_device_batch_size", "4", "--eval_every", "0", "--output_dir", out, "--data",
             toy_jsonl(tmp_path / "sft.jsonl", 64)]  # the demo's model, on fewer examples to encode than its data
    p = run_script("sft.py", *flags, "--learning_rate", "1e30", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    (line,) = [line for line in p.stderr.splitlines() if line.strip() and not line.startswith("note: ")]
    assert line.startswith("error: step ") and ("train/loss is nan" in line or "train/loss is inf" in line)
    step = int(line.split()[2].rstrip(":"))
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert read_metrics(out)[-1]["step"] == step - 1 > 0  # the bad step is not logged
    p = run_script("sft.py", *flags, "--resume", check=False)
    assert p.returncode == 1 and "has no checkpoint to continue from" in p.stderr
    run_script("sft.py", *flags, "--overwrite")
    assert [r["step"] for r in read_metrics(out)] == list(range(9))
