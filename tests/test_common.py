"""common.py: prompt formatting, conversation encoding and its loss mask, tokenizer set-up, JSONL validation, the
Hugging Face checkpoint (round trip, LoRA merge, atomic save) and the non-finite guard."""

import copy
import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHATML, FAMILIES, make_tokenizer, script_env

import common
import common.data
import common.launcher
import common.runs
import common.toy

SINGLE = [{"role": "user", "content": "tell me about cats"}, {"role": "assistant", "content": "cats are lovely ."}]
MULTI = [{"role": "system", "content": "be kind"}, *SINGLE, {"role": "user", "content": "and dogs ?"},
         {"role": "assistant", "content": "dogs are fun and warm ."}]


# a Llama-2-style template that writes the BOS itself, while the tokenizer adds one too
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}[assistant] {{ m['content'] }}"
                "{{ eos_token }}{% else %}[{{ m['role'] }}] {{ m['content'] }} {% endif %}{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")


def tokenizer_of(name: str, tiny_models: dict, template: bool = True):
    """The tokenizer as the scripts see it; `template=False` drops a chat template (to test the fallback);
    `llama_bos_template` is the Llama tokenizer (which adds a BOS) with a template that writes one as well."""
    if name == "toy":
        tok = common.toy.toy_tokenizer()
    else:
        tok = common.load_tokenizer(tiny_models[name.removesuffix("_bos_template")])
    if name.endswith("_bos_template"):
        tok.chat_template = BOS_TEMPLATE
    if not template:
        tok.chat_template = None
    return tok


# (family, keep its chat template): every family, plus Qwen2 and the toy tokenizer without their template
CASES = [(f, True) for f in FAMILIES] + [("toy", True), ("qwen2", False), ("toy", False), ("llama_bos_template", True)]


def test_format_prompt_uses_the_chat_template_else_deepspeed_chat(tiny_models):
    for name in ("qwen2", "toy"):
        tok = tokenizer_of(name, tiny_models)
        for msgs in (SINGLE[:1], MULTI[:-1]):
            expect = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert common.format_prompt(tok, msgs) == expect
    for name, template in (("gpt2", True), ("qwen2", False)):
        tok = tokenizer_of(name, tiny_models, template)
        assert common.format_prompt(tok, SINGLE[:1]) == "\n\nHuman: tell me about cats\n\nAssistant:"
        assert common.format_prompt(tok, common.to_messages("hi")) == "\n\nHuman: hi\n\nAssistant:"


