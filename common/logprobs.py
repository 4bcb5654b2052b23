"""Token log-probs (and entropies) without the B x T x V logits: the LM head runs on the scored positions
only, a chunk at a time, with an fp32 log-sum-exp; the backward recomputes each chunk (docs/performance.md)."""


import torch

import common

# ----------------------------------------------------------------------------------------------------------------
# token log-probs without the B x T x V logits

# config fields of models that transform the logits after the LM head (Gemma 2, Cohere, Granite): those models take
# the plain path, the whole logits from the model's forward, then the same chunked log-sum-exp
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _chunk_logprobs(head, h: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool):
    """log p(token) at a chunk of positions (and the entropy there): the head, then an fp32 log-sum-exp."""
    logits = head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp
    p = torch.softmax(logits, -1)
    p = p * logits if torch.is_grad_enabled() else p.mul_(logits)  # without autograd, no second V-wide copy
    return torch.stack([logp, lse - p.sum(-1)], -1)  # H = log Z - sum_v p_v z_v


class _LinearLogprobs(torch.autograd.Function):
    """log p(token) at a chunk of positions for a plain linear head, in training: the forward keeps the chunk's
    inputs and its log-sum-exp, the backward recomputes the logits and turns them into the gradient in place
    (d logp / d z = onehot - softmax(z)), so a chunk costs about two V-wide fp32 buffers where autograd through
    a recomputed log-softmax would hold five. with_entropy: (log-probs, entropies), each with its gradient
    (dH / dz = -p (log p + H)), for the same two buffers."""

    @staticmethod
    def forward(ctx, h, weight, bias, tokens, temperature, with_entropy=False):
        z = torch.nn.functional.linear(h, weight, bias).float().div_(temperature)  # a new tensor either way
        lse = torch.logsumexp(z, -1)
        logp = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
        entropy = None
        if with_entropy:
            log_p = z.sub_(lse[:, None])
            entropy = -log_p.exp().mul_(log_p).sum(-1)
        ctx.save_for_backward(h, weight, bias, tokens, lse, entropy)
        ctx.temperature = temperature
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad, grad_entropy=None):
        h, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        z = torch.nn.functional.linear(h, weight, bias).float().div_(ctx.temperature)
        if entropy is None:
            g = z.sub_(lse[:, None]).exp_()  # softmax
            g.scatter_add_(1, tokens[:, None], torch.full_like(lse[:, None], -1.0))  # softmax - onehot
            g = g.mul_(grad[:, None] / -ctx.temperature)
        else:  # grad (onehot - p) - grad_entropy p (log p + H)
            log_p = z.sub_(lse[:, None])
            g = log_p.exp().mul_(log_p.add_(entropy[:, None]).mul_(grad_entropy[:, None]).add_(grad[:, None]))
            g = g.neg_().scatter_add_(1, tokens[:, None], grad[:, None]).div_(ctx.temperature)
        g = g.to(h.dtype)  # d loss / d (h W^T + b)
        need = ctx.needs_input_grad
        return (g @ weight if need[0] else None, g.t() @ h if need[1] else None,
                g.sum(0) if bias is not None and need[2] else None, None, None, None)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: int | torch.Tensor,
                   temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False):
    """log p(token | the tokens before it) under softmax(logits / temperature), from one forward, with the LM head
    applied only at the positions that predict the scored tokens, chunk_size positions at a time: no B x T x V
    tensor is ever made, and in training each chunk's logits are recomputed in the backward pass instead of kept.
    `targets`: an int k scores input_ids[:, k:] (returns B x (T - k)); a bool mask shaped like input_ids scores the
    tokens where it holds (never column 0; returns them flat, row by row). with_entropy: (log-probs, entropies).

    The head's own forward is swapped for the chunked one while the model runs its usual forward, so everything
    around it holds: a DeepSpeed engine (ZeRO-3 gathers the head for its forward and backward, and the engine's
    backward hooks sit on the output), a peft adapter on the head, disable_adapter()."""
    from deepspeed import DeepSpeedEngine
    from torch.utils.checkpoint import checkpoint

    if isinstance(targets, int):
        tokens = input_ids[:, targets:]

        def pick(x):
            return x[:, targets - 1: -1]
    else:
        tokens = input_ids[:, 1:][targets[:, 1:]]

        def pick(x):
            return x[:, :-1][targets[:, 1:]]
    flat = tokens.reshape(-1)

    def chunk(head, h, t):
        args = (head, h, t, temperature, with_entropy)
        if not torch.is_grad_enabled():
            return _chunk_logprobs(*args)
        if linear is not None:  # inside the head's forward: ZeRO-3 has gathered its weights
            out = _LinearLogprobs.apply(h, linear.weight, linear.bias, t, temperature, with_entropy)
            return torch.stack(out, -1) if with_entropy else out
        return checkpoint(_chunk_logprobs, *args, use_reentrant=False)  # any other head: recomputed by autograd

    def scored(head, x):
        assert x.shape[1] == input_ids.shape[1], "the LM head did not get every position"
        if not len(flat):  # no token: score one position and return none of it, so that the graph reaches x
            return chunk(head, x.reshape(-1, x.shape[-1])[:1], flat.new_zeros(1))[:0]
        x = pick(x).reshape(-1, x.shape[-1])
        return torch.cat([chunk(head, x[i: i + chunk_size], flat[i: i + chunk_size])
                          for i in range(0, len(flat), chunk_size)])

    inner = model.module if isinstance(model, DeepSpeedEngine) else model
    inner = inner.get_base_model() if hasattr(inner, "peft_config") else inner
    head = inner.get_output_embeddings()
    linear = head if type(head) is torch.nn.Linear else None  # not a peft layer, nor a subclass with its own forward
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=common.position_ids(attention_mask),
                  use_cache=False)
    if head is None or any(getattr(inner.config, k, None) for k in LOGIT_TRANSFORMS):
        linear = None
        out = scored(lambda z: z, model(**kwargs).logits)
    else:
        own, original = head.__dict__.get("forward"), head.forward
        head.forward = lambda x: scored(original, x)
        try:
            out = model(**kwargs).logits
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own
    if with_entropy:
        return out[:, 0].reshape(tokens.shape), out[:, 1].reshape(tokens.shape)
    return out.reshape(tokens.shape)
