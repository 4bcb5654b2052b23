"""Tiny models of five families, built offline from configs, with tokenizers trained here by `tokenizers`.

Each family's tokenizer is set up the awkward way its real one is: GPT-2 and GPT-NeoX have no pad token, Llama adds
a BOS, OPT's BOS *is* its EOS (`</s>`), Qwen2 has a ChatML chat template whose EOS is `<|im_end|>`."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("sft", "reward", "ppo")
FORKS = {}  # stage -> path of a forked script given with --script, tested in place of ROOT / "<stage>.py"


def pytest_addoption(parser):
    parser.addoption("--script", action="append", default=[], metavar="[STAGE=]PATH",
                     help="test a fork in place of its stage's script: `--script ppo_mine.py` (the stage is the "
                          "name's prefix: sft, reward or ppo) or `--script ppo=path/to/fork.py`; may be repeated")


def pytest_configure(config):
    for spec in config.getoption("--script"):
        stage, _, path = spec.rpartition("=")
        stage = stage or next((s for s in STAGES if Path(path).name.startswith(s)), "")
        if stage not in STAGES or not Path(path).is_file():
            raise pytest.UsageError(f"--script {spec}: expected [sft|reward|ppo=]PATH of an existing file whose "
                                    "name starts with its stage")
        FORKS[stage] = Path(path).resolve()


def script_path(script: str) -> Path:
    """The file that runs for `script` ("ppo.py"): the fork given with --script, else the repo's own."""
    return FORKS.get(Path(script).stem, ROOT / script)


def stage_module(stage: str):
    """The stage script imported as a module (the fork given with --script, if any), as `import ppo` would: the
    reference tests call its functions, so a fork's math is checked against the same slow references."""
    import importlib.util

    if stage not in sys.modules:
        spec = importlib.util.spec_from_file_location(stage, script_path(f"{stage}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[stage] = module  # before running it: dataclasses and pickling look the module up by name
        spec.loader.exec_module(module)
    return sys.modules[stage]


FAMILIES = ["gpt2", "llama", "opt", "qwen2", "neox"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus():
    import common

    prompts = sum((common.toy.toy_prompts(s) for s in common.toy.SPLITS), [])
    import random

    rng = random.Random(0)
    return prompts + [common.toy.toy_response(p, rng) for p in prompts] + ["Human: Assistant: hello world"] * 5


def make_tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {
        "gpt2": dict(eos_token="<|endoftext|>"),
        "neox": dict(eos_token="<|endoftext|>", bos_token="<|endoftext|>"),
        "llama": dict(eos_token="</s>", bos_token="<s>"),
        "opt": dict(eos_token="</s>", bos_token="</s>", pad_token="<pad>"),
        "qwen2": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    }[family]
    extra = ["<|im_start|>"] if family == "qwen2" else []
    names = list(dict.fromkeys(list(specials.values()) + extra))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=names,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family in ("llama", "opt"):
        bos = specials["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials, additional_special_tokens=extra or None)
    if family == "qwen2":
        fast.chat_template = CHATML
    return fast


def make_model(family: str, tokenizer):
    from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig,
                              Qwen2Config)

    v = len(tokenizer)
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    cfg = {
        "gpt2": lambda: GPT2Config(vocab_size=v, n_positions=256, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, **ids),
        "llama": lambda: LlamaConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                     **ids),
        "opt": lambda: OPTConfig(vocab_size=v, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=256, word_embed_proj_dim=64,
                                 dropout=0.0, attention_dropout=0.0, **ids),
        "qwen2": lambda: Qwen2Config(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                     **ids),
        "neox": lambda: GPTNeoXConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=256, hidden_dropout=0.0,
                                      attention_dropout=0.0, **ids),
    }[family]()
    import torch

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """{family: folder} of saved tiny causal LMs with their tokenizers."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        tok = make_tokenizer(family)
        make_model(family, tok).save_pretrained(d)
        tok.save_pretrained(d)
        out[family] = str(d)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(ranks: int = 1, env_extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),  # common.py for a fork
               TQDM_DISABLE="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"
               if ranks > 1 else env.get("OMP_NUM_THREADS", "2"), **(env_extra or {}))
    return env


def run_script(script: str, *args, ranks: int = 1, timeout: int = 600, check: bool = True, env_extra=None):
    """Run a stage script as a subprocess (1 rank: plain python; N ranks: deepspeed's launch.py on CPU/gloo)."""
    env = script_env(ranks, env_extra)
    if ranks == 1:
        cmd = [sys.executable, str(script_path(script)), *map(str, args)]
    else:  # deepspeed's launch.py, as the `deepspeed` runner starts it on one node (the runner itself would only
        # add ~3 s of start-up; test_safety.py's launcher test runs under it)
        import base64
        import json

        world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(ranks))}).encode()).decode()
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script_path(script)), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def kill_when(script: str, *args, ready, timeout: int = 300):
    """Run a stage script (one rank, the environment of run_script) and SIGKILL it, as a crash would, the moment
    `ready()` holds; the run must not have ended first."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, str(script_path(script)), *map(str, args)], cwd=ROOT, env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"


def read_metrics(folder) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small demo SFT actor (`sft`) and a reward model trained on the demo's preference pairs (`rm`)."""
    d = tmp_path_factory.mktemp("demo")
    run_script("sft.py", "--output_dir", d / "sft", "--max_steps", "300", "--eval_every", "0")
    run_script("reward.py", "--model", d / "sft", "--output_dir", d / "rm", "--max_steps", "200", "--eval_every", "0")
    return d


@pytest.fixture(scope="session")
def few_prompts(tmp_path_factory) -> list:
    """ppo.py flags for the demo's prompts from small files (its first 128 train prompts, 16 eval prompts) with the
    learning rates that `toy` picks: encoding the demo's 4096 + 58 prompts takes seconds a run, and tests that
    compare two runs need only a few."""
    import json

    import common

    d = tmp_path_factory.mktemp("prompts")
    files = {}
    for split, n in (("train", 128), ("eval", 16)):
        files[split] = d / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in common.toy.toy_data("prompts", split)[:n]))
    return ["--data", files["train"], "--eval_data", files["eval"], "--learning_rate", "2e-4",
            "--critic_learning_rate", "5e-4"]


_approx = pytest.approx


def _approx_plain_numbers(expected, *args, **kwargs):
    """pytest.approx on plain numbers only: pytest 9.2 iterates a 0-d tensor and fails (seen on a fresh install);
    call .item() / .tolist() first."""
    import torch

    def has_tensor(x):
        if isinstance(x, torch.Tensor):
            return True
        if isinstance(x, dict):
            return any(has_tensor(v) for v in x.values())
        return isinstance(x, (list, tuple)) and any(has_tensor(v) for v in x)

    if has_tensor(expected):
        raise TypeError("pytest.approx got a torch.Tensor; pass .item() or .tolist()")
    return _approx(expected, *args, **kwargs)


pytest.approx = _approx_plain_numbers


@pytest.fixture(autouse=True)
def release_locks():
    """A script's main called in this process keeps its output folder's lock until the process exits, as a run does:
    each test gives back what it took."""
    yield
    from common import launcher

    for lock, pid in launcher._held_locks:
        launcher._release_lock(lock, pid)
    launcher._held_locks.clear()
