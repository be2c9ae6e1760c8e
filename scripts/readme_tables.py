"""`make readme-tables`: the README's generated sections, from the raw results in docs/results/.

    .venv/bin/python scripts/readme_tables.py           rewrite every generated section of README.md
    .venv/bin/python scripts/readme_tables.py --check   exit 1 if README.md differs from what the results give

A generated section sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; NAME picks the
results file and the renderer below. Every section says the command that produced its file and where
it ran (commit, CPU, cores, library versions). Units: seconds, tokens/s, GiB (2**30 bytes) for memory.
Text outside the markers is left as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"
GIB = 2**30
# The product's targets for the bench (what "met" is measured against), not measurements.
TARGETS = {"ttft_speedup": 3.0, "decode_speedup": 1.3, "rss_over_weights_cache": 1.2}
# issue 9's targets for the fast recipe (edgeprune/recipes/llava-next-fast.toml)
FAST_TARGETS = {**TARGETS, "ttft_speedup": 6.0}
FAST_BENCH = "bench-7b-shape-fast.json"


class ResultsError(Exception):
    """A results file is missing or malformed (user-fixable: rerun the command it names)."""


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB"


def secs(s: float) -> str:
    return f"{s:.2f} s" if s < 1 else f"{s:.1f} s"


def ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def load(name: str) -> dict:
    path = RESULTS / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path.relative_to(ROOT)} is missing; run the command the README names for it") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path.relative_to(ROOT)} is not JSON ({e})") from None


def where(report: dict, file: str) -> str:
    """One line: the raw file, the commit and the machine it ran on, library versions."""
    p = report["provenance"]
    m, lib = p["machine"], p["libraries"]
    libs = ", ".join(f"{k} {lib[k]}" for k in ("torch", "transformers", "onnxruntime") if lib.get(k))
    dirty = " with uncommitted changes" if p.get("dirty") else ""
    return (f"Raw: [`docs/results/{file}`](docs/results/{file}) — commit `{(p['commit'] or 'unknown')[:10]}`{dirty}, "
            f"{p['date'][:10]}, {m['cpu']} ({m['cores']} cores, {m['memory_gib']:.1f} GiB), {libs}.")


def command(report: dict, file: str) -> str:
    """The command that wrote docs/results/FILE: record_result.py around the measuring command."""
    options = f" {report['recorded_options']}" if report.get("recorded_options") else ""
    return (f"```\n.venv/bin/python scripts/record_result.py docs/results/{file}{options} -- \\\n"
            f"    {report['recorded_command']}\n```")


# --- renderers: results dict -> markdown -------------------------------------------------------


def render_bench(r: dict, file: str = "bench-7b-shape.json", targets: dict = TARGETS) -> str:
    hf, ours, q = r["transformers"], r["edgeprune"], r["ratios"]
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    own = ours["weights_bytes"] + ours["cache_bytes"]
    t = ours["timings"]
    text = ours["prefill_slots"] - ours["visual_slots"]
    rows = [
        "| | transformers `generate` (full image) | edgeprune bundle (budget {b:g}, `{s}`) | ratio | target |".format(
            b=r["budget"], s=r["strategy"]),
        "|---|---|---|---|---|",
        f"| time to first token | {secs(hf['ttft_s'])} | {secs(ours['ttft_s'])} | **{ratio(q['ttft_speedup'])} faster** "
        f"| {targets['ttft_speedup']:g}x: {met(q['ttft_speedup'] >= targets['ttft_speedup'])} |",
        f"| decode | {hf['decode_tokens_per_s']:.1f} tokens/s | {ours['decode_tokens_per_s']:.1f} tokens/s "
        f"| **{ratio(q['decode_speedup'])} faster** "
        f"| {targets['decode_speedup']:g}x: {met(q['decode_speedup'] >= targets['decode_speedup'])} |",
        f"| peak RSS | {gib(hf['peak_rss_bytes'])} | {gib(ours['peak_rss_bytes'])} | {ratio(q['peak_rss_ratio'])} | |",
        f"| peak RSS / (weights + KV cache) | | {gib(ours['peak_rss_bytes'])} / {gib(own)} = "
        f"**{q['peak_rss_vs_weights_plus_cache']:.2f}** | | <= {targets['rss_over_weights_cache']:g}: "
        f"{met(q['peak_rss_vs_weights_plus_cache'] <= targets['rss_over_weights_cache'])} |",
        f"| prompt | {hf['prefill_tokens']} tokens | {ours['prefill_slots']} slots ({ours['visual_slots']} visual, "
        f"{ours['visual_tokens']} valid, + {text} text) | | |",
    ]
    stages = (f"The bundle's time to first token by stage (the runtime's `timings`): image {secs(t['image_s'])}, "
              f"preprocessing {secs(t['preprocess_s'])}, vision {secs(t['vision_s'])}, prefill {secs(t['prefill_s'])}; "
              f"{ours['generated_tokens']} tokens generated, KV cache {ours['cache_slots']} slots.")
    return "\n".join([command(r, file), "", *rows, "", stages, "", where(r, file)])


def render_selection_cost(r: dict) -> str:
    names = list(r["strategies"])
    rows = [
        "| strategy | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| selection, one-layer graphs | " + " | ".join(f"{1000 * r['strategies'][n]['selection_s']:+.1f} ms"
                                                       for n in names) + " |",
        "| vision graph vs no selection | " + " | ".join(f"{100 * r['strategies'][n]['overhead']:+.1f}%"
                                                        for n in names) + " |",
    ]
    base = (f"Vision graph without selection (CLIP to the feature layer + projector on every patch): "
            f"{secs(r['no_selection_s'])} (median of {r['repeats']}); one-layer graphs: "
            f"{1000 * r['no_selection_1layer_s']:.0f} ms without selection (medians of {r['short_repeats']}).")
    return "\n".join([command(r, "selection-cost-7b-shape.json"), "", *rows, "", base, "",
                      where(r, "selection-cost-7b-shape.json")])


def render_sweep(r: dict) -> str:
    quality = r["questions"] > 0
    head = "| strategy | budget | visual tokens | TTFT | decode | peak RSS |" + (" agreement | accuracy |" if quality else "")
    rows = [head, "|---|---|---|---|---|---|" + ("---|---|" if quality else "")]
    for x in r["rows"]:
        line = (f"| {x['strategy']} | {x['budget']:g} | {x['visual_tokens']} | {secs(x['ttft_s'])} | "
                f"{x['decode_tokens_per_s']:.1f} tokens/s | {gib(x['peak_rss_bytes'])} |")
        if quality:
            line += f" {x['agreement']:.2f} | {x['accuracy']:.2f} |"
        rows.append(line)
    note = (f"{r['max_new_tokens']} new tokens on the {r['timing_image']}, "
            f"{r['questions']} questions" + ("." if quality else " (no `--data`: speed and memory only)."))
    return "\n".join([command(r, "sweep-7b-shape.json"), "", *rows, "", note, "", where(r, "sweep-7b-shape.json")])


def render_mutation(r: dict) -> str:
    """One row per module, each from the run named in its "run" (modules are run one `--only` at a time)."""
    reasons = _survivor_reasons()
    rows = ["| module | mutants run | killed | timeout | survived | no tests | score | not run | run at |",
            "|---|---|---|---|---|---|---|---|---|"]
    survivors, commands = [], []
    for module, m in r["modules"].items():
        v = m["verdicts"]
        score = f"**{100 * m['score']:.1f}%**" if m["mutants"] else "-"
        runs = m.get("runs") or [{"only": r.get("only") or [], "commit": r["provenance"].get("commit")}]
        at = ", ".join(dict.fromkeys(f"`{x['commit'][:10]}`" for x in runs if x.get("commit"))) if m["mutants"] else "-"
        if m["mutants"] and m.get("file_sha256") != _sha256(ROOT / m["file"]):
            at += " (file changed since: rerun)"
        rows.append(f"| `{m['file']}` | {m['mutants']} | {v.get('killed', 0) + v.get('segfault', 0)} | {v.get('timeout', 0)} | "
                    f"{v.get('survived', 0)} | {v.get('no tests', 0)} | {score} | {m.get('not_run', 0)} | {at} |")
        survivors += m["survivors"]
        for x in runs if m["mutants"] else []:
            only = x.get("only") or []
            flags = (["--survivors"] if x.get("survivors") else []) + (["--only", *(f"'{g}'" for g in only)] if only else [])
            cmd = " ".join([".venv/bin/python scripts/mutation.py", *flags]) if flags else r["command"]
            if cmd not in commands:
                commands.append(cmd)
    out = ["```\n" + "\n".join(commands) + "\n```", "", *rows, ""]
    if survivors:
        missing = [s["name"] for s in survivors if s["name"] not in reasons]
        if missing:
            raise ResultsError(f"{len(missing)} surviving mutant(s) have no reason in docs/mutation-survivors.toml "
                               f"(kill them or say why each is equivalent): {', '.join(missing[:5])}"
                               + (" ..." if len(missing) > 5 else ""))
        out.append("Survivors, each equivalent or accepted for the reason given:")
        out.append("")
        for s in survivors:
            change = " / ".join(ln.strip() for ln in s["diff"].splitlines() if ln.startswith("+"))[:140]
            out.append(f"- `{s['name']}` ({s['verdict']}): `{change}` — {reasons[s['name']]}")
        out.append("")
    out.append(where(r, "mutation.json"))
    return "\n".join(out)


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _survivor_reasons() -> dict[str, str]:
    path = ROOT / "docs" / "mutation-survivors.toml"
    if not path.exists():
        return {}
    return {k: str(v) for k, v in tomllib.loads(path.read_text()).get("survivors", {}).items()}


TRT_FILES = ("trt-llava-next-7b-shape.json", "trt-llava-next-7b-shape-fp16.json", "trt-llava-next-tiny.json")


def _export_command(b: dict) -> str:
    layers = f" --layers {b['options']['layers']}" if "layers" in b.get("options", {}) else ""
    precision = " --precision fp16" if b["precision"] == "fp16" else ""
    return f"edgeprune export {b['source']}{layers} --budget {b['budget']:g}{precision} --out BUNDLE"


def render_trt_build(first: dict) -> str:
    """Engine sizes and build times per bundle (TensorRT-RTX CPU-only build), from every trt-*.json."""
    reports = [first] + [load(f) for f in TRT_FILES[1:]]
    rows = ["| bundle | vision engine (weights) | LM engine (weights) | engines / weights | build time |",
            "|---|---|---|---|---|"]
    for r in reports:
        b, e, w = r["bundle"], r["build"]["engines"], r["bundle"]["weights_bytes"]
        name = f"`{b['source']}`" + (f" --layers {b['options']['layers']}" if "layers" in b.get("options", {}) else "")
        g = lambda n: f"{n / GIB:.3g} GiB"  # noqa: E731  (three digits: the tiny twin's are MB)
        rows.append(f"| {name}, budget {b['budget']:g}, {b['precision']} | {g(e['vision']['bytes'])} "
                    f"({g(w['vision'])}) | {g(e['lm']['bytes'])} ({g(w['lm'])}) | "
                    f"**{r['build']['engines_vs_weights']:.3f}x** | {secs(e['vision']['build_seconds'])} + "
                    f"{secs(e['lm']['build_seconds'])} |")
    cmds = [f"{_export_command(r['bundle'])}\n{r['recorded_command']}" for r in reports]
    build = reports[0]["build"]
    note = (f"{build['library']} {build['version']}, CPU-only ahead-of-time build for compute capabilities "
            f"{'/'.join(build['compute_capabilities'])}.")
    return "\n".join(["```\n" + "\n".join(cmds) + "\n```", "", *rows, "", note, "",
                      *[where(r, f) for r, f in zip(reports, TRT_FILES)]])


def render_trt_memory(first: dict) -> str:
    """`check`'s device-memory estimate per target, fp32 and fp16, at the depth the results were scaled to."""
    reports = [first, load(TRT_FILES[1])]
    layers = first["memory_estimates"]["lm_layers"]
    rows = ["| target | device memory | " + " | ".join(f"estimate, {r['bundle']['precision']}" for r in reports) + " |",
            "|---|---|" + "---|" * len(reports)]
    for name, est in first["memory_estimates"]["targets"].items():
        cells = []
        for r in reports:
            e = r["memory_estimates"]["targets"][name]
            cells.append(f"{gib(e['total_bytes'])} ({'fits' if e['fits'] else 'does not fit'})")
        rows.append(f"| `{name}` | {gib(est['device_bytes'])} | " + " | ".join(cells) + " |")
    e32 = first["memory_estimates"]["targets"][next(iter(first["memory_estimates"]["targets"]))]
    parts = (f"weights {gib(e32['weights_bytes'])} + KV cache {gib(e32['kv_cache_bytes'])} + largest activation "
             f"{gib(e32['activation_bytes'])} in fp32")
    return "\n".join([f"As if the LM had {layers} layers ({parts}); `check` also refuses a precision the target "
                      "cannot run (FP16 on `p40`), whatever the memory.", "", *rows, "",
                      *[where(r, f) for r, f in zip(reports, TRT_FILES)]])


