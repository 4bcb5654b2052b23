"""common.disable_dropout turns dropout off in every family, also where a model copied the config's rate into a
float attribute at init (OPT's `self.dropout` and real OPT checkpoints ship dropout 0.1; Llama's
`self.attention_dropout`), so PPO's ratio starts at 1 and the reference's log-probs are deterministic."""

import pytest
import torch

import common
from conftest import FAMILIES, make_model, make_tokenizer

RATES = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop",
         "attn_pdrop", "classifier_dropout", "layerdrop")


def model_with_dropout(family: str, kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = make_tokenizer(family)
    cfg = make_model(family, tok).config
    for key in RATES:
        if hasattr(cfg, key):
            setattr(cfg, key, 0.5)  # set before the model is built, as a real checkpoint's config.json does
    cfg.num_labels = 1
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
    return cls.from_config(cfg, attn_implementation="eager"), tok


@pytest.mark.parametrize("kind", ["lm", "value"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_is_off_in_train_mode(family, kind):
    model, tok = model_with_dropout(family, kind)
    ids = torch.tensor([tok.encode("the cat sat on the mat and the dog ran")])

    def forward(seed: int):
        torch.manual_seed(seed)
        return model(input_ids=ids).logits

    model.train()
    assert not torch.equal(forward(1), forward(2)), "the test's model should have dropout on before the call"
    common.disable_dropout(model)
    model.train()  # DeepSpeed engines train in train mode: dropout must be off there too
    torch.testing.assert_close(forward(1), forward(2), rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(forward(3), forward(1), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_a_saved_model_keeps_its_dropout_rates(family, tmp_path):
    """Dropout is off while training, but the saved config.json holds the rates the model came with: no stage
    changes a model's config."""
    import json

    model, tok = model_with_dropout(family, "lm")
    rates = {k: v for k, v in model.config.to_dict().items() if k in RATES and v}
    assert rates and set(rates.values()) == {0.5}
    common.disable_dropout(model)
    assert all(getattr(model.config, k) == 0.0 for k in rates)
    common.save_hf(model, tok, str(tmp_path), zero_stage=0)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in rates} == rates
    assert all(getattr(model.config, k) == 0.0 for k in rates)  # and the model in memory still trains without
