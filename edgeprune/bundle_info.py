"""`edgeprune info BUNDLE`: what a bundle holds, read from its manifest (no torch, no ONNX Runtime session).

The manifest is checked by the runtime's own loader (structure, listed files, no strays); `verify` then
hashes every listed file and reports each mismatch instead of stopping at the first.
"""

from __future__ import annotations

from pathlib import Path


def bundle_info(bundle: str | Path, verify: bool = False) -> dict:
    """{"bundle", "created", "edgeprune_version", "model", "recipe", "shapes", "rewrites", "onnx", "graphs",
    "engines", "sizes", "verified", "mismatches"}: sizes in bytes; `verified` is None unless `verify`, then
    True only when every file matches its sha256 (`mismatches` lists the others).

    Raises RuntimeStatusError(BUNDLE_INVALID) for a directory that is not a well-formed bundle."""
    from edgeprune_runtime.manifest import load_manifest

    m = load_manifest(bundle, verify_hashes=False)
    d = m.data
    sizes = {rel: (m.root / rel).stat().st_size for rel in sorted(m.files)}
    mismatches = [rel for rel, digest in sorted(m.files.items()) if not _matches(m.root / rel, digest)] if verify else []
    graphs = {}
    entries = {name: e for name, e in d["graphs"].items() if name != "decode_skip"}
    entries |= {f"decode_skip{k}": e for k, e in _dict(d["graphs"].get("decode_skip")).items()}  # SkipDecode's graphs
    for name, entry in entries.items():
        if not isinstance(entry, dict):  # "lm_weights": a path shared by the LM graphs
            continue
        files = [entry[k] for k in ("file", "weights") if isinstance(entry.get(k), str)]
        graphs[name] = {"file": entry["file"], "bytes": sum(sizes.get(f, 0) for f in files)}
        if "dynamic" in entry:
            graphs[name]["dynamic"] = entry["dynamic"]
    lm_weights = d["graphs"]["lm_weights"]
    engines = {}  # what `edgeprune build` recorded; shown as found (its files are hashed like every other)
    for target, entry in _dict(d.get("engines")).items():
        entry = _dict(entry)
        engines[target] = {"library": entry.get("library"), "version": entry.get("version"),
                           "engines": {name: {"file": _dict(e).get("file"), "bytes": _dict(e).get("bytes")}
                                       for name, e in _dict(entry.get("engines")).items()}}
    engine_bytes = sum(size for rel, size in sizes.items() if rel.startswith("engines/"))
    return {
        "bundle": str(m.root.resolve()),
        "created": d.get("created"),
        "edgeprune_version": d.get("edgeprune_version"),
        "model": {k: d["source"].get(k) for k in ("model", "path", "weights_sha256", "weights_bytes", "options")},
        "recipe": d["recipe"],
        "shapes": d["shapes"],
        "rewrites": _rewrites(d),
        "onnx": {k: v for k, v in _dict(d.get("onnx")).items() if k != "passes"},
        "graphs": graphs | {"lm_weights": {"file": lm_weights, "bytes": sizes.get(lm_weights, 0)}},
        "engines": engines,
        "sizes": {"total_bytes": sum(sizes.values()), "engines_bytes": engine_bytes, "files": sizes},
        "verified": (not mismatches) if verify else None,
        "mismatches": mismatches,
    }


def _rewrites(d: dict) -> dict:
    """What the rewrites changed, from the manifest: the passes' one-line summaries; per LM source layer whether it
    runs, its KV groups and heads kept, visual and cache slots; per CLIP layer (up to the feature layer) whether
    it runs and its heads; the SkipDecode schedule ([[from decode position, lowest layers skipped], ...])."""
    layers = _dict(d.get("layers"))
    lm = [{k: r.get(k) for k in ("source_layer", "runs", "kv_groups_kept", "heads_kept", "visual_slots", "cache_slots")}
          for r in layers.get("lm", []) if isinstance(r, dict)]
    vision = [{k: r.get(k) for k in ("source_layer", "runs", "heads_kept")} for r in layers.get("vision", [])
              if isinstance(r, dict)]
    return {"summary": d.get("rewrites", []), "lm_layers": lm, "vision_layers": vision,
            "skip_decode": d.get("skip_decode", []), "vision_keep": d.get("vision_keep", {})}


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _matches(path: Path, digest: str) -> bool:
    from edgeprune_runtime.manifest import sha256_file

    try:
        return sha256_file(path) == digest
    except OSError:  # unreadable counts as not matching
        return False