def render_matmul_forms(r: dict) -> str:
    m = r["matmul"]
    rows = [f"| form (one [M, {m['k']}] x [{m['k']}, {m['n']}] MatMul, {r['threads']} threads) | M = 704 (prefill) | M = 1 (decode) |",
            "|---|---|---|"]
    rows += [f"| {row['form']} | {row['prefill_704_ms']:.0f} ms | {row['decode_1_ms']:.2f} ms |" for row in r["rows"]]
    return "\n".join([command(r, "matmul-forms.json"), "", *rows, "", where(r, "matmul-forms.json")])


def render_peak_memory(r: dict, file: str = "peak-memory-7b-shape-fast.json") -> str:
    """The runtime's defaults against ORT's CPU arena, then the defaults' resident memory stage by stage (--stages)."""
    settings = {"default": "defaults (no CPU arena, prefill in steps)", "arena_on": "`EDGEPRUNE_CPU_ARENA=1`",
                "prefill_one_call": "`EDGEPRUNE_PREFILL_CHUNK=0` (prefill in one call)"}
    rows = ["| setting | peak RSS | / (weights + KV cache) | time to first token | decode |", "|---|---|---|---|---|"]
    for key, label in settings.items():
        if key not in r:
            continue
        x = r[key]
        rows.append(f"| {label} | {gib(x['peak_rss_bytes'])} | **{x['peak_rss_vs_weights_plus_cache']:.2f}** | "
                    f"{secs(x['ttft_s'])} | {x['decode_tokens_per_s']:.1f} tokens/s |")
    d = r["default"]
    lines = [command(r, file), "", *rows, "",
             f"Weights {gib(d['weights_bytes'])} (lm.weights + vision.weights), KV cache {gib(d['cache_bytes'])}; "
             f"{d['generated_tokens']} tokens, the same in every setting: {'yes' if r['same_tokens'] else 'no'}."]
    if "stages" in d:
        lines += ["", "The defaults' run stage by stage (`--stages`: each stage's own peak, and what stays resident "
                  "after it, private or file-backed, i.e. mapped weight pages):", "",
                  "| stage | peak | resident after | private | file-backed |", "|---|---|---|---|---|"]
        lines += [f"| {st['stage']} | {gib(st['peak'])} | {gib(st['rss'])} | {gib(st['anon'])} | {gib(st['file'])} |"
                  for st in d["stages"]]
    return "\n".join([*lines, "", where(r, file)])