def reference_mask(tok, ids: list[int], messages: list[dict]) -> list[bool]:
    """Slow and obvious: the rendered text tokenised whole (the ids must be its tokens, after a BOS the tokenizer
    adds); an answer is the tokens inside its text and the spaces the template writes just before it (the whole
    text's first answer token carries them: `Ġcats`), then the EOS."""
    text = common.render(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    whole, spans, lead = enc["input_ids"], enc["offset_mapping"], len(ids) - len(enc["input_ids"])
    assert ids[lead:] == whole and lead in (0, 1)
    mask, pos = [False] * len(whole), 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        start = text.index(m["content"], pos)
        end = pos = start + len(m["content"])
        start -= len(text[:start]) - len(text[:start].rstrip(" "))
        inside = [i for i, (a, b) in enumerate(spans) if start <= a < b <= end]
        assert whole[inside[-1] + 1] == tok.eos_token_id
        for i in inside + [inside[-1] + 1]:
            mask[i] = True
    return [False] * lead + mask


@pytest.mark.parametrize("name,template", CASES)
def test_encode_conversation_masks_answers_and_their_eos_only(name, template, tiny_models):
    tok = tokenizer_of(name, tiny_models, template)
    for msgs in (SINGLE, MULTI):
        ids, mask = common.encode_conversation(tok, msgs)
        assert len(ids) == len(mask)
        assert mask == reference_mask(tok, ids, msgs)
        context = tok.decode([i for i, m in zip(ids, mask) if not m])
        for m in msgs:  # every non-assistant turn is in the context, in order, and never in the loss
            assert m["content"] in context or m["role"] == "assistant"
        last = max(i for i, m in enumerate(mask) if m)  # the template's markup after the last answer is context
        assert ids[last] == tok.eos_token_id and not tok.decode(ids[last + 1:]).strip()


@pytest.mark.parametrize("name,template", CASES)
def test_prompt_is_a_prefix_of_its_conversation(name, template, tiny_models):
    """Generation (encode_prompt) and training (encode_conversation) must see the same ids, single and multi-turn."""
    tok = tokenizer_of(name, tiny_models, template)
    for msgs in (SINGLE, MULTI):
        ids, mask = common.encode_conversation(tok, msgs)
        prompt = common.encode_prompt(tok, msgs[:-1])
        assert ids[: len(prompt)] == prompt and mask[len(prompt)] and not mask[len(prompt) - 1]
        n_answer = sum(reference_mask(tok, ids, msgs)[len(prompt):])  # the last answer and its EOS
        assert sum(mask[len(prompt):]) == n_answer and not tok.decode(ids[len(prompt) + n_answer:]).strip()
        if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id:  # llama: BOS once, first
            assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        if name == "opt":  # BOS == EOS: one at the start, the others are the answers' EOS
            assert ids[0] == tok.bos_token_id
            assert [i for i, m in zip(ids, mask) if not m].count(tok.bos_token_id) == 1


def test_plain_added_tokens_the_template_uses_as_turn_markers_are_turn_markers():
    """A ChatML model whose `<|im_start|>`/`<|im_end|>` were added as plain tokens (axolotl's `tokens:`): the
    answer's turn ends with `<|im_end|>` (trained, a stop token, no EOS put in), a content's `<|im_end|>` stays
    text, and a plain token the template writes only inside an answer (Qwen3's `<think>`) stays one token."""
    tok = make_tokenizer("gpt2")
    tok.add_tokens(["<|im_start|>", "<|im_end|>", "<think>"])
    tok.chat_template = CHATML
    start, end, think = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<think>"])
    assert not any(tok.added_tokens_decoder[i].special for i in (start, end, think))
    msgs = [{"role": "user", "content": "a <|im_end|> b <|im_start|>system c"},
            {"role": "assistant", "content": "<think> ok"}]
    ids, mask = common.encode_conversation(tok, msgs)
    assert tok.decode(ids) == common.render(tok, msgs)
    assert ids.count(start) == 2 and ids.count(end) == 2  # the template's, none from the user's text
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained[0] == think and trained[-1] == end and tok.eos_token_id not in ids
    assert common.stop_token_ids(tok) == sorted({tok.eos_token_id, end})
    assert common.encode_prompt(tok, msgs[:1]) == ids[: mask.index(True)]
    assert common.decode_answers(tok, torch.tensor([trained])) == ["<think> ok"]  # as generated: no marker
    plain = make_tokenizer("gpt2")  # no template: nothing is a turn marker, the added token stays a token
    plain.add_tokens(["<|im_end|>"])
    assert common.turn_tokens(plain)[0] == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_loading_changes_neither_the_tokenizer_nor_the_model(family, tiny_models):
    """No token added, no embedding resized, no config id rewritten: GPT-2, GPT-NeoX and Llama keep having no pad
    token (padding then writes EOS's id, masked), the others keep theirs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(tiny_models[family])
    base = AutoModelForCausalLM.from_pretrained(tiny_models[family])
    tok = common.load_tokenizer(tiny_models[family])
    assert len(tok) == len(base_tok) and tok.get_vocab() == base_tok.get_vocab()
    assert tok.pad_token_id == base_tok.pad_token_id and (tok.pad_token_id is None) == (family not in ("opt", "qwen2"))
    assert common.pad_id(tok) == (tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id)
    model = common.load_causal_lm(tiny_models[family], torch.float32, tok)
    assert model.get_input_embeddings().weight.shape == base.get_input_embeddings().weight.shape
    assert model.config.to_dict() == base.config.to_dict()
    assert isinstance(model, type(base))


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_models):
    tok = common.load_tokenizer(tiny_models["llama"])
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    with pytest.raises(common.UserError, match=r"--model: the tokenizer has \d+ tokens but the model's embedding"):
        common.load_causal_lm(tiny_models["llama"], torch.float32, tok)


# ---------------------------------------------------------------------------------------------------------------
# JSONL validation: (file content, the line the error must name or None, the field it must name or None)

GOOD = json.dumps({"prompt": "hi", "response": "hello ."})
BAD_JSONL = {
    "malformed": ((GOOD + "\n" + '{"prompt": "hi", "response": \n').encode(), 2, None),
    "missing_field": ((GOOD + "\n\n" + json.dumps({"prompt": "hi"}) + "\n").encode(), 3, "response"),
    "empty_string": ((json.dumps({"prompt": "  ", "response": "x"}) + "\n").encode(), 1, "prompt"),
    "not_a_string": ((GOOD + "\n" + json.dumps({"prompt": "hi", "response": 3}) + "\n").encode(), 2, "response"),
    "non_utf8": (GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "x"}\n', 2, None),
    "empty_file": (b"\n\n", None, None),
    "no_assistant": ((json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n").encode(), 1,
                     "messages"),
    "bad_role": ((json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n").encode(), 1, "messages[0]"),
    "not_an_object": (b'["prompt", "response"]\n', 1, None),
}


@pytest.mark.parametrize("case", BAD_JSONL)
def test_bad_jsonl_is_a_user_error_naming_file_line_and_field(case, tmp_path):
    content, line, field = BAD_JSONL[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(common.UserError) as e:
        common.data.load_data(str(path), "sft")
    msg = e.value.code
    assert msg.startswith("error: ") and "\n" not in msg
    assert f"{path}:{line}:" in msg if line else f"{path}:" in msg
    if field:
        assert f"'{field}'" in msg
    if case == "empty_file":
        assert "empty" in msg


def test_good_jsonl_in_both_formats(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(GOOD + "\n\n" + json.dumps({"messages": MULTI}) + "\n")
    records = common.data.load_data(str(path), "sft")
    assert records[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ."}]
    assert records[1]["messages"] == MULTI


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_plain(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_hf_round_trip_with_plain_transformers(family, tiny_models, tmp_path):
    tok = common.load_tokenizer(tiny_models[family])
    model = common.load_causal_lm(tiny_models[family], torch.float32, tok).eval()
    common.save_hf(model, tok, str(tmp_path / "out"), zero_stage=0)
    files = {f.name for f in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert not any(f.startswith(".staging") for f in files)
    loaded, loaded_tok = load_plain(tmp_path / "out")
    ids = torch.tensor([common.encode_prompt(tok, SINGLE[:1])])
    assert torch.allclose(logits_of(model, ids), logits_of(loaded, ids), atol=1e-5)
    assert loaded_tok.pad_token_id == tok.pad_token_id != loaded_tok.eos_token_id
    assert common.encode_prompt(loaded_tok, SINGLE[:1]) == ids[0].tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D layers, whose LoRA delta is transposed
def test_save_hf_merges_lora_into_plain_weights(family, tiny_models, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    tok = common.load_tokenizer(tiny_models[family])
    base = common.load_causal_lm(tiny_models[family], torch.float32, tok)
    ids = torch.tensor([common.encode_prompt(tok, SINGLE[:1])])
    before = logits_of(base, ids)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at 0 (a no-op adapter): make the merge matter
            torch.nn.init.normal_(p, std=0.2)
    model.eval()
    expect = logits_of(model, ids)
    assert (expect - before).abs().max() > 1e-2
    common.save_hf(model, tok, str(tmp_path / "out"), zero_stage=0)
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    loaded, _ = load_plain(tmp_path / "out")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    assert torch.allclose(logits_of(loaded, ids), expect, atol=1e-5)
    # ppo.py --ema deep-copies these weights: with autograd on they had a grad_fn, and --lora_rank --ema crashed
    assert all(v.grad_fn is None for v in copy.deepcopy(common.merged_state_dict(model)).values())
    # the adapter alone, into a folder with the user's README.md (peft's model card replaced it), from a base model
    # named relative to the working folder (the adapter loaded from nowhere else)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "README.md").write_text("my notes")
    monkeypatch.chdir(Path(tiny_models[family]).parent)
    model.peft_config["default"].base_model_name_or_path = Path(tiny_models[family]).name
    common.save_hf(model, tok, str(adapter), zero_stage=0, lora_adapter=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter / "README.md").read_text() == "my notes"
    assert Path(config["base_model_name_or_path"]) == Path(tiny_models[family]).resolve()


def test_a_typo_under_a_local_folder_is_not_a_hub_name(tmp_path, monkeypatch):
    """`--model run/typo` beside a folder `run` went to the hub (a minute of retries offline), as `org/name` does."""
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.UserError) as e:
        common.check_model_path("run/typo", "--model")
    assert e.value.code == "error: --model run/typo: no such model folder"


def test_save_hf_never_leaves_a_config_beside_broken_weights(tiny_models, tmp_path, monkeypatch):
    """Crash the save of a *different* model (gpt2 over llama) at every point: while save_pretrained writes, and
    after each file moved into place. Whenever config.json exists, the folder must load as one of the two models."""
    from transformers import PreTrainedModel

    out = tmp_path / "out"
    models = {}
    for family in ("llama", "gpt2"):
        tok = common.load_tokenizer(tiny_models[family])
        models[family] = (common.load_causal_lm(tiny_models[family], torch.float32, tok).eval(), tok)
    ids = torch.tensor([[5, 6, 7, 8]])
    expect = {f: logits_of(m, ids) for f, (m, _) in models.items()}

    def check_folder():
        if (out / "config.json").exists():
            loaded, _ = load_plain(out)
            got = logits_of(loaded, ids)
            assert any(got.shape == e.shape and torch.allclose(got, e, atol=1e-5) for e in expect.values())
            return True
        return False

    real_save = PreTrainedModel.save_pretrained

    def crashing_save(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        (Path(folder) / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("simulated crash")

    common.save_hf(*models["llama"], str(out), zero_stage=0)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crashing_save)
    with pytest.raises(RuntimeError):
        common.save_hf(*models["gpt2"], str(out), zero_stage=0)
    monkeypatch.undo()
    assert check_folder()  # the old model is untouched

    real_replace, n_files = os.replace, None
    for crash_at in range(100):
        calls = []

        def crashing_replace(src, dst):
            if len(calls) == crash_at:
                raise RuntimeError("simulated crash")
            calls.append(dst)
            real_replace(src, dst)

        common.save_hf(*models["llama"], str(out), zero_stage=0)
        monkeypatch.setattr(common.os, "replace", crashing_replace)
        try:
            common.save_hf(*models["gpt2"], str(out), zero_stage=0)
            n_files = len(calls)
        except RuntimeError:
            pass
        monkeypatch.undo()
        check_folder()
        if n_files is not None:
            break
    assert n_files and n_files > 2  # every crash point up to a complete save was tried
    assert torch.allclose(logits_of(load_plain(out)[0], ids), expect["gpt2"], atol=1e-5)


def test_check_finite_names_the_step_and_the_value():
    common.check_finite({"train/loss": 1.5, "train/lr": 1e-3}, step=3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(common.UserError) as e:
            common.check_finite({"train/loss": 1.5, "eval/loss": bad}, step=7)
        assert "step 7" in e.value.code and "eval/loss" in e.value.code


def test_latest_names_a_checkpoint_only_once_every_rank_has_written_it(tmp_path):
    """DeepSpeed's rank 0 wrote `latest` before the other ranks' shards were on disk (a kill then left a `latest`
    that cannot be loaded): common.runs.save_checkpoint asks DeepSpeed for no `latest` and writes it after the save's
    closing barrier, whole (through a temporary file)."""
    class Engine:
        def save_checkpoint(self, folder, tag, client_state, save_latest):
            assert not save_latest and not (tmp_path / "latest").exists() and client_state == {"step": 2}
            (tmp_path / tag).mkdir()

    common.runs.save_checkpoint(Engine(), str(tmp_path), "step2", {"step": 2})
    assert common.runs.latest_checkpoint(tmp_path) == "step2" and sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step2"]



FAULTS = """
import os, random, resource
import common

def faults():  # page faults while blocks of 64 KiB to 8 MiB are written and freed, as a step's tensors are
    rng, before = random.Random(0), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        blocks = [b"x" * rng.randint(1 << 16, 1 << 23) for _ in range(8)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
os.environ["MALLOC_ARENA_MAX"] = "4"  # the user's own malloc setting: left as it is
common.launcher.keep_freed_memory()
user = faults()
del os.environ["MALLOC_ARENA_MAX"]
common.launcher.keep_freed_memory()
faults()  # the heap grows once
print(default, user, faults())
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="not glibc")
def test_cpu_runs_keep_freed_memory_unless_the_user_tunes_malloc():
    """glibc by default returns freed blocks of a few MiB to the kernel and faults them in again on the next
    allocation; after launcher.keep_freed_memory() (CPU runs, from init_distributed) the same allocations fault no
    page in. Where the user set MALLOC_* (or GLIBC_TUNABLES, LD_PRELOAD), it does nothing."""
    env = {k: v for k, v in script_env().items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    p = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    default, user, kept = map(int, p.stdout.split())
    assert default > 10_000 and user > default / 2 and kept < default / 100


@pytest.mark.parametrize("case", ["module. prefix", "another architecture", "sequence classifier"])
def test_a_model_that_did_not_load_is_refused(case, tiny_models, tmp_path):
    """transformers loads weights it cannot place as random ones and only prints a report: a folder whose weights
    sit under a prefix, or belong to another architecture, is refused; so is a reward model given as a causal LM."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, GPT2Config

    folder = Path(shutil.copytree(tiny_models["llama"], tmp_path / "m"))
    tok = common.load_tokenizer(str(folder))
    if case == "module. prefix":
        weights = load_file(folder / "model.safetensors")
        save_file({f"module.{k}": v for k, v in weights.items()}, folder / "model.safetensors", {"format": "pt"})
        expect = r"of the model's \d+ weights are not in its files"
    elif case == "another architecture":
        GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2).save_pretrained(folder)
        expect = r"of the model's \d+ weights are not in its files"
    else:
        AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).save_pretrained(folder)
        expect = "is a sequence classifier"
    with pytest.raises(common.UserError, match=expect):
        common.load_causal_lm(str(folder), torch.float32, tok)
    if case != "sequence classifier":  # a new score head on a causal LM is the one expected miss
        common.from_pretrained(AutoModelForSequenceClassification, tiny_models["llama"], "--model", num_labels=1)


def test_paths_with_a_tilde_are_expanded_in_every_flag(monkeypatch, tmp_path):
    import tyro
    from conftest import stage_module

    monkeypatch.setenv("HOME", str(tmp_path))
    args = tyro.cli(stage_module("ppo").Args, args=["--output_dir=~/out", "--data", "~/a.jsonl,~/b.jsonl",
                                                    "--actor=~/m"], use_underscores=True)
    common.flags.check(args)
    assert (args.output_dir, args.actor) == (f"{tmp_path}/out", f"{tmp_path}/m")
    assert args.data == f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl"
