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
    for name, entry in d["graphs"].items():
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
        "rewrites": d.get("rewrites", []),
        "onnx": {k: v for k, v in _dict(d.get("onnx")).items() if k != "passes"},
        "graphs": graphs | {"lm_weights": {"file": lm_weights, "bytes": sizes.get(lm_weights, 0)}},
        "engines": engines,
        "sizes": {"total_bytes": sum(sizes.values()), "engines_bytes": engine_bytes, "files": sizes},
        "verified": (not mismatches) if verify else None,
        "mismatches": mismatches,
    }


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _matches(path: Path, digest: str) -> bool:
    from edgeprune_runtime.manifest import sha256_file

    try:
        return sha256_file(path) == digest
    except OSError:  # unreadable counts as not matching
        return False


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