def render_genai(r: dict) -> str:
    g, i4, f32, q = r["onnxruntime_genai"], r["edgeprune_int4"], r["edgeprune_fp32"], r["ratios"]
    rows = [
        "| | decode | context (cache) at the first token | model / LM weights on disk |",
        "|---|---|---|---|",
        f"| onnxruntime-genai {g['version']} INT4 (`builder -p int4 -e cpu`) | {g['decode_tokens_per_s']:.1f} tokens/s "
        f"| {g['context_tokens']} tokens | {gib(g['model_bytes'])} |",
        f"| edgeprune int4 bundle | **{i4['decode_tokens_per_s']:.1f} tokens/s** | {i4['context_tokens']} tokens "
        f"| {gib(i4['lm_weights_bytes'])} |",
        f"| edgeprune fp32 bundle | {f32['decode_tokens_per_s']:.1f} tokens/s | {f32['context_tokens']} tokens "
        f"| {gib(f32['lm_weights_bytes'])} |",
    ]
    summary = (f"int4 bundle / onnxruntime-genai INT4: **{ratio(q['int4_vs_genai_int4'])}**; "
               f"int4 bundle / fp32 bundle: **{ratio(q['int4_vs_fp32_bundle'])}** (aim: 3x). "
               f"{r['max_new_tokens']} greedy tokens each, one child process per side, one after the other.")
    return "\n".join([command(r, "genai-side-by-side-7b-shape.json"), "", *rows, "", summary, "",
                      where(r, "genai-side-by-side-7b-shape.json")])


