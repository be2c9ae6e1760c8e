"""PyTorch reference for in-LLM visual-token dropping and SkipDecode, from transformers' own modules.

The exported graphs implement both rewrites with static slots, masks and a per-layer cache; this module
implements them the plain way, as the papers describe them, so tests and `scripts/rewrite_quality.py`
have something independent to hold the bundle against:

  - the prompt's embeddings come from the model's own forward (a pre-hook on the language model captures
    `inputs_embeds`: text embeddings with the image features merged in, as transformers builds them);
  - every step recomputes the whole sequence (no KV cache) with transformers' decoder layers, rotary
    embedding, norm and head, layer by layer; layer l sees exactly the tokens present at l: a visual token
    dropped after layer L is absent from every later layer, and a generated token whose decode position
    skips the lowest k layers (SkipDecode) enters at layer k with its embedding and is absent below;
  - the kept visual tokens are chosen once, on the prompt, from layer L's attention weights (eager
    attention's own) of the last prompt token, mean over heads, top KEEP among the visual tokens present.

`model` must already carry the other rewrites (rewrites.plan.apply_record): layer l here is the l-th
layer that runs, as in `--drop-visual-after`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class _Captured(Exception):
    pass


def prompt_embeddings(model, inputs: dict) -> torch.Tensor:
    """[n, D]: the language model's input for `inputs` (the processor's output), via a forward pre-hook."""
    found = {}

    def hook(module, args, kwargs):
        found["embeds"] = kwargs["inputs_embeds"]
        raise _Captured

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    return found["embeds"][0]


@dataclass
class _Token:
    embed: torch.Tensor  # [D]
    position: int
    visual: bool
    enters: int = 0  # first layer it runs (SkipDecode)


@dataclass
class ReferenceRun:
    tokens: list[int] = field(default_factory=list)  # greedy tokens, the first from the prompt
    logits: list[torch.Tensor] = field(default_factory=list)  # [vocab] per token
    kept_visual: list[list[int]] = field(default_factory=list)  # per drop stage: prompt positions kept


def generate(model, inputs: dict, steps: int, drops: dict[int, int] | None = None, skip_at=lambda p: 0) -> ReferenceRun:
    """Greedy `steps` tokens with visual tokens dropped after layer L ({L: KEEP}) and the lowest `skip_at(p)`
    layers skipped for the token at decode position p (0 = the first generated token fed back)."""
    drops = drops or {}
    lm = model.model.language_model
    image_token = model.config.image_token_id
    ids = inputs["input_ids"][0].tolist()
    embeds = prompt_embeddings(model, inputs)
    seq = [_Token(embeds[i], i, ids[i] == image_token) for i in range(len(ids))]
    run = ReferenceRun()
    dropped: dict[int, set[int]] = {}  # layer -> prompt positions absent from it on (filled on the prompt pass)
    with torch.no_grad():
        for step in range(steps):
            logits = _forward(model, lm, seq, drops, dropped, run, first_pass=step == 0)
            token = int(torch.argmax(logits))
            run.tokens.append(token)
            run.logits.append(logits)
            p = len(seq)
            seq.append(_Token(model.get_input_embeddings()(torch.tensor([token]))[0], p, False, skip_at(step)))
    return run


def _forward(model, lm, seq: list[_Token], drops, dropped, run: ReferenceRun, first_pass: bool) -> torch.Tensor:
    """Logits [vocab] of the last token of `seq`, running each layer on the tokens present at it."""
    hidden: dict[int, torch.Tensor] = {}  # position -> hidden state [D] entering the current layer
    gone: set[int] = set()
    for index, layer in enumerate(lm.layers):
        gone |= dropped.get(index, set())
        present = [t for t in seq if t.enters <= index and t.position not in gone]
        for t in present:
            hidden.setdefault(t.position, t.embed)
        x = torch.stack([hidden[t.position] for t in present])[None]  # [1, n, D]
        pos = torch.tensor([[t.position for t in present]])  # [1, n]
        causal = pos[0][None, :] <= pos[0][:, None]  # [n, n]
        mask = torch.where(causal, 0.0, torch.finfo(torch.float32).min)[None, None]
        weights = {}
        handle = layer.self_attn.register_forward_hook(lambda m, a, out: weights.update(w=out[1]))
        try:
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=lm.rotary_emb(x, pos))
        finally:
            handle.remove()
        x = x[0] if isinstance(x, tuple) else x
        for t, row in zip(present, x[0]):
            hidden[t.position] = row
        if first_pass and index in drops:
            probs = weights["w"][0, :, -1].mean(dim=0)  # [n]: the last prompt token's row, mean over heads
            visual = [(float(probs[j]), t.position) for j, t in enumerate(present) if t.visual]
            kept = sorted(p for _, p in sorted(visual, key=lambda sp: (-sp[0], sp[1]))[: drops[index]])
            dropped[index + 1] = {p for _, p in visual} - set(kept)
            run.kept_visual.append(kept)
    last = hidden[seq[-1].position]
    return model.lm_head(lm.norm(last[None]))[0]
