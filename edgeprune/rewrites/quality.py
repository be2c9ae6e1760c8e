"""How far each rewrite moves the model's output, measured with transformers on the PyTorch models.

For every (image, prompt) request and every rewrite: the KL divergence KL(p_ref || p_rewritten) of the
next-token distributions at the prompt's end, and whether greedy decoding gives the same tokens as the
unrewritten model (`steps` tokens). In-LLM visual-token dropping and SkipDecode change no module: their
variants run through `rewrites.reference.generate` (transformers' layers with the drops / skips applied);
SkipDecode leaves the prompt's distribution alone (KL 0 by construction) and shows in greedy agreement.
Random-weight twins make these numbers meaningless as quality
figures; the same command measures a real checkpoint given with `--model`.
"""

from __future__ import annotations

from typing import Callable

QUALITY_SIZES = ((640, 480), (480, 640), (512, 512), (800, 400))
QUALITY_PROMPTS = ("What is on the table?", "What color is the box?", "Describe the picture.",
                   "How many objects are there?", "Where is the ball?")


def quality_samples():
    """20 requests: the synthetic scene at four aspect ratios x five prompts."""
    from edgeprune.calibrate import Sample
    from edgeprune.sample_image import make_sample_image

    return [Sample(make_sample_image(w, h), p) for w, h in QUALITY_SIZES for p in QUALITY_PROMPTS]


def rewrite_quality(loaded, variants: dict, samples, steps: int = 8,
                    on_progress: Callable[[str], None] = lambda s: None) -> dict:
    """{"requests", "steps", "variants": {name: {"kl_mean", "kl_max", "greedy_agreement", "first_token_agreement",
    "rewrites"}}} for `variants` {name: RewritesRecipe} applied to copies of `loaded.model` (not modified)."""
    import torch

    from edgeprune.export import _prompt_template
    from edgeprune.rewrites.plan import rewrite_for_export

    template = _prompt_template(loaded.processor)
    requests = [loaded.processor(images=s.image, text=template.replace("{prompt}", s.prompt), return_tensors="pt")
                for s in samples]

    from edgeprune.rewrites import reference as torch_reference
    from edgeprune.rewrites.schedules import parse_drop_visual, parse_skip_decode

    def run(model, rewrites=None):
        drops = dict(parse_drop_visual(rewrites.drop_visual_after)) if rewrites else {}
        schedule = parse_skip_decode(rewrites.skip_decode) if rewrites else None
        out = []
        for inputs in requests:
            if drops or (schedule and schedule.stages):
                ref = torch_reference.generate(model, inputs, steps, drops, schedule.skip_at)
                out.append((torch.log_softmax(ref.logits[0].double(), dim=-1), ref.tokens))
                continue
            with torch.no_grad():
                logits = model(**inputs).logits[0, -1]
                tokens = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            out.append((torch.log_softmax(logits.double(), dim=-1), tokens[0, inputs["input_ids"].shape[1]:].tolist()))
        return out

    on_progress("reference")
    reference = run(loaded.model)
    report = {"requests": len(samples), "steps": steps, "variants": {}}
    for name, rewrites in variants.items():
        on_progress(name)
        model, _, _, changes = rewrite_for_export(loaded, rewrites, copy=True)
        result = run(model, rewrites)  # loaded.model itself when the variant changes nothing (then KL = 0)
        kls = [float((ref.exp() * (ref - got)).sum()) for (ref, _), (got, _) in zip(reference, result)]
        report["variants"][name] = {
            "kl_mean": sum(kls) / len(kls), "kl_max": max(kls),
            "greedy_agreement": sum(a == b for (_, a), (_, b) in zip(reference, result)) / len(kls),
            "first_token_agreement": sum(a[0] == b[0] for (_, a), (_, b) in zip(reference, result)) / len(kls),
            "rewrites": [r.summary() for r in changes] + [f"{key}: {getattr(rewrites, key)}" for key in
                                                           ("drop_visual_after", "skip_decode") if getattr(rewrites, key)],
        }
    return report