def render_fidelity(r: dict) -> str:
    b, ref = r["bundle"], r["reference"]
    what = lambda d: f"{d['precision']}, vision keep {d['vision_keep'] or 'none'}, {d['strategy']} {d['budget']:g}"  # noqa: E731
    rows = ["| request | logit cosine, min (mean) up to the first different token | greedy agreement |", "|---|---|---|"]
    rows += [f"| {q['image']}, \"{r['prompt']}\" | {q['logit_cosine_min']:.4f} ({q['logit_cosine_mean']:.4f}) "
             f"| {q['agreed']}/{q['tokens']} |" for q in r["requests"]]
    return "\n".join([command(r, "fidelity-7b-shape-fast.json"), "",
                      f"`{b['path']}` ({what(b)}) against `{ref['path']}` ({what(ref)}), {b['source']}:", "", *rows, "",
                      where(r, "fidelity-7b-shape-fast.json")])


def render_boundary(r: dict) -> str:
    rows = ["| prompt ends | last pre-token: canonical tokens | exact: top next byte | plain tokens: TV / same top | "
            "token healing: TV / same top | exact: step calls, time |", "|---|---|---|---|---|---|"]
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    for x in r["rows"]:
        rows.append(f"| `…{x['prompt_end']}` | `{x['tail']!r}`: {len(x['tail_tokens'])} | `{x['exact_top_byte']!r}` "
                    f"{x['exact_top_p']:.2f} | {x['naive_tv']:.2f} / {yes(x['naive_top_is_exact'])} | "
                    f"{x['healing_tv']:.2f} / {yes(x['healing_top_is_exact'])} | {x['exact_step_calls']}, "
                    f"{1000 * x['exact_s']:.0f} ms |")
    mean = (f"Mean total-variation distance from the exact next-byte distribution: plain tokens "
            f"{r['mean_naive_tv']:.2f}, token healing {r['mean_healing_tv']:.2f}.")
    return "\n".join([command(r, "boundary-tiny.json"), "", *rows, "", mean, "", where(r, "boundary-tiny.json")])


