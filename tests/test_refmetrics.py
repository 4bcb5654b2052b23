"""Reference metrics (common.refmetrics): BLEU and ROUGE equal sacrebleu's and rouge-score's own calls; a missing
package is a one-line error; sft.py --eval_generate logs them (2 ranks, ZeRO-3) and the demo's ROUGE rises from the
base model to the SFT one; chat.py --prompts scores answers against the references a file carries.

Skipped when the optional packages (requirements-metrics.txt) are missing, unless RLHF_METRICS=required (as .ci/run
sets it); the missing-package tests run either way."""

import importlib.util
import json
import os
import sys

import pytest
import torch
from conftest import read_metrics, run_script

import chat
import common
import common.refmetrics
import common.toy
import sft

INSTALLED = all(importlib.util.find_spec(m) for m in ("sacrebleu", "rouge_score"))
if not INSTALLED and os.environ.get("RLHF_METRICS") == "required":
    raise RuntimeError("RLHF_METRICS=required but sacrebleu or rouge-score is missing: pip install -r "
                       "requirements-metrics.txt")
needs_packages = pytest.mark.skipif(not INSTALLED, reason="pip install -r requirements-metrics.txt")

HYPS = ["the cats are running .", "", "rain feels calm and kind .", "a dull day , really", "Cheese is great"]
REFS = ["a cat runs fast .", "tea is warm .", "rain feels calm and kind .", "the day was bright", "cheese is great ."]


def library_scores(hyps: list[str], refs: list[str]) -> tuple[list[dict], dict]:
    """The libraries called directly: per answer and over all answers."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = []
    for h, r in zip(hyps, refs):
        s = scorer.score(r, h)
        rows.append({"bleu": sacrebleu.sentence_bleu(h, [r]).score, "rouge1": s["rouge1"].fmeasure,
                     "rouge2": s["rouge2"].fmeasure, "rougeL": s["rougeL"].fmeasure})
    corpus = {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score}
    corpus |= {k: sum(r[k] for r in rows) / len(rows) for k in ("rouge1", "rouge2", "rougeL")}
    return rows, corpus


@needs_packages
def test_scores_equal_the_libraries():
    rows, corpus = library_scores(HYPS, REFS)
    assert common.refmetrics.answer_scores(HYPS, REFS) == rows
    assert common.refmetrics.corpus_scores(HYPS, REFS) == corpus
    assert rows[2] == {"bleu": pytest.approx(100.0), "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rows[0]["rouge1"] == pytest.approx(0.5)  # stemmed: cat and run in both (no word in both as written)
    assert 0 < corpus["bleu"] < 100 and corpus["bleu"] != pytest.approx(sum(r["bleu"] for r in rows) / len(rows))


@pytest.mark.parametrize("module", ["sacrebleu", "rouge_score.rouge_scorer"])
def test_a_missing_package_is_one_line(module, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    package = "sacrebleu" if module == "sacrebleu" else "rouge-score"
    for call in (common.refmetrics.answer_scores, common.refmetrics.corpus_scores):
        with pytest.raises(common.UserError) as e:
            call(["a"], ["a"])
        assert package in e.value.code and "pip install -r requirements-metrics.txt" in e.value.code
        assert "\n" not in e.value.code
    with pytest.raises(common.UserError) as e:  # sft.py: before anything is written
        sft.main(sft.Args(eval_generate=4, output_dir=str(tmp_path / "out")))
    assert e.value.code.startswith("error: --eval_generate: ") and package in e.value.code
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# sft.py --eval_generate and chat.py --prompts on the demo


@pytest.fixture(scope="module")
def demo_sft(tmp_path_factory) -> dict:
    """The demo's model before (`base`, random weights) and after (`sft`) 20 steps of 16 conversations of sft.py
    --eval_generate 16, on 2 ranks with ZeRO-3 (each answers half the prompts with its parameters gathered)."""
    d = tmp_path_factory.mktemp("refmetrics")
    for split, n in (("train", 320), ("eval", 16)):
        rows = common.toy.toy_data("sft", split)[:n]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_script("sft.py", "--data", d / "train.jsonl", "--eval_data", d / "eval.jsonl", "--max_steps", "20",
               "--eval_every", "10", "--eval_generate", "16", "--per_device_batch_size", "8", "--zero_stage", "3",
               "--output_dir", d / "sft", ranks=2)
    tok = common.toy.toy_tokenizer()
    torch.manual_seed(0)  # random weights, as sft.py --model toy starts from
    common.toy.toy_model(tok).save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    return {"sft": str(d / "sft"), "base": str(d / "base"), "eval": d / "eval.jsonl"}


def greedy_answers(folder: str, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Plain transformers, one prompt at a time, greedy, stopping at the end of the answer's turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    out = []
    for c in conversations:
        ids = torch.tensor([common.encode_prompt(tok, c)])
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, top_k=None, top_p=None,
                             eos_token_id=common.stop_token_ids(tok), pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


@needs_packages
def test_sft_eval_generate_logs_the_metrics_and_rouge_rises(demo_sft):
    """Every eval row has eval/bleu and eval/rouge1/2/L beside eval/ppl; ROUGE-L rises from the base model (step 0)
    to the SFT one; the last row's figures are the libraries' on the saved model's greedy answers."""
    rows = [r for r in read_metrics(demo_sft["sft"]) if "eval/ppl" in r]
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert all({"eval/bleu", "eval/rouge1", "eval/rouge2", "eval/rougeL"} <= r.keys() for r in rows)
    assert rows[-1]["eval/rougeL"] > rows[0]["eval/rougeL"] + 0.1  # about 0 (random bytes) -> about 0.18
    records = [json.loads(line) for line in demo_sft["eval"].read_text().splitlines()]
    tok = common.load_tokenizer(demo_sft["sft"])
    longest = max(sum(common.encode_conversation(tok, r["messages"])[1]) for r in records)  # answer + its EOS
    answers = greedy_answers(demo_sft["sft"], [r["messages"][:-1] for r in records], min(2 * longest, 256))
    _, corpus = library_scores(answers, [r["messages"][-1]["content"] for r in records])
    for k, v in corpus.items():
        assert rows[-1][f"eval/{k}"] == pytest.approx(v, abs=2e-6), k


