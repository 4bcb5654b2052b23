"""reward.py: the score token under both paddings, the loss, a round trip through plain transformers, bad pair data,
and an end-to-end demo run whose accuracy rises."""

import json
import math

import pytest
import torch
from conftest import make_model, make_tokenizer, read_metrics, run_script

import common
import reward


def seq_cls(family):
    from transformers import AutoModelForSequenceClassification

    tok = common.load_tokenizer("toy") if family == "toy" else make_tokenizer(family)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    lm = make_model(family, tok)
    common.resize_for_tokenizer(lm, tok)
    cfg = lm.config
    cfg.num_labels = 1
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    return tok, model


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "qwen2", "neox"])
def test_score_is_read_at_the_last_real_token_for_both_paddings(family):
    tok, model = seq_cls(family)
    records = [{"prompt": common.to_messages("tell me about cats"), "chosen": "cats are nice .", "rejected": "no"},
               {"prompt": common.to_messages("hey , describe tea please"), "chosen": "tea is warm and kind .",
                "rejected": "tea ."}]
    pairs = [reward.encode_pair(tok, r, 512, "left", "x")[:2] + (0.0,) for r in records]
    rows = [p[0] for p in pairs] + [p[1] for p in pairs]
    assert all(r[-1] == tok.eos_token_id for r in rows)  # EOS appended as an id
    with torch.no_grad():
        # reference: each row alone, no padding at all, its last logit
        ref = [model(input_ids=torch.tensor([r])).logits[0, 0].item() for r in rows]
        for side in ("right", "left"):
            b = reward.collate_pairs(pairs, tok.pad_token_id, "cpu", side=side)
            got = reward.score(model, b["input_ids"], b["attention_mask"])
            assert got.tolist() == pytest.approx(ref, abs=1e-4), side


def test_pairwise_loss_against_a_loop():
    torch.manual_seed(0)
    c, r, m = torch.randn(20), torch.randn(20), torch.rand(20)
    got = reward.pairwise_loss(c, r, m)
    for i in range(20):
        expect = -math.log(1.0 / (1.0 + math.exp(-(c[i].item() - r[i].item() - m[i].item()))))
        assert got[i].item() == pytest.approx(expect, rel=1e-5)


def test_spearman_against_a_reference():
    a, b = [3.0, 1.0, 2.0, 5.0, 4.0], [30.0, 10.0, 25.0, 40.0, 50.0]
    # ranks 2,0,1,4,3 vs 2,0,1,3,4: 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 120
    assert reward.spearman(a, b) == pytest.approx(0.9)
    assert reward.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)  # ties get average ranks


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_round_trip_through_plain_transformers(tiny_models, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in common.toy_data("pairs", "train")[:64]]
    out = tmp_path / "rm"
    run_script("reward.py", "--model", tiny_models["gpt2"], "--data", write_pairs(tmp_path / "p.jsonl", rows),
               "--output_dir", out, "--max_steps", "3", "--per_device_batch_size", "8")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert math.isfinite(model.config.reward_mean) and model.config.reward_std > 0
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    pairs = [reward.encode_pair(tok, common.validate("x", r, "pairs"), 512, "left", "x")[:2] + (0.0,)
             for r in rows[:4]]
    b = reward.collate_pairs(pairs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ours = reward.score(model, b["input_ids"], b["attention_mask"])
        plain = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0]  # right padding
    assert torch.allclose(ours, plain, atol=1e-5)
    rows_m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"eval/loss", "eval/accuracy", "eval/chosen_reward", "eval/rejected_reward"} <= set(rows_m[-2])


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "a", "rejected": "b"}', "field 'chosen' is missing"),
    ('{"prompt": "a", "chosen": "", "rejected": "b"}', "field 'chosen' must be a non-empty string"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "malformed JSON"),
])
def test_bad_pairs_give_a_one_line_error(tiny_models, tmp_path, line, needle):
    good = '{"prompt": "a", "chosen": "b", "rejected": "c"}'
    data = tmp_path / "pairs.jsonl"
    data.write_text(good + "\n" + good + "\n" + line + "\n")
    p = run_script("reward.py", "--model", tiny_models["llama"], "--data", data, "--output_dir", tmp_path / "o",
                   check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and f"{data}:3" in errors[0] and needle in errors[0], p.stderr[-1500:]
    assert not (tmp_path / "o").exists()


def test_demo_accuracy_rises(demo):
    rows = read_metrics(demo / "rm")
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals[0]["step"] == 0
    assert evals[-1]["eval/accuracy"] > max(0.75, evals[0]["eval/accuracy"] + 0.2), evals
    assert evals[-1]["eval/gold_spearman"] > 0.5
    assert rows[-1]["eval/reward_std"] > 0