def render_concurrency(r: dict, file: str = "concurrency-tiny.json") -> str:
    rows = ["| concurrent requests | requests/s | tokens/s (all requests) | mean time to first token |", "|---|---|---|---|"]
    for x in r["rows"]:
        rows.append(f"| {x['concurrency']} | {x['requests_per_s']:.3g} | {x['tokens_per_s']:.3g} | {secs(x['mean_ttft_s'])} |")
    note = (f"One `Bundle`; per thread {r['requests_per_thread']} greedy request(s) of {r['max_new_tokens']} tokens "
            f"(EOS ignored); median of {r['rounds']} round(s); every answer equals the single-threaded one.")
    return "\n".join([command(r, file), "", *rows, "", note, "", where(r, file)])


def render_multiturn(r: dict, file: str = "multiturn-tiny.json") -> str:
    f, n = r["follow_up"], r["fresh"]
    rows = ["| request | image | preprocess | vision | prefill / follow-up step | time to first token |", "|---|---|---|---|---|---|"]
    for name, x in (("fresh request (same question, new image load)", n), ("follow-up turn (Bundle.chat)", f)):
        rows.append(f"| {name} | " + " | ".join(f"{1000 * x[k]:.1f} ms" if x[k] < 1 else secs(x[k]) for k in
                                                ("image_s", "preprocess_s", "vision_s", "prefill_s", "ttft_s")) + " |")
    note = (f"Medians over {r['rounds']} conversations of {len(r['questions'])} questions "
            f"({', '.join(repr(q) for q in r['questions'])}), {r['max_new_tokens']} tokens per answer.")
    return "\n".join([command(r, file), "", *rows, "", note, "", where(r, file)])


