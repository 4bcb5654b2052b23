"""The built-in demo task ("toy"): an assistant world whose human preference is a program (gold_score), with its
data, tokenizer and tiny model, built offline in seconds."""

import random
from collections import Counter

# ----------------------------------------------------------------------------------------------------------------
# the built-in demo task ("toy"): an assistant world whose human preference is a program, gold_score

TOPICS = ["cats", "dogs", "rain", "music", "coffee", "books", "trains", "gardens", "oceans", "mountains", "bread",
          "chess", "winter", "robots", "birds", "tea", "bikes", "stars", "rivers", "cheese", "clocks", "forests",
          "soup", "lamps"]
POSITIVE = ["lovely", "great", "warm", "bright", "kind", "calm", "fun", "sweet", "nice", "good"]
NEGATIVE = ["awful", "dull", "cold", "sad", "bad", "grim", "noisy", "boring", "ugly", "rough"]
VERBS = ["are", "seem", "feel", "look"]
FILLERS = ["i think", "to me", "really", "very", "so", "truly"]
ASKS = ["tell me about {t}", "what do you think of {t} ?", "say something about {t}", "describe {t}",
        "give me a line about {t}", "write about {t}"]
OPENERS = ["", "please ", "hey , ", "quick question : "]
SPLITS = {"sft": (0, 40), "reward": (40, 70), "ppo": (70, 90), "eval": (90, 100)}  # percent of the prompt set
TOY_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}"
                     "<|endoftext|>{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def toy_prompts(split: str) -> list[str]:
    """The demo's prompts of one split; the splits are disjoint (DeepSpeed-Chat's data split)."""
    every = [o + a.format(t=t) for t in TOPICS for a in ASKS for o in OPENERS]
    random.Random(1234).shuffle(every)
    lo, hi = SPLITS[split]
    return every[len(every) * lo // 100: len(every) * hi // 100]


def prompt_topic(prompt: str) -> str | None:
    words = prompt.replace("?", " ").split()
    return next((w for w in reversed(words) if w in TOPICS), None)


def gold_score(prompt: str, response: str) -> float:
    """The hidden human of the demo, in [0, 1]: on topic (0.35), positive words (0.35), ends cleanly with one final
    " ." and 4-12 words (0.15), no word used more than twice (0.15)."""
    words = response.split()
    if not words:
        return 0.0
    topic = prompt_topic(prompt)
    on_topic = 1.0 if topic in words and not any(w in TOPICS for w in words if w != topic) else 0.0
    adjectives = [w for w in words if w in POSITIVE or w in NEGATIVE]
    positive = sum(w in POSITIVE for w in adjectives) / len(adjectives) if adjectives else 0.0
    clean = 1.0 if words[-1] == "." and words.count(".") == 1 and 4 <= len(words) <= 12 else 0.0
    varied = 1.0 if max(Counter(words).values()) <= 2 else 0.0
    return 0.35 * on_topic + 0.35 * positive + 0.15 * clean + 0.15 * varied


def gold_reward_fn(prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """The demo's gold score as a reward function for `ppo.py --reward_fn common.toy:gold_reward_fn` (the upper bound
    a learned reward model is compared with)."""
    return [gold_score(messages[-1]["content"], response) for messages, response in zip(prompts, responses)]


def toy_response(prompt: str, rng: random.Random) -> str:
    """One demonstration of mixed quality: each of gold_score's parts is met only part of the time."""
    topic = prompt_topic(prompt)
    subject = topic if rng.random() < 0.5 else rng.choice(TOPICS)
    adjs = [rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE) for _ in range(rng.choice([1, 2, 2, 3]))]
    words = [subject, rng.choice(VERBS)]
    if rng.random() < 0.3:
        words += rng.choice(FILLERS).split()
    if rng.random() < 0.25:
        words += [adjs[0]] * 3  # a repetitive answer
    words += " and ".join(adjs).split()
    if rng.random() < 0.6:
        words.append(".")
    elif rng.random() < 0.5:
        words += [". and", rng.choice(TOPICS)]
    return " ".join(words)


def toy_data(kind: str, split: str) -> list[dict]:
    """Demo records: SFT demonstrations, gold-labelled preference pairs, or prompts. `split` is train/eval; the
    train split of each kind uses its own prompt set, every eval split uses the shared eval prompts."""
    part = {"sft": "sft", "pairs": "reward", "prompts": "ppo"}[kind] if split == "train" else "eval"
    prompts = toy_prompts(part)
    rng = random.Random(f"{kind}-{split}")
    if kind == "prompts":  # PPO: 4096 draws from the PPO prompts; eval: each eval prompt once
        draws = [rng.choice(prompts) for _ in range(4096)] if split == "train" else prompts
        return [{"prompt": [{"role": "user", "content": p}]} for p in draws]
    n = {"sft": 6000, "pairs": 16000}[kind] if split == "train" else 256
    records = []
    while len(records) < n:
        p = rng.choice(prompts)
        if kind == "sft":
            records.append({"messages": [{"role": "user", "content": p},
                                         {"role": "assistant", "content": toy_response(p, rng)}]})
        else:
            a, b = toy_response(p, rng), toy_response(p, rng)
            ga, gb = gold_score(p, a), gold_score(p, b)
            if abs(ga - gb) >= 0.15:
                chosen, rejected = (a, b) if ga > gb else (b, a)
                records.append({"prompt": [{"role": "user", "content": p}],
                                "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}]})
    return records


def toy_tokenizer():
    """A byte-level BPE tokenizer trained with `tokenizers` on the demo's words, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
    rng = random.Random(0)
    corpus = toy_prompts("sft") + toy_prompts("reward") + toy_prompts("ppo") + toy_prompts("eval")
    corpus += [toy_response(p, rng) for p in corpus for _ in range(3)]
    corpus += [" ".join(TOPICS + POSITIVE + NEGATIVE + VERBS + FILLERS)] * 10
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   additional_special_tokens=specials[2:])
    fast.chat_template = TOY_CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


TOY_CONTEXT = 512  # RoPE: the context sets no weights; 512 fits the scripts' default --max_seq_len


def toy_model(tokenizer):
    """A ~1M-parameter Llama-shaped causal LM (dropout 0), random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=TOY_CONTEXT,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(cfg)