@needs_packages
def test_chat_scores_the_answers_against_references(demo_sft, tmp_path, capsys):
    """Records with a `response` or a last assistant turn are scored (per answer in --output, a table per model
    beside the win rate); a record without one is answered as before, with no scores."""
    from transformers import AutoModelForSequenceClassification, GPT2Config

    tok = common.toy.toy_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                     pad_token_id=tok.pad_token_id)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    records = [json.loads(line) for line in demo_sft["eval"].read_text().splitlines()][:6]
    src = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} if i % 2 else r
           for i, r in enumerate(records)] + [{"prompt": "describe tea"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in src))
    args = dict(model=demo_sft["sft"], compare=demo_sft["base"], reward=str(tmp_path / "rm"),
                prompts=str(tmp_path / "p.jsonl"), greedy=True, max_new_tokens=16)
    chat.main(chat.Args(output=str(tmp_path / "out.jsonl"), **args))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    refs = [r["messages"][1]["content"] for r in records]
    assert [r.get("reference") for r in rows] == refs + [None]
    assert not {"bleu", "rougeL", "bleu_compare"} & rows[-1].keys()
    table = {}
    for suffix in ("", "_compare"):
        answers = [r["response" + suffix] for r in rows[:-1]]
        per_answer, table[suffix] = library_scores(answers, refs)
        assert [{k: r[k + suffix] for k in per_answer[0]} for r in rows[:-1]] == per_answer
    assert table[""]["rougeL"] > table["_compare"]["rougeL"]
    capsys.readouterr()
    chat.main(chat.Args(**args))
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("win rate of"))
    assert out[at + 1].startswith("against the references of 6 prompts")
    for line, suffix in zip(out[at + 3: at + 5], ("", "_compare")):
        assert line.split()[1:] == [f"{table[suffix][k]:.3f}" for k in common.refmetrics.NAMES]
    assert any(line.startswith("  (reference) ") and line.endswith(f"  {refs[0]}") for line in out)