def _rewrite_lines(rw: dict, s: dict) -> list[str]:
    """One line per LM layer (runs or skipped, heads, visual/cache slots) and per CLIP layer that differs from the
    source, plus the SkipDecode schedule; nothing for a bundle without rewrites."""
    lines = [f"rewrite  {line}" for line in rw["summary"]]
    lm = rw["lm_layers"]
    changed = any(not r["runs"] or r.get("visual_slots") not in (None, s["visual_slots"]) for r in lm) or \
        len({len(r["heads_kept"] or []) for r in lm}) > 1 or any(len(r["kv_groups_kept"] or []) < max(
            len(x["kv_groups_kept"] or []) for x in lm) for r in lm)
    if lm and (changed or len(rw["summary"]) > 1):
        for r in lm:
            if not r["runs"]:
                lines.append(f"lm       layer {r['source_layer']:3d} skipped")
                continue
            lines.append(f"lm       layer {r['source_layer']:3d} heads {len(r['heads_kept'] or [])} "
                         f"(KV groups {r['kv_groups_kept']}), visual slots {r.get('visual_slots', s['visual_slots'])}, "
                         f"cache slots {r.get('cache_slots', s['cache_capacity'])}")
        for r in rw["vision_layers"]:
            if not r["runs"]:
                lines.append(f"vision   layer {r['source_layer']:3d} skipped")
            elif r["heads_kept"] and rw["vision_layers"] and len(r["heads_kept"]) < max(
                    len(x["heads_kept"] or []) for x in rw["vision_layers"]):
                lines.append(f"vision   layer {r['source_layer']:3d} heads {r['heads_kept']}")
    if rw["skip_decode"]:
        lines.append("decode   SkipDecode: " + ", ".join(f"from position {p} skip the lowest {k} layer(s)"
                                                          for p, k in rw["skip_decode"]))
    return lines


def summary_lines(info: dict) -> list[str]:
    """The human-readable form of `bundle_info` (one fact per line)."""
    s, r, model = info["shapes"], info["recipe"], info["model"]
    lines = [
        f"bundle   {info['bundle']} ({info['sizes']['total_bytes'] / 1e6:.1f} MB, exported {info['created']} "
        f"by edgeprune {info['edgeprune_version']})",
        f"model    {model['model']} from {model['path']} (weights sha256 {str(model['weights_sha256'])[:12]}...)",
        f"recipe   budget {r.get('budget')}, strategy {r.get('strategy')}, newlines {r.get('newlines')}; opset "
        f"{info['onnx'].get('opset')}, {info['onnx'].get('precision')}"
        + (f", target {info['onnx']['target']}" if info["onnx"].get("target") else ""),
        f"shapes   K={s['visual_topk']} of {s['partitions'] * s['patches_per_partition']} patch tokens, "
        f"{s['visual_slots']} visual slots, {s['prefill_slots']} prefill slots, cache {s['cache_capacity']}, "
        f"{s['num_layers']} LM layers",
    ]
    for name, g in info["graphs"].items():
        lines.append(f"graph    {name:10s} {g['file']} ({g['bytes'] / 1e6:.1f} MB)")
    lines += _rewrite_lines(info["rewrites"], s)
    for target, e in info["engines"].items():
        parts = ", ".join(f"{n} {v['bytes'] / 2**20:.1f} MiB" for n, v in e["engines"].items()
                          if isinstance(v["bytes"], (int, float)))
        lines.append(f"engines  {target}: {e['library']} {e['version']}: {parts}")
    if not info["engines"]:
        lines.append("engines  none (edgeprune build BUNDLE --target T)")
    if info["verified"] is not None:
        lines.append("verify   every file matches its sha256" if info["verified"] else
                     f"verify   MISMATCH: {', '.join(info['mismatches'])} (modified or corrupt; re-export)")
    return lines
