"""Token pruning inside the vision tower (EViT-style, static): a per-layer schedule of patch tokens kept.

Recipe key `vision_keep` / flag `--vision-keep`: "LAYER:FRACTION,..." e.g. "8:0.5,16:0.25" = before CLIP
layer 8 each partition keeps its 50% (of N patches) with the highest CLS attention (`graphs.cls_attention`
at that layer's input, fp32 in every precision), before layer 16 the best 25%. Layers count from 0 in the
CLIP encoder; layer 0 always sees every token (HiRED's early scores come from it), and a layer past
the feature layer does not exist in the exported tower. Shapes stay static: [P, 1+keep, Dv] after each cut.

The final selection picks its K among the survivors: a dropped patch counts as invalid (padding) there,
so K is filled exactly whenever the surviving real patches number at least K, which `keep_counts`
demands of the partitions together (P x last keep >= K). An image with padded crops has fewer real
survivors, as it has fewer real patches without pruning: then every surviving real patch is kept.
"""

from __future__ import annotations

from edgeprune.errors import ConfigError

# named schedules (recipe `vision_keep = "<name>"`), as fractions of the partition's N patches
NAMED = {
    "evit-half": "8:0.5",  # one cut a third of the way into CLIP-L (23 layers used)
    "evit-quarter": "8:0.5,16:0.25",  # two cuts: the fast recipe's default for budget 0.2
}


def parse_schedule(text: str) -> tuple[tuple[int, float], ...]:
    """'8:0.5,16:0.25' (or a NAMED schedule) -> ((8, 0.5), (16, 0.25)). "" -> () (pruning off).

    Raises ConfigError (one line, naming the fix) for bad syntax, fractions outside (0, 1], layers
    not increasing, or fractions that grow (a schedule must be monotone: tokens never come back)."""
    text = NAMED.get(text.strip(), text.strip())
    if not text:
        return ()
    out: list[tuple[int, float]] = []
    for part in text.split(","):
        layer, sep, frac = part.strip().partition(":")
        try:
            item = (int(layer), float(frac))
        except ValueError:
            item = None
        if not sep or item is None:
            raise ConfigError(f"vision_keep (--vision-keep) entry {part.strip()!r} is not LAYER:FRACTION; "
                              f"write e.g. 8:0.5,16:0.25 or a name ({', '.join(NAMED)})")
        layer_i, frac_f = item
        if not (0.0 < frac_f <= 1.0):
            raise ConfigError(f"vision_keep (--vision-keep): fraction {frac_f:g} at layer {layer_i} must be in (0, 1]")
        if layer_i < 1:
            raise ConfigError(f"vision_keep (--vision-keep): layer {layer_i} cannot prune: layer 0 sees every token "
                              "(the first layer that may keep fewer is 1)")
        if out and layer_i <= out[-1][0]:
            raise ConfigError(f"vision_keep (--vision-keep) is not monotone: layer {layer_i} follows layer {out[-1][0]}; "
                              "list layers in increasing order")
        if out and frac_f > out[-1][1]:
            raise ConfigError(f"vision_keep (--vision-keep) is not monotone: layer {layer_i} keeps {frac_f:g} after "
                              f"layer {out[-1][0]} kept {out[-1][1]:g}; pruned tokens cannot come back")
        out.append((layer_i, frac_f))
    return tuple(out)


def keep_counts(text: str, patches: int, layers: int, partitions: int, k: int) -> dict[int, int]:
    """{layer: patch tokens each partition keeps from that layer on} for a tower of `layers` CLIP layers
    (up to the feature layer) with `patches` per partition; {} when pruning is off.

    Raises ConfigError for a layer the exported tower does not have, or a schedule whose survivors
    (partitions x last keep) are fewer than the K visual slots."""
    schedule = parse_schedule(text)
    counts: dict[int, int] = {}
    for layer, frac in schedule:
        if layer >= layers:
            raise ConfigError(f"vision_keep (--vision-keep) names CLIP layer {layer}, but the exported tower has layers "
                              f"0..{layers - 1} (up to the feature layer)")
        counts[layer] = max(1, int(patches * frac))
    if counts:
        last = counts[max(counts)]
        if partitions * last < k:
            raise ConfigError(f"vision_keep (--vision-keep) keeps {last} tokens per partition ({partitions * last} in all), "
                              f"fewer than the K = {k} visual slots of the budget; keep a larger fraction or lower --budget")
    return counts
