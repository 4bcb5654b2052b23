"""reward.py: the score token under both paddings against a per-row reference, the loss against a loop, a round
trip through plain transformers (full and LoRA), the same run however the global batch is split (accumulation, 2
ranks under ZeRO-0, 2 with offload, and 3), resume after SIGKILL, bad input, and an end-to-end demo run whose accuracy
rises."""

import json
import math

import pytest
import torch
from conftest import make_model, make_tokenizer, read_metrics, run_script, stage_module

import common
import common.data
import common.toy

reward = stage_module("reward")  # the repo's, or a fork given with --script (conftest.py)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Subprocesses run with one OpenMP thread (2 cores shared with other busy processes: see test_sft.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def seq_cls(family):
    """A tiny random sequence classifier with one output and the family's tokenizer as it is (GPT-2, GPT-NeoX and
    Llama have no pad token: padding writes EOS, which also ends every row)."""
    from transformers import AutoModelForSequenceClassification

    tok = common.load_tokenizer("toy") if family == "toy" else make_tokenizer(family)
    lm = common.toy.toy_model(tok) if family == "toy" else make_model(family, tok)
    cfg = lm.config
    cfg.num_labels = 1
    torch.manual_seed(1)
    return tok, AutoModelForSequenceClassification.from_config(cfg).eval()


RECORDS = [
    {"prompt": common.to_messages("tell me about cats"), "chosen": "cats are nice .", "rejected": "no", "margin": 0.5},
    {"prompt": common.to_messages("hey , describe tea please"), "chosen": "tea is warm and kind .",
     "rejected": "tea ."},
    {"prompt": common.to_messages("write about rain"), "rejected": "rain rain rain",
     "chosen": [{"role": "assistant", "content": "rain is calm ."}, {"role": "user", "content": "more ?"},
                {"role": "assistant", "content": "rain is kind ."}]},  # a message-list answer (multi-turn)
]


def alone(model, ids: list[int]) -> float:
    """Reference score: one row, no padding, the score head at its last position."""
    return model.score(model.base_model(input_ids=torch.tensor([ids])).last_hidden_state)[0, -1, 0].item()


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "qwen2", "neox", "toy"])
def test_score_is_read_at_the_last_real_token_for_both_paddings(family):
    """gpt2 and opt have absolute positions: left padding only matches with position_ids from the mask."""
    tok, model = seq_cls(family)
    pairs = [reward.encode_pair(tok, r, 512, "left", "x")[:2] + (r.get("margin", 0.0),) for r in RECORDS]
    rows = [p[0] for p in pairs] + [p[1] for p in pairs]
    assert all(r[-1] == tok.eos_token_id for r in rows)  # EOS appended as an id
    assert len({len(r) for r in rows}) > 2  # the batch really is padded
    with torch.no_grad():
        ref = [alone(model, r) for r in rows]
        for side in ("right", "left"):
            b = reward.collate_pairs(pairs, common.pad_id(tok), "cpu", side=side)
            got = reward.score(model, b["input_ids"], b["attention_mask"])
            assert got.tolist() == pytest.approx(ref, abs=1e-4), side


def test_pairwise_loss_against_a_loop():
    """The per-pair loss, and the batch path (chosen rows first, then rejected, margins in pair order) against each
    pair scored alone."""
    torch.manual_seed(0)
    c, r, m = torch.randn(20), torch.randn(20), torch.rand(20)
    got = reward.pairwise_loss(c, r, m)
    for i in range(20):
        expect = -math.log(1.0 / (1.0 + math.exp(-(c[i].item() - r[i].item() - m[i].item()))))
        assert got[i].item() == pytest.approx(expect, rel=1e-5)

    tok, model = seq_cls("gpt2")
    with torch.no_grad():
        torch.nn.init.normal_(model.score.weight, std=1.0)  # scores far apart enough for the margin to matter
        pairs = [reward.encode_pair(tok, x, 512, "left", "x")[:2] + (x.get("margin", 0.0),) for x in RECORDS]
        b = reward.collate_pairs(pairs, common.pad_id(tok), "cpu")
        s = reward.score(model, b["input_ids"], b["attention_mask"])
        loss = reward.pairwise_loss(s[:3], s[3:], b["margin"]).mean().item()
        ref = [-math.log(1 / (1 + math.exp(-(alone(model, pc) - alone(model, pr) - pm)))) for pc, pr, pm in pairs]
    assert loss == pytest.approx(sum(ref) / len(ref), rel=1e-4)


