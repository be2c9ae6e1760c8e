"""`edgeprune calibrate`: per-layer and per-head statistics of the PyTorch model on calibration requests.

Runs transformers' own forward (eager attention, so attention probabilities exist) over images and
prompts and records, averaged over the requests:

    lm.head_first_token_mass   [L][H]  mean attention of a query on the first token (dormant heads)
    lm.head_visual_mass        [L][H]  mean attention mass of text queries after the image on visual tokens (YOPO)
    lm.head_output_norm        [L][H]  mean L2 norm of each head's output (o_proj input slice)
    lm.head_output_mean        [L][H][Dh] mean output vector of each head (what `fold_pruned_heads` folds)
    lm.block_influence         [L]     mean over tokens of 1 - cos(h_in, h_out) of the decoder layer
    lm.last_text_visual_mass   [L]     attention mass of the last token on visual tokens (FastV / PyramidDrop)
    lm.last_text_visual_keep90 [L]     fraction of visual tokens holding 90% of that mass
    vision.head_first_token_mass / head_output_norm [Lv][Hv], vision.block_influence [Lv] (first token = CLS)

Hooks read the attention modules' returned probabilities and the o_proj inputs; nothing is re-implemented.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeprune.errors import ConfigError

STATS_FORMAT = "edgeprune-calibration"
STATS_VERSION = 1

# The built-in calibration set: the synthetic table scene at three aspect ratios x two prompts.
BUILTIN_SIZES = ((640, 480), (480, 640), (512, 512))
BUILTIN_PROMPTS = ("What is on the table?", "Describe the colors of the objects in the picture.")


@dataclass(frozen=True)
class Sample:
    image: object  # PIL RGB image
    prompt: str


def builtin_samples() -> list[Sample]:
    from edgeprune.sample_image import make_sample_image

    return [Sample(make_sample_image(w, h), p) for w, h in BUILTIN_SIZES for p in BUILTIN_PROMPTS]


def samples_from_jsonl(path: str | Path) -> list[Sample]:
    """`sweep`'s JSONL ({"image", "question", "answer"}); the answers are not used."""
    from PIL import Image, UnidentifiedImageError

    from edgeprune.sweep import load_questions

    out = []
    for q in load_questions(path):
        try:
            with Image.open(q.image) as img:
                out.append(Sample(img.convert("RGB"), q.question))
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f"--data: cannot read image {q.image} ({e})") from None
    return out


class _Sums:
    """Running sums of per-(layer, head) and per-layer statistics over requests."""

    def __init__(self):
        self.data: dict[str, list] = {}
        self.count = 0

    def add(self, key: str, layer: int, values) -> None:
        rows = self.data.setdefault(key, {})
        prev = rows.get(layer)
        if prev is None:
            rows[layer] = values
        elif isinstance(values, list):
            rows[layer] = [a + b for a, b in zip(prev, values)]
        else:
            rows[layer] = prev + values

    def means(self) -> dict:
        n = max(self.count, 1)
        out = {}
        for key, rows in self.data.items():
            ordered = [rows[i] for i in sorted(rows)]
            out[key] = [[v / n for v in r] if isinstance(r, list) else r / n for r in ordered]
        return out


def _hidden_in(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _influence(h_in, h_out) -> float:
    import torch

    cos = torch.nn.functional.cosine_similarity(h_in.flatten(0, -2), h_out.flatten(0, -2), dim=-1)
    return float((1.0 - cos).mean())


def _head_norms(x, dh: int) -> list[float]:  # x [..., H*Dh] -> mean over tokens of each head's L2 norm
    heads = x.reshape(-1, x.shape[-1] // dh, dh)
    return heads.norm(dim=-1).mean(dim=0).tolist()


def calibrate(loaded, samples: list[Sample], on_progress: Callable[[int, int], None] = lambda i, n: None) -> dict:
    """Statistics of `loaded` (a LoadedModel, not modified) over `samples`; the dict written as stats JSON."""
    import torch

    from edgeprune.export import _prompt_template

    model, processor = loaded.model, loaded.processor
    if not samples:
        raise ConfigError("no calibration samples; give --data with a JSONL of {image, question, answer}")
    template = _prompt_template(processor)
    lm_layers = model.model.language_model.layers
    v_layers = model.model.vision_tower.encoder.layers
    image_token = int(model.config.image_token_id)
    lm, vis = _Sums(), _Sums()
    state = {}  # the current request's visual-token mask [T] (bool)

    def lm_attn(i, _module, _args, out):
        probs = out[1][0]  # [H, T, T]
        visual = state["visual"]
        lm.add("head_first_token_mass", i, probs[:, 1:, 0].mean(dim=1).tolist())
        after = torch.arange(probs.shape[1]) > int(torch.nonzero(visual).max())  # text queries after the image
        after[-1] = True  # a prompt that ends with the image: its last token stands in
        lm.add("head_visual_mass", i, probs[:, after][:, :, visual].sum(dim=-1).mean(dim=1).tolist())
        last = probs[:, -1, visual].mean(dim=0)  # [Nv] the last token's attention on visual tokens
        mass = float(last.sum())
        share = torch.cumsum(torch.sort(last, descending=True).values, dim=0) / max(mass, 1e-30)
        lm.add("last_text_visual_mass", i, mass)
        lm.add("last_text_visual_keep90", i, (int((share < 0.9).sum()) + 1) / len(last))

    def norms(sums, i, dh, _module, args):
        sums.add("head_output_norm", i, _head_norms(args[0][0], dh))
        if sums is lm:  # [T, H*Dh] -> mean over tokens, flat [H*Dh]; reshaped per head in means()
            sums.add("head_output_mean", i, args[0][0].reshape(-1, args[0].shape[-1]).mean(dim=0).tolist())

    def block(sums, i, _module, args, kwargs, out):
        sums.add("block_influence", i, _influence(_hidden_in(args, kwargs), _first(out)))

    def vis_attn(i, _module, _args, out):
        vis.add("head_first_token_mass", i, out[1][:, :, 1:, 0].mean(dim=(0, 2)).tolist())  # [P, H, T, T]: CLS

    hooks = []
    for i, layer in enumerate(lm_layers):
        hooks += [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: lm_attn(i, m, a, o)),
                  layer.self_attn.o_proj.register_forward_pre_hook(
                      lambda m, a, i=i, dh=layer.self_attn.head_dim: norms(lm, i, dh, m, a)),
                  layer.register_forward_hook(lambda m, a, k, o, i=i: block(lm, i, m, a, k, o), with_kwargs=True)]
    for i, layer in enumerate(v_layers):
        hooks += [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: vis_attn(i, m, a, o)),
                  layer.self_attn.out_proj.register_forward_pre_hook(
                      lambda m, a, i=i, dh=layer.self_attn.head_dim: norms(vis, i, dh, m, a)),
                  layer.register_forward_hook(lambda m, a, k, o, i=i: block(vis, i, m, a, k, o), with_kwargs=True)]
    try:
        for n, sample in enumerate(samples):
            text = template.replace("{prompt}", sample.prompt)
            inputs = processor(images=sample.image, text=text, return_tensors="pt")
            state["visual"] = inputs["input_ids"][0] == image_token
            with torch.no_grad():
                model(**inputs)
            lm.count += 1
            vis.count += 1
            on_progress(n + 1, len(samples))
    finally:
        for h in hooks:
            h.remove()
    text_cfg, vision_cfg = model.config.text_config, model.config.vision_config
    return {
        "format": STATS_FORMAT, "version": STATS_VERSION,
        "model": loaded.name, "source": loaded.source, "weights_sha256": loaded.weights_sha256,
        "samples": len(samples),
        "lm": {"num_layers": len(lm_layers), "num_heads": text_cfg.num_attention_heads,
               "num_kv_heads": text_cfg.num_key_value_heads, **_per_head_means(lm.means(), lm_layers)},
        "vision": {"num_layers": len(v_layers), "num_heads": vision_cfg.num_attention_heads, **vis.means()},
    }


