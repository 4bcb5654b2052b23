"""A verifiable task for a real small model: "What is A + B?", rewarded 1 when the answer's first number is A + B.

    python experiments/arithmetic.py OUT_DIR            # OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl ({"prompt"})
    python experiments/arithmetic.py --score ANSWERS    # accuracy of chat.py --output's answers (and --compare's)
    python ppo.py --actor MODEL --reward none --reward_fn experiments/arithmetic.py:reward \\
        --data OUT_DIR/train.jsonl --eval_data OUT_DIR/eval.jsonl ...       # README, "A real model"

The eval prompts are pairs that never occur in training. `reward` has the signature of `ppo.py --reward_fn`."""

import json
import os
import random
import re
import sys

QUESTION = "What is {a} + {b}? Answer with just the number."


def pairs(seed: int = 0, low: int = 1, high: int = 20) -> list[tuple[int, int]]:
    """Every (a, b) in [low, high]^2, shuffled."""
    every = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    random.Random(seed).shuffle(every)
    return every


def reward(prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """1.0 where the response's last integer is the sum the prompt asks for, else 0.0."""
    out = []
    for messages, response in zip(prompts, responses):
        a, b = map(int, re.findall(r"-?\d+", messages[-1]["content"])[:2])
        numbers = re.findall(r"-?\d+", response.replace(",", ""))
        out.append(float(bool(numbers) and numbers[-1] == str(a + b)))
    return out


def score(path: str):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    for key in ("response", "response_compare"):
        if key in rows[0]:
            r = reward([[{"role": "user", "content": row["prompt"]}] for row in rows], [row[key] for row in rows])
            print(f"{key}: accuracy {sum(r) / len(r):.3f} on {len(r)} prompts")


if __name__ == "__main__" and sys.argv[1] == "--score":
    score(sys.argv[2])
elif __name__ == "__main__":
    out_dir = sys.argv[1]
    n_train, n_eval = (int(x) for x in sys.argv[2:4]) if len(sys.argv) >= 4 else (336, 64)
    every = pairs()
    os.makedirs(out_dir, exist_ok=True)
    for name, chunk in (("eval", every[:n_eval]), ("train", every[n_eval: n_eval + n_train])):
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            for a, b in chunk:
                f.write(json.dumps({"prompt": QUESTION.format(a=a, b=b)}) + "\n")
    print(f"{out_dir}: {n_train} train and {n_eval} eval prompts")