def render_cache_policies(r: dict, file: str = "cache-policies-7b-shape.json") -> str:
    marks = ("10%", "50%", "100%", "10x")
    rows = ["| policy | " + " | ".join(f"tokens/s to {m} of C" for m in marks) + " | slots evicted | RSS at 10% / 10x | stop |",
            "|---|" + "---|" * (len(marks) + 3)]
    for x in r["policies"]:
        at = x["marks"]
        rate = lambda m: f"{at[m]['tokens_per_s']:.1f}" if at.get(m) else "-"  # noqa: E731
        last = next(at[m] for m in reversed(marks) if at.get(m))
        rss = f"{at['10%']['rss_mib'] / 1024:.2f} / {last['rss_mib'] / 1024:.2f} GiB" if at.get("10%") else "-"
        rows.append(f"| {x['policy']} | " + " | ".join(rate(m) for m in marks) +
                    f" | {last['evicted_slots']} | {rss} | {x['stop_reason']} after {x['tokens']} tokens |")
    note = (f"Cache capacity C = {r['cache_capacity']} slots ({r['policies'][0]['prompt_slots']} of them the prompt), "
            f"{r['sinks']} sinks, eviction chunk {r['eviction_chunk']} slots. Each rate is the decode tokens/s "
            "between the previous mark and this one (generated tokens = 0.1 C, 0.5 C, C, 10 C); `stop` ends when "
            "the cache is full, so its later marks are empty. RSS at 10x is at the last mark the run reached.")
    return "\n".join([command(r, file), "", *rows, "", note, "", where(r, file)])


def render_eviction_cost(r: dict, file: str = "eviction-cost-7b-shape.json") -> str:
    rows = ["| policy | cache capacity C | slots per eviction | ms per eviction | ms per evicted slot (amortised per token) |",
            "|---|---|---|---|---|"]
    for x in r["rows"]:
        rows.append(f"| {x['policy']} | {x['capacity']} | {x['evicted_per_chunk']} | {x['ms_per_eviction']:.1f} | "
                    f"{x['ms_per_evicted_slot']:.2f} |")
    note = (f"A host cache of {r['layers']} layers x {r['kv_heads']} KV heads x head dim {r['head_dim']} (the 7B shape), "
            f"{r['sinks']} sinks; median of {r['repeats']} evictions, each choosing the chunk, moving the survivors "
            "and re-rotating their keys.")
    return "\n".join([command(r, file), "", *rows, "", note, "", where(r, file)])