def _per_head_means(means: dict, layers) -> dict:
    """head_output_mean flat [L][H*Dh] -> [L][H][Dh]."""
    out = dict(means)
    out["head_output_mean"] = [[row[h * layer.self_attn.head_dim:(h + 1) * layer.self_attn.head_dim]
                                for h in range(len(row) // layer.self_attn.head_dim)]
                               for row, layer in zip(means["head_output_mean"], layers)]
    return out


def load_stats(path: str | Path) -> dict:
    """Reads a stats file written by `edgeprune calibrate`. ConfigError naming the fix when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"stats file {path} does not exist; write one with `edgeprune calibrate NAME --out {path}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"stats file {path} is not valid JSON ({e}); re-run `edgeprune calibrate`") from None
    if not isinstance(data, dict) or data.get("format") != STATS_FORMAT or data.get("version") != STATS_VERSION:
        raise ConfigError(f"{path} is not an edgeprune calibration file (version {STATS_VERSION}); "
                          "write one with `edgeprune calibrate`")
    lm = data.get("lm")
    keys = ("head_first_token_mass", "head_visual_mass", "head_output_norm", "block_influence")
    if not isinstance(lm, dict) or not all(isinstance(lm.get(k), list) for k in keys):
        raise ConfigError(f"{path} lacks language-model statistics ({', '.join(keys)}); re-run `edgeprune calibrate`")
    parts = [("lm", lm, k) for k in keys]
    vision = data.get("vision")
    if isinstance(vision, dict):  # optional; read by the vision rewrites
        parts += [("vision", vision, k) for k in ("head_first_token_mass", "head_output_norm", "block_influence")
                  if k in vision]
    for part, table, k in parts:
        rows = table[k] if isinstance(table[k], list) else None
        flat = [v for r in rows or [] for v in (r if isinstance(r, list) else [r])]
        if rows is None or len(rows) != table.get("num_layers") \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in flat):
            raise ConfigError(f"{path}: {part}.{k} must hold finite numbers for each of its {part}.num_layers layers")
    return data


def check_stats_fit(stats: dict, layers: int, heads: list[int], where: str = "stats") -> None:
    """ConfigError unless the stats describe a model with `layers` LM layers of `heads[l]` query heads each."""
    lm = stats["lm"]
    got = [len(r) for r in lm["head_output_norm"]]
    if lm["num_layers"] != layers or got != list(heads):
        raise ConfigError(f"{where} are from another model ({lm['num_layers']} LM layers with {got} heads; this model "
                          f"has {layers} with {list(heads)}); run `edgeprune calibrate` on this model")


def write_stats(stats: dict, out: str | Path) -> Path:
    """Writes the stats JSON via a temporary file (never half-written)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(stats, indent=1))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_heatmap(stats: dict, out: str | Path) -> Path:
    """A PNG of the per-(layer, head) scores: rows LM and vision, columns the statistics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("lm", k) for k in ("head_first_token_mass", "head_visual_mass", "head_output_norm")]
    panels += [("vision", k) for k in ("head_first_token_mass", "head_output_norm")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (part, key) in zip(axes[0], panels):
        rows = stats[part][key]  # [layers][heads]
        im = ax.imshow(rows, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(rows[0])))
        ax.set_yticks(range(len(rows)))
        ax.set_title(f"{part}: {key.removeprefix('head_')}", fontsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
