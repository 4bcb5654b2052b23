"""Dropout off while training (PPO's ratio and the reference's log-probs assume a deterministic model), and the
model's own rates written back into the config it is saved with: no stage changes a model's config. A leaf module:
it imports nothing of common."""

import weakref

import torch

_LOADED = {}  # id(config) -> (the config, the dropout rates it was loaded with)
KEYS = ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
        "activation_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "classifier_dropout", "layerdrop")


def disable_dropout(model: torch.nn.Module):
    """Dropout off everywhere: PPO's ratio and the reference's log-probs assume a deterministic model. Many models
    copy the config's rate into a float attribute at init (OPT's `self.dropout`, Llama's `self.attention_dropout`,
    OPT's `layerdrop`), so those are zeroed too, not only nn.Dropout modules and the config."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for key, value in list(vars(m).items()):
            if type(value) is float and ("dropout" in key or key.endswith(("pdrop", "layerdrop"))):
                setattr(m, key, 0.0)
    cfg = getattr(model, "config", None)
    rates = {k: getattr(cfg, k) for k in KEYS if isinstance(getattr(cfg, k, None), float) and getattr(cfg, k)}
    if rates:  # zeroed while training; save_hf writes the model's own rates back into the saved config
        _LOADED[id(cfg)] = (weakref.ref(cfg), {**loaded_dropout(cfg), **rates})
        for key in rates:
            setattr(cfg, key, 0.0)


def loaded_dropout(cfg) -> dict:
    """The non-zero rates `cfg` had before disable_dropout zeroed them."""
    ref, rates = _LOADED.get(id(cfg), (None, {}))
    return rates if ref is not None and ref() is cfg else {}