def test_spearman_against_a_reference():
    a, b = [3.0, 1.0, 2.0, 5.0, 4.0], [30.0, 10.0, 25.0, 40.0, 50.0]
    # ranks 2,0,1,4,3 vs 2,0,1,3,4: 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 120
    assert reward.spearman(a, b) == pytest.approx(0.9)
    assert reward.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)  # ties get average ranks
    assert reward.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def write_pairs(path, n: int, start: int = 0):
    rows = [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in common.toy.toy_data("pairs", "train")[start: start + n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("lora", [0, 4])
def test_round_trip_through_plain_transformers(tiny_models, tmp_path, lora):
    """The saved folder, loaded by plain AutoModelForSequenceClassification and scored row by row without padding,
    reproduces the numbers reward.py logged at its last step and stored in the config. With LoRA the adapter is merged
    and the trained score head (peft's modules_to_save copy) is the one saved; the learning rate is high so that an
    untrained head or an unmerged adapter would show."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "rm"
    evals = write_pairs(tmp_path / "eval.jsonl", 12, start=100)
    run_script("reward.py", "--model", tiny_models["gpt2"], "--data", write_pairs(tmp_path / "p.jsonl", 24),
               "--eval_data", evals, "--output_dir", out, "--max_steps", "3", "--per_device_batch_size", "8",
               "--learning_rate", "1e-2", "--lora_rank", lora)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id is None is tok.pad_token_id  # GPT-2's own
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not any("lora" in n or "modules_to_save" in n for n, _ in model.named_parameters())
    last = read_metrics(out)[-1]
    assert last["step"] == 3 and {"eval/loss", "eval/accuracy", "eval/chosen_reward", "eval/rejected_reward",
                                  "eval/reward_mean", "eval/reward_std", "train/loss", "train/accuracy"} <= set(last)
    pairs = [reward.encode_pair(tok, common.data.validate("x", json.loads(x), "pairs"), 512, "left", "x")
             for x in evals.read_text().splitlines()]
    with torch.no_grad():
        chosen = torch.tensor([alone(model, p[0]) for p in pairs])
        rejected = torch.tensor([alone(model, p[1]) for p in pairs])
    both = torch.cat([chosen, rejected])
    assert chosen.mean().item() == pytest.approx(last["eval/chosen_reward"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(last["eval/rejected_reward"], abs=1e-4)
    assert (chosen > rejected).float().mean().item() == pytest.approx(last["eval/accuracy"])
    # normalisation statistics: both sides of the eval pairs (not the demo), in the config and in the log
    assert model.config.reward_mean == pytest.approx(both.mean().item(), abs=1e-4) == last["eval/reward_mean"]
    assert model.config.reward_std == pytest.approx(both.std().item(), abs=1e-4) == last["eval/reward_std"]
    # and reward.py's scoring of a right-padded batch is what the plain model gives
    b = reward.collate_pairs([p[:2] + (0.0,) for p in pairs], common.pad_id(tok), "cpu")
    with torch.no_grad():
        assert torch.allclose(reward.score(model, b["input_ids"], b["attention_mask"]), both, atol=1e-5)


def test_the_same_global_batch_gives_the_same_run(tiny_models, tmp_path):
    """One global batch of 8 pairs as one micro-batch on 1 rank, and on 2 ranks as 2 + 2 accumulated under ZeRO-0
    and as 4 under ZeRO-2 with --offload and ZeRO-3: the same losses, eval scores (split across ranks and gathered
    in order) and normalisation statistics, to 5e-5 (fp32 sums in another order)."""
    data = write_pairs(tmp_path / "p.jsonl", 40)
    flags = ["--model", tiny_models["llama"], "--data", data, "--max_steps", "3", "--learning_rate", "1e-3",
             "--eval_every", "0", "--eval_fraction", "0.2"]
    run_script("reward.py", *flags, "--output_dir", tmp_path / "a", "--per_device_batch_size", "8")
    for stage, extra in (("0", ["--per_device_batch_size", "2", "--gradient_accumulation_steps", "2"]),
                         ("2", ["--per_device_batch_size", "4", "--offload"]),
                         ("3", ["--per_device_batch_size", "4"])):
        run_script("reward.py", *flags, "--output_dir", tmp_path / f"z{stage}", "--zero_stage", stage, *extra,
                   ranks=2)
    a = read_metrics(tmp_path / "a")
    assert len(a) == 4 and a[-1]["eval/chosen_reward"] != a[0]["eval/chosen_reward"]  # it trained
    for other in ("z0", "z2", "z3"):
        b = read_metrics(tmp_path / other)
        assert [r["step"] for r in b] == [r["step"] for r in a]
        for ra, rb in zip(a, b):
            for k in ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "eval/chosen_reward",
                      "eval/rejected_reward", "eval/reward_mean", "eval/reward_std"):
                assert (k in ra) == (k in rb) and ra.get(k) == pytest.approx(rb.get(k), abs=5e-5), (other, k)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_models, tmp_path):
    """Kill (SIGKILL) a run after its step-10 checkpoint, resume it, and get the very same metric rows (past an epoch
    boundary at step 12) and bit-identical weights as a run never stopped."""
    from conftest import kill_when
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "p.jsonl", 60)  # 48 train pairs: 12 steps of 4 an epoch
    flags = ["--model", tiny_models["llama"], "--data", data, "--eval_fraction", "0.2", "--max_steps", "40",
             "--learning_rate", "1e-3", "--per_device_batch_size", "4", "--save_every", "10", "--eval_every", "1"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_script("reward.py", *flags, "--output_dir", ref)
    latest, log = out / "checkpoints" / "latest", out / "metrics.jsonl"
    # killed once rows after a checkpoint exist: resume must drop them
    kill_when("reward.py", *flags, "--output_dir", out, ready=lambda: latest.exists() and latest.read_text().strip()
              and len(log.read_text().splitlines()) > 13)
    tag = latest.read_text().strip()
    assert tag in ("step10", "step20", "step30")
    assert not (out / "config.json").exists() and read_metrics(out)[-1]["step"] > int(tag[4:])
    p = run_script("reward.py", *flags, "--output_dir", out, "--resume")
    assert f"at step {tag[4:]}" in p.stdout
    drop = "throughput/pairs_per_s"  # wall-clock
    ra, rb = ([{k: v for k, v in r.items() if k != drop} for r in read_metrics(d)] for d in (ref, out))
    assert ra == rb and [r["step"] for r in rb] == list(range(41))
    wa, wb = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-exact


BAD = {
    "missing chosen": ('{"prompt": "a", "rejected": "b"}', "field 'chosen' is missing"),
    "empty chosen": ('{"prompt": "a", "chosen": "", "rejected": "b"}', "field 'chosen' must be a non-empty string"),
    "malformed JSON": ('{"prompt": "a", "chosen": "b", "rejected": "c"', "malformed JSON"),
    "answer ends with a user turn": ('{"prompt": "a", "chosen": "b", "rejected": [{"role": "user", "content": "c"}]}',
                                     "field 'rejected' must end with an assistant turn"),
}


@pytest.mark.parametrize("case", list(BAD) + ["missing model folder"])
def test_bad_pairs_give_a_one_line_error(tiny_models, tmp_path, case):
    good = '{"prompt": "a", "chosen": "b", "rejected": "c"}'
    line, needle = BAD.get(case, (good, "no such model folder"))
    data = tmp_path / "pairs.jsonl"
    data.write_text(good + "\n" + good + "\n" + line + "\n")
    model = tmp_path / "nope" if case == "missing model folder" else tiny_models["llama"]
    p = run_script("reward.py", "--model", model, "--data", data, "--output_dir", tmp_path / "o", check=False,
                   timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr
    errors = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith("note: ")]  # adapted defaults
    assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0], p.stderr[-1500:]
    if case in ("missing chosen", "empty chosen", "malformed JSON"):
        assert f"{data}:3" in errors[0]
    assert not (tmp_path / "o").exists()


def test_demo_accuracy_rises(demo):
    rows = read_metrics(demo / "rm")
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == rows[-1]["step"] == 200
    assert evals[-1]["eval/accuracy"] > max(0.75, evals[0]["eval/accuracy"] + 0.2), evals
    assert evals[-1]["eval/gold_spearman"] > max(0.5, evals[0]["eval/gold_spearman"])
    assert evals[-1]["eval/chosen_reward"] > evals[-1]["eval/rejected_reward"]
    assert rows[-1]["eval/reward_std"] > 0 and "train/accuracy" in rows[-1]
    assert len({r["step"] for r in rows}) == len(rows)  # one row per step