def render_rewrites_quality(r: dict) -> str:
    rows = ["| rewrite | what it changed | KL mean | KL max | same greedy tokens |", "|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        changed = "; ".join(v["rewrites"]) or "nothing"
        rows.append(f"| `{name}` | {changed} | {v['kl_mean']:.4f} | {v['kl_max']:.4f} | {v['greedy_agreement']:.2f} |")
    note = (f"{r['requests']} requests, {r['steps']} greedy tokens each, against the unrewritten `{r['model']}`; KL of "
            "the next-token distributions at the prompt's end (SkipDecode changes only later tokens: KL 0 there).")
    return "\n".join([command(r, "rewrites-quality-tiny.json"), "", *rows, "", note, "",
                      where(r, "rewrites-quality-tiny.json")])


REWRITE_BENCH = ("unpruned", "heads-25", "heads-50", "skip-1-layer", "drop-visual-after-1")
REWRITE_BENCH_FILES = tuple(f"rewrites-bench-7b-shape-{name}.json" for name in REWRITE_BENCH)


def render_rewrites_bench(first: dict) -> str:
    """One bench per rewrite of the same model, the unpruned bundle first: TTFT (and its prefill part) and decode."""
    present = [(n, f) for n, f in zip(REWRITE_BENCH, REWRITE_BENCH_FILES) if (RESULTS / f).exists()]
    reports = [first] + [load(f) for _, f in present[1:]]
    names, files = [n for n, _ in present], [f for _, f in present]
    missing = [n for n in REWRITE_BENCH if n not in names]
    base = reports[0]["edgeprune"]
    rows = ["| bundle | rewrites | LM layers / KV heads | visual slots per layer | time to first token (vision, prefill) "
            "| decode | vs unpruned: TTFT, prefill, decode |", "|---|---|---|---|---|---|---|"]
    for name, r in zip(names, reports):
        e, t = r["edgeprune"], r["edgeprune"]["timings"]
        rw = ", ".join(f"{k} {v}" for k, v in r.get("rewrites", {}).items()) or "none"
        visual = e.get("layer_visual_slots") or [e["visual_slots"]] * e["lm_layers"]
        rows.append(f"| {name} | {rw} | {e['lm_layers']} / {sum(e['kv_heads'])} | {', '.join(map(str, visual))} | "
                    f"{secs(e['ttft_s'])} ({secs(t['vision_s'])}, {secs(t['prefill_s'])}) | "
                    f"{e['decode_tokens_per_s']:.1f} tokens/s | "
                    f"{base['ttft_s'] / e['ttft_s']:.2f}x, {base['timings']['prefill_s'] / t['prefill_s']:.2f}x, "
                    f"{e['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |")
    cmds = "\n".join(f".venv/bin/python scripts/record_result.py docs/results/{f} -- \\\n    {r['recorded_command']}"
                     for f, r in zip(files, reports))
    note = (f"{first['max_new_tokens']} new tokens, budget {first['budget']:g} ({base['visual_slots']} visual slots), "
            "speed-ups over the unpruned bundle of the same run; random weights: no quality figure here. The vision "
            "graph is the same in every bundle: how much its time moves between rows is how much the shared machine's "
            "load moved the other figures."
            + (f" Not measured yet: {', '.join(missing)}." if missing else ""))
    return "\n".join(["```\n" + cmds + "\n```", "", *rows, "", note, "",
                      *[where(r, f) for r, f in zip(reports, files)]])


SECTIONS = {
    "bench-fast": (FAST_BENCH, lambda r: render_bench(r, FAST_BENCH, FAST_TARGETS)),
    "matmul-forms": ("matmul-forms.json", render_matmul_forms),
    "genai": ("genai-side-by-side-7b-shape.json", render_genai),
    "peak-memory": ("peak-memory-7b-shape-fast.json", render_peak_memory),
    "fidelity-fast": ("fidelity-7b-shape-fast.json", render_fidelity),
    "rewrites-bench": (REWRITE_BENCH_FILES[0], render_rewrites_bench),
    "rewrites-quality": ("rewrites-quality-tiny.json", render_rewrites_quality),
    "multiturn": ("multiturn-tiny.json", render_multiturn),
    "multiturn-llava-shape": ("multiturn-7b-shape.json", lambda r: render_multiturn(r, "multiturn-7b-shape.json")),
    "concurrency-llava-shape": ("concurrency-7b-shape.json", lambda r: render_concurrency(r, "concurrency-7b-shape.json")),
    "boundary": ("boundary-tiny.json", render_boundary),
    "cache-policies": ("cache-policies-7b-shape.json", render_cache_policies),
    "eviction-cost": ("eviction-cost-7b-shape.json", render_eviction_cost),
    "concurrency": ("concurrency-tiny.json", render_concurrency),
    "trt-build": (TRT_FILES[0], render_trt_build),
    "trt-memory": (TRT_FILES[0], render_trt_memory),
    "bench": ("bench-7b-shape.json", render_bench),
    "selection-cost": ("selection-cost-7b-shape.json", render_selection_cost),
    "sweep": ("sweep-7b-shape.json", render_sweep),
    "mutation": ("mutation.json", render_mutation),
}
MARKER = re.compile(r"(<!-- generated:(?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


def regenerate(readme: str) -> str:
    """README text with every generated section rendered from docs/results/."""

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in SECTIONS:
            raise ResultsError(f"README has a generated section {name!r}; known: {', '.join(SECTIONS)}")
        file, render = SECTIONS[name]
        return f"{m.group(1)}{render(load(file))}\n{m.group(4)}"

    return MARKER.sub(fill, readme)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md is out of date")
    args = ap.parse_args(argv)
    current = README.read_text()
    try:
        fresh = regenerate(current)
    except (ResultsError, KeyError, TypeError) as e:
        print(f"error: {e if isinstance(e, ResultsError) else f'a results file lacks {e}'}", file=sys.stderr)
        return 2
    if args.check:
        if fresh != current:
            print("error: README.md differs from docs/results/; run `make readme-tables`", file=sys.stderr)
            return 1
        return 0
    if fresh != current:
        tmp = README.with_name(f".{README.name}.tmp")
        tmp.write_text(fresh)
        tmp.replace(README)
        print("README.md: generated sections rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
