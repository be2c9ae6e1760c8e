"""The `edgeprune` command line. Heavy imports (torch, transformers, onnx) happen inside commands.

Every EdgePruneError / RuntimeStatusError becomes one line on stderr and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import time
from pathlib import Path

import click

from edgeprune import __version__
from edgeprune.sample_image import SAMPLE_PROMPT


def _fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def user_errors(fn):
    """Turns user-caused failures into one line and an exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from edgeprune.errors import EdgePruneError
        from edgeprune_runtime.errors import RuntimeStatusError

        try:
            return fn(*args, **kwargs)
        except EdgePruneError as e:
            _fail(str(e), e.exit_code)
        except RuntimeStatusError as e:
            _fail(e.message, 2)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] != "onnxruntime":  # the one dependency an extra chooses; others are bugs
                raise
            _fail("ONNX Runtime is not installed; pip install 'edgeprune[cpu]' on a PC, 'edgeprune[cuda]' with an "
                  "NVIDIA GPU, or keep the onnxruntime-gpu already installed (README: Install)", 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


def _print_version(ctx: click.Context, param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    from edgeprune_runtime import __version__ as runtime_version
    from edgeprune_runtime.ortlib import version_line

    click.echo(f"edgeprune {__version__}, {version_line('edgeprune-runtime', runtime_version)}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the versions of edgeprune, its runtime and the ONNX Runtime in use, and exit.")
def cli():
    """Export vision-language models with a fixed visual-token budget to static ONNX bundles and run them."""


def _stage_logger():
    """Progress lines on stderr, only on a terminal: in pipes and logs a user error stays one `error:` line."""
    from rich.console import Console

    console = Console(stderr=True)
    return (lambda stage: console.log(stage)) if console.is_terminal else (lambda stage: None)


def _table_console():
    """stdout console for tables; off a terminal rich would wrap at 80 columns and cut column titles."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def _recipe(model_name: str, recipe_file: str | None, **flags):
    from edgeprune import registry
    from edgeprune.recipe import default_recipe_path, load_recipe

    path = recipe_file or default_recipe_path(registry.get(model_name).recipe)
    return load_recipe(path).override(**flags)


@cli.command()
@click.argument("model_name", metavar="NAME")
@click.option("--budget", type=float, help="Fraction of visual tokens to keep, in (0, 1] (recipe default 0.2).")
@click.option("--model", "model_dir", type=click.Path(), help="Local Hugging Face checkpoint directory.")
@click.option("--out", "out_dir", type=click.Path(), help="Bundle directory [default: export/NAME].")
@click.option("--recipe", "recipe_file", type=click.Path(), help="Recipe TOML [default: the model's recipe in edgeprune/recipes/].")
@click.option("--strategy", help="Visual-token selection strategy (recipe key `strategy`).")
@click.option("--newlines", type=click.Choice(["auto", "keep", "drop"]), help="image_newline slots policy.")
@click.option("--alpha", type=float, help="hired: the base image's share of the budget, in [0, 1].")
@click.option("--vision-keep", help="Prune tokens inside the vision tower: LAYER:FRACTION,... (e.g. 8:0.5,16:0.25) "
              "or a name (evit-half, evit-quarter); each partition keeps that share by CLS attention.")
@click.option("--layers", type=int, default=2, show_default=True, help="LM layers of llava-next-7b-shape.")
@click.option("--target", help="Shape the graphs for this TensorRT target (opset, ops its parser lacks); see `edgeprune targets`.")
@click.option("--opset", type=int, help="ONNX opset (default: the recipe's, lowered to the target's maximum).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]),
              help="fp16: matmuls and their weights in fp16 (GPU targets); int8: INT8 vision (fp32 scoring) and LM (CPU); "
              "int4: INT8 vision, INT4 block-wise LM weights (CPU).")
@click.option("--force", is_flag=True, help="Move a non-bundle --out directory aside (to DIR.old-<time>) instead of refusing.")
@click.option("--prune-heads", type=float, help="Prune this fraction of each LM layer's KV groups (heads), in [0, 1).")
@click.option("--prune-vision-heads", type=float, help="Prune this fraction of the heads of each CLIP layer up to "
              "the feature layer, in [0, 1).")
@click.option("--fold-pruned-heads", is_flag=True, default=None, help="Add each pruned LM head's mean output "
              "(calibration) to the o_proj bias.")
@click.option("--head-criterion", type=click.Choice(["output-norm", "first-token", "visual"]),
              help="Which heads go first: lowest output norm, most dormant (first-token attention), least visual.")
@click.option("--skip-layers", help="Skip N LM layers (least influential by calibration), or exactly layers i,j,... "
              "(one layer: 'i,').")
@click.option("--skip-vision-layers", help="Skip N CLIP layers below the feature layer (least influential), or "
              "exactly layers i,j,... (one layer: 'i,').")
@click.option("--stats", "stats_file", type=click.Path(), help="Calibration stats (`edgeprune calibrate`) for the "
              "rewrites [default: calibrate on built-in samples].")
@click.option("--drop-visual-after", help="In-LLM visual-token dropping: after LM layer L keep the KEEP visual slots "
              "the last text token attends to most, L:KEEP[,L2:KEEP2...] (FastV/PyramidDrop; KEEP 0 = YOPO).")
@click.option("--skip-decode", help="SkipDecode: from decode position POS on skip the lowest K LM layers, "
              "POS:K[,POS2:K2...] (monotone), e.g. 32:1,64:2.")
@click.option("--cache-policy", help="When the KV cache is full: stop (default), sink-window or heavy-hitter "
              "(adds the attn_mass decode output); the bundle's default, `run --cache-policy` overrides it.")
@click.option("--cache-sinks", type=int, help="First cache slots never evicted (attention sinks; recipe default 4).")
@click.option("--cache-pin-image/--no-cache-pin-image", default=None,
              help="heavy-hitter: never evict the image's kept visual slots (recipe default: pinned).")
@click.option("--report", is_flag=True, help="Print parameters, FLOPs per stage and KV-cache bytes before and after "
              "the rewrites (with --json: a `report` key).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (bundle path, K, slots, sizes, timings).")
@user_errors
def export(model_name, budget, model_dir, out_dir, recipe_file, strategy, newlines, alpha, vision_keep, layers, target, opset,
           precision, force, prune_heads, prune_vision_heads, fold_pruned_heads, head_criterion, skip_layers,
           skip_vision_layers, stats_file, drop_visual_after, skip_decode, cache_policy, cache_sinks, cache_pin_image,
           report, as_json):
    """Trace NAME into a static-shape ONNX bundle (vision, prefill, decode, step graphs + manifest)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeprune.export import STAGES, export_bundle
    from edgeprune.trt.forms import resolve_for_target

    recipe = _recipe(model_name, recipe_file, budget=budget, strategy=strategy, newlines=newlines, alpha=alpha,
                     vision_keep=vision_keep, target=target, opset=opset, precision=precision, prune_heads=prune_heads,
                     prune_vision_heads=prune_vision_heads, fold_pruned_heads=fold_pruned_heads,
                     head_criterion=head_criterion, stats=stats_file, **_skip_layers_flag(skip_layers),
                     **_skip_layers_flag(skip_vision_layers, "skip_vision_layers", "--skip-vision-layers"),
                     drop_visual_after=drop_visual_after, skip_decode=skip_decode, cache_policy=cache_policy,
                     cache_sinks=cache_sinks, cache_pin_image=cache_pin_image)
    recipe = resolve_for_target(recipe, opset_given=opset is not None)
    out = Path(out_dir or Path("export") / model_name)
    console = Console(stderr=True)
    columns = (TextColumn("[bold]export[/]"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    # Only on a terminal: in pipes and logs a user error stays the single `error:` line.
    started, stage_starts = time.perf_counter(), []  # [(stage, perf_counter at its start)]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=len(STAGES))

        def on_stage(name: str) -> None:
            stage_starts.append((name, time.perf_counter()))
            progress.update(task, completed=STAGES.index(name), description=name)
            if console.is_terminal:
                console.log(name)

        export_bundle(model_name, out, recipe, model_dir=model_dir, model_options={"layers": layers},
                      on_stage=on_stage, force=force)
        progress.update(task, completed=len(STAGES), description="done")
    if as_json:
        result = _export_report(out, stage_starts, started, time.perf_counter())
        if report:
            result["report"] = _rewrite_report(out)
        click.echo(json.dumps(result))
    else:
        _print_bundle_summary(out)
        if report:
            _print_rewrite_report(_rewrite_report(out))


def _skip_layers_flag(text: str | None, key: str = "skip_layers", flag: str = "--skip-layers") -> dict:
    """--skip-layers N -> {"skip_layers": N}; i,j,... (or 'i,') -> {"skip_layer_indices": (i, j)}; None -> {}."""
    if text is None:
        return {}
    from edgeprune.errors import ConfigError

    try:
        if "," not in text:
            return {key: int(text)}
        return {key.replace("layers", "layer_indices"): tuple(int(v) for v in text.split(",") if v.strip())}
    except ValueError:
        raise ConfigError(f"{flag} takes a count N or layer indices i,j,... (one layer: 'i,'), got {text!r}") from None


def _rewrite_report(bundle: Path) -> dict:
    """export --report: {"rewrites", "layers", "before", "after"} from the manifest (costs in edgeprune/rewrites/cost.py)."""
    from edgeprune_runtime.manifest import load_manifest

    d = load_manifest(bundle, verify_hashes=False).data
    return {"rewrites": d.get("rewrites", []), "layers": d.get("layers", {}), **d["costs"]}


def _print_rewrite_report(r: dict) -> None:
    from rich.table import Table

    before, after = r["before"], r["after"]
    rows = [("parameters, vision", before["params"]["vision"], after["params"]["vision"], 1e6, "M"),
            ("parameters, language model", before["params"]["language_model"], after["params"]["language_model"], 1e6, "M"),
            ("FLOPs, vision graph", before["flops"]["vision"], after["flops"]["vision"], 1e9, "G"),
            ("FLOPs, prefill graph", before["flops"]["prefill"], after["flops"]["prefill"], 1e9, "G"),
            ("FLOPs, decode per token", before["flops"]["decode_per_token"], after["flops"]["decode_per_token"], 1e9, "G"),
            ("KV cache", before["kv_cache_bytes"], after["kv_cache_bytes"], 2**20, "MiB"),
            ("LM layers", before["lm_layers"], after["lm_layers"], 1, "")]
    table = Table(title="rewrites: before -> after (FLOPs: matrix products, multiply-add = 2)")
    for col in ("", "before", "after", "after/before"):
        table.add_column(col, justify="right")
    for name, b, a, scale, unit in rows:
        table.add_row(name, f"{b / scale:.4g} {unit}".strip(), f"{a / scale:.4g} {unit}".strip(), f"{a / b:.3f}" if b else "-")
    _table_console().print(table)
    for line in r["rewrites"]:
        click.echo(f"rewrite  {line}")


def _export_report(bundle: Path, stage_starts: list[tuple[str, float]], started: float, finished: float) -> dict:
    """export --json: where the bundle is, its static sizes, its files' sizes and each stage's seconds."""
    from edgeprune.bundle_info import bundle_info

    info = bundle_info(bundle)
    s = info["shapes"]
    ends = [t for _, t in stage_starts[1:]] + [finished]
    return {
        "bundle": info["bundle"],
        "model": info["model"]["model"],
        "budget": info["recipe"]["budget"],
        "strategy": info["recipe"]["strategy"],
        "k": s["visual_topk"],
        "patch_tokens": s["partitions"] * s["patches_per_partition"],
        "slots": {"visual": s["visual_slots"], "newline": s["newline_slots"],
                  "text_before_image": s["text_slots_before_image"], "text_after_image": s["text_slots_after_image"],
                  "prefill": s["prefill_slots"], "cache": s["cache_capacity"]},
        "onnx": info["onnx"],
        "sizes": {"total_bytes": info["sizes"]["total_bytes"],
                  "graphs": {name: g["bytes"] for name, g in info["graphs"].items()}, "files": info["sizes"]["files"]},
        "timings": {"stages": {name: end - t for (name, t), end in zip(stage_starts, ends)},
                    "total_s": finished - started},
    }


def _print_bundle_summary(bundle: Path) -> None:
    from edgeprune_runtime.manifest import load_manifest

    m = load_manifest(bundle, verify_hashes=False)
    s = m.shapes
    size = sum((bundle / rel).stat().st_size for rel in m.data["files"])
    click.echo(f"bundle {bundle}: budget {m.data['recipe']['budget']}, K={s.visual_topk} of "
               f"{s.partitions * s.patches_per_partition} patch tokens, {s.visual_slots} visual slots, "
               f"{s.prefill_slots} prefill slots, cache {s.cache_capacity}, {size / 1e6:.1f} MB")


@cli.command()
@click.argument("model_name", metavar="NAME")
@click.option("--model", "model_dir", type=click.Path(), help="Local Hugging Face checkpoint directory.")
@click.option("--data", type=click.Path(), help="JSONL of {image, question, answer} (sweep's format) [default: "
              "built-in synthetic images and prompts].")
@click.option("--out", "out_file", type=click.Path(), help="Stats JSON [default: export/calibrate-NAME/stats.json]; "
              "the heatmap goes beside it (.png).")
@click.option("--layers", type=int, default=2, show_default=True, help="LM layers of llava-next-7b-shape.")
@click.option("--json", "as_json", is_flag=True, help='Print {"stats", "heatmap", "samples", "lm", "vision"}.')
@user_errors
def calibrate(model_name, model_dir, data, out_file, layers, as_json):
    """Record per-layer/per-head statistics of NAME on calibration requests (for --prune-heads / --skip-layers)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from edgeprune import registry
    from edgeprune.calibrate import builtin_samples, calibrate as run_calibration, samples_from_jsonl, write_heatmap, \
        write_stats

    entry = registry.get(model_name)
    samples = samples_from_jsonl(data) if data else builtin_samples()
    out = Path(out_file or Path("export") / f"calibrate-{model_name}" / "stats.json")
    if out.is_dir():
        from edgeprune.errors import ConfigError

        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'stats.json'}")
    loaded = entry.loader(model_dir, layers=layers)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]calibrate[/]"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=len(samples))
        stats = run_calibration(loaded, samples, lambda i, n: progress.update(task, completed=i))
    write_stats(stats, out)
    png = write_heatmap(stats, out.with_suffix(".png"))
    if as_json:
        click.echo(json.dumps({"stats": str(out), "heatmap": str(png), "samples": stats["samples"],
                               "lm": {k: stats["lm"][k] for k in ("block_influence", "last_text_visual_mass")},
                               "vision": {"block_influence": stats["vision"]["block_influence"]}}))
        return
    influence = ", ".join(f"{v:.3f}" for v in stats["lm"]["block_influence"])
    click.echo(f"calibrated {model_name} on {stats['samples']} requests: LM block influence per layer [{influence}]")
    click.echo(f"wrote {out} and {png}")


@cli.command()
@click.argument("model_name", metavar="NAME")
@click.argument("out_dir", metavar="DIR", type=click.Path())
@click.option("--layers", type=int, default=2, show_default=True, help="LM layers of llava-next-7b-shape.")
@click.option("--json", "as_json", is_flag=True, help='Print {"model", "path", "files"} instead of a sentence.')
@user_errors
def tiny(model_name, out_dir, layers, as_json):
    """Save the built-in model NAME as a Hugging Face checkpoint directory DIR."""
    from edgeprune import registry
    from edgeprune.errors import ConfigError
    from edgeprune.models.llava_next import save_twin

    entry = registry.get(model_name)
    if entry.checkpoint:
        raise ConfigError(f"`{model_name}` is a local checkpoint already; `tiny` saves built-in models "
                          "such as llava-next-tiny")
    path = save_twin(entry.loader(None, layers=layers), out_dir)
    if as_json:
        files = sorted(p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file())
        click.echo(json.dumps({"model": model_name, "path": str(path), "files": files}))
        return
    click.echo(f"saved {model_name} to {path} (load with LlavaNextForConditionalGeneration.from_pretrained)")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--image", required=True, type=click.Path(), help="Image file (PNG, JPEG, ...).")
@click.option("--prompt", required=True, help="Question; the bundle's chat template is applied unless --raw-prompt.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True,
              help="Stop after N tokens (0: until EOS or the cache is full).")
@click.option("--raw-prompt", is_flag=True, help="Use the prompt verbatim (it must contain <image> once).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy; > 0 samples.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass in (0, 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--skip-hash-check", is_flag=True, help="Do not verify the bundle files' sha256 (faster start).")
@click.option("--ignore-eos", is_flag=True, help="Go on past EOS until --max-new-tokens or a full cache.")
@click.option("--exact-boundary", is_flag=True,
              help="Finish a prompt that ends mid-word or with a space from exact next-byte probabilities.")
@click.option("--turns", "turns_file", type=click.Path(), help='Follow-up questions, JSON Lines {"prompt": "..."}, '
              "asked after --prompt in one conversation (the image is seen once).")
@click.option("--interactive", is_flag=True, help="After the answer(s), read follow-up questions from stdin.")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda", "trt"]), default="auto", show_default=True,
              help="Where to run: the bundle's TensorRT engines, a CUDA GPU, or the CPU (auto: the first that can run here).")
@click.option("--cache-policy", help="When the KV cache is full: stop, sink-window or heavy-hitter (evict in place "
              "and go on) [default: the bundle's].")
@click.option("--cache-sinks", type=int, help="First cache slots never evicted [default: the bundle's, 4].")
@click.option("--cache-pin-image/--no-cache-pin-image", default=None,
              help="heavy-hitter: never evict the image's kept visual slots [default: the bundle's, pinned].")
@user_errors
def run(bundle, image, prompt, max_new_tokens, raw_prompt, temperature, top_p, seed, as_json, skip_hash_check,
        ignore_eos, exact_boundary, turns_file, interactive, backend, cache_policy, cache_sinks, cache_pin_image):
    """Answer PROMPT about IMAGE with BUNDLE on ONNX Runtime, streaming tokens as they come."""
    from edgeprune_runtime.cli import read_turns
    from edgeprune_runtime.cli import run as runtime_run

    turns = read_turns(turns_file) if turns_file is not None else None
    runtime_run(bundle, image, prompt, max_new_tokens=max_new_tokens, raw_prompt=raw_prompt,
                temperature=temperature, top_p=top_p, seed=seed, as_json=as_json,
                verify_hashes=not skip_hash_check, ignore_eos=ignore_eos, exact_boundary=exact_boundary,
                turns=turns, interactive=interactive, backend=backend, cache_policy=cache_policy,
                cache_sinks=cache_sinks, cache_pin_image=cache_pin_image)


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--image", required=True, type=click.Path(), help="Image to feed every stage.")
@click.option("--prompt", default=SAMPLE_PROMPT, show_default=True)
@click.option("--raw-prompt", is_flag=True, help="Use the prompt verbatim (it must contain <image>).")
@click.option("--model", "model_dir", type=click.Path(), help="Source checkpoint dir, if it moved since export.")
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--save-dir", type=click.Path(file_okay=False), help="Write each stage's inputs and reference outputs "
              "as Polygraphy JSON (<stage>.inputs.json, <stage>.outputs.json).")
@click.option("--backends", default="onnxrt", show_default=True, help="onnxrt, or onnxrt,trt to compare engines too.")
@click.option("--target", "target_name", help="Whose engines `--backends trt` compares [default: the bundle's only one].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@user_errors
def compare(bundle, image, prompt, raw_prompt, model_dir, atol, rtol, save_dir, backends, target_name, as_json):
    """Compare every stage of BUNDLE (ONNX Runtime, TensorRT engines) with eager PyTorch, using Polygraphy. Exit 1 on mismatch."""
    import json

    from edgeprune.compare import compare_bundle, engines_target
    from edgeprune.sweep import parse_list

    chosen = parse_list(backends, str, "backends")
    unknown = set(chosen) - {"onnxrt", "trt"}
    if unknown:
        from edgeprune.errors import ConfigError

        raise ConfigError(f"--backends: unknown backend {sorted(unknown)[0]!r} (known: onnxrt, trt)")
    trt_target = engines_target(bundle, target_name) if "trt" in chosen else None
    report = compare_bundle(bundle, image, prompt, raw_prompt, atol=atol, rtol=rtol, model_dir=model_dir,
                            save_dir=save_dir, trt_target=trt_target)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        from rich.table import Table

        table = Table(title=f"torch (eager) vs onnxruntime, atol {atol:g} rtol {rtol:g}")
        if report.cosine_floor is not None:
            table.title += f" ({report.precision}: pass on cosine >= {report.cosine_floor:g})"
        for col in ("stage", "output", "max abs diff", "max rel diff", "cosine", "result"):
            table.add_column(col)
        for r in report.rows:
            table.add_row(r.stage, r.output, f"{r.max_absdiff:.3g}", f"{r.max_reldiff:.3g}", f"{r.cosine:.5f}",
                          "[green]pass[/]" if r.passed else "[red]FAIL[/]")
        _table_console().print(table)
        for why in report.skipped:
            click.echo(f"skipped: {why}")
        click.echo("compare: all stages match" if report else "compare: MISMATCH (see FAIL rows)")
    sys.exit(0 if report else 1)


@cli.command()
@click.argument("model_name", metavar="NAME")
@click.option("--budget", type=float, help="Budget of the bundle side (transformers always runs the full image).")
@click.option("--layers", type=int, default=2, show_default=True, help="LM layers of llava-next-7b-shape.")
@click.option("--model", "model_dir", type=click.Path(), help="Local checkpoint dir (for `llava-next`).")
@click.option("--recipe", "recipe_file", type=click.Path(), help="Recipe TOML for the export.")
@click.option("--bundle", "bundle_dir", type=click.Path(), help="Use this exported bundle instead of exporting.")
@click.option("--image", type=click.Path(), help="Image [default: the built-in 640x480 sample].")
@click.option("--prompt", default=SAMPLE_PROMPT, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]),
              help="Bundle precision (recipe onnx.precision); int8/int4 are ONNX Runtime CPU quantization.")
@click.option("--vision-keep", help="Token pruning inside the vision tower, as in export (recipe vision_keep).")
@click.option("--prune-heads", type=float, help="Rewrite, as in export: prune this fraction of each LM layer's KV groups.")
@click.option("--skip-layers", help="Rewrite, as in export: skip N LM layers or exactly layers i,j,...")
@click.option("--drop-visual-after", help="Rewrite, as in export: L:KEEP[,...] in-LLM visual-token dropping.")
@click.option("--skip-decode", help="Rewrite, as in export: POS:K[,...] SkipDecode schedule.")
@click.option("--stats", "stats_file", type=click.Path(), help="Calibration stats for the rewrites, as in export.")
@click.option("--selection-cost", "selection_strategies",
              help="Instead: time the vision graph of each listed strategy (comma-separated) against the "
                   "same graph without selection.")
@click.option("--backend", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: the bundle on the runtime's CUDA backend vs transformers on the same GPU, in the bundle's precision.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@user_errors
def bench(model_name, budget, layers, model_dir, recipe_file, bundle_dir, image, prompt, max_new_tokens,
          precision, vision_keep, prune_heads, skip_layers, drop_visual_after, skip_decode, stats_file,
          selection_strategies, backend, as_json):
    """Time-to-first-token, decode tokens/s and peak memory: transformers (full) vs the bundle (budget)."""
    import json

    from edgeprune.bench import run_bench, selection_cost
    from edgeprune.errors import ConfigError

    if bundle_dir:  # the bundle is measured as it was exported: a flag that shapes an export would be ignored
        from edgeprune_runtime.manifest import load_manifest

        data = load_manifest(bundle_dir, verify_hashes=False).data
        shaping = {"--budget": budget, "--precision": precision, "--vision-keep": vision_keep, "--prune-heads": prune_heads,
                   "--skip-layers": skip_layers, "--drop-visual-after": drop_visual_after, "--skip-decode": skip_decode,
                   "--stats": stats_file}
        as_built = {"--budget": data["recipe"]["budget"], "--precision": data.get("onnx", {}).get("precision", "fp32")}
        given = [flag for flag, value in shaping.items() if value is not None and value != as_built.get(flag)]
        if given:
            raise ConfigError(f"{', '.join(given)} shape{'s' if len(given) == 1 else ''} an export, but --bundle "
                              f"{bundle_dir} is measured as it was exported: leave out {', '.join(given)} or --bundle")
    recipe = _recipe(model_name, recipe_file, budget=budget, precision=precision, vision_keep=vision_keep,
                     prune_heads=prune_heads, **_skip_layers_flag(skip_layers), drop_visual_after=drop_visual_after,
                     skip_decode=skip_decode, stats=stats_file)
    log = _stage_logger()
    if selection_strategies:
        from edgeprune.sweep import parse_list

        report = selection_cost(model_name, recipe, parse_list(selection_strategies, str, "selection-cost"),
                                model_dir, layers, image, on_stage=log)
        if as_json:
            click.echo(json.dumps(report))
            return
        click.echo(f"vision graph without selection: {report['no_selection_s']:.3f} s (median of {report['repeats']})")
        for name, r in report["strategies"].items():
            click.echo(f"  {name:16s} selection {1000 * r['selection_s']:7.1f} ms = "
                       f"{100 * r['overhead']:+.2f}% of the vision graph")
        return
    report = run_bench(model_name, recipe, model_dir, layers, image, prompt, max_new_tokens, bundle_dir,
                       on_stage=log, backend=backend)
    if as_json:
        click.echo(json.dumps(report))
        return
    from rich.table import Table

    hf, ours, r = report["transformers"], report["edgeprune"], report["ratios"]

    def ratio(key: str, suffix: str) -> str:
        return "-" if r[key] is None else f"{r[key]:.2f}{suffix}"

    table = Table(title=f"{model_name}: transformers (full image) vs edgeprune (budget {report['budget']}), "
                        f"{max_new_tokens} new tokens")
    for col in ("", "transformers", "edgeprune", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("time to first token", f"{hf['ttft_s']:.3f} s", f"{ours['ttft_s']:.3f} s",
                  ratio("ttft_speedup", "x faster"))
    table.add_row("decode", f"{hf['decode_tokens_per_s']:.2f} tok/s", f"{ours['decode_tokens_per_s']:.2f} tok/s",
                  ratio("decode_speedup", "x faster"))
    table.add_row("peak RSS", f"{hf['peak_rss_bytes'] / 2**30:.2f} GiB", f"{ours['peak_rss_bytes'] / 2**30:.2f} GiB",
                  ratio("peak_rss_ratio", "x"))
    table.add_row("peak RSS / (weights + cache)", "", ratio("peak_rss_vs_weights_plus_cache", ""), "")
    table.add_row("visual tokens in the LM", "", str(ours["visual_tokens"]), "")
    for stage in ("image_s", "preprocess_s", "vision_s", "prefill_s"):  # the bundle's time to first token, per stage
        if stage in ours.get("timings", {}):
            table.add_row(f"  {stage[:-2]}", "", f"{ours['timings'][stage]:.3f} s", "")
    table.add_row("precision / vision_keep", "", f"{report.get('precision', 'fp32')} / {report.get('vision_keep') or '-'}", "")
    _table_console().print(table)


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--image", required=True, type=click.Path(), help="Image to run the vision graph on.")
@click.option("--out", "out_png", type=click.Path(), help="Write a PNG of kept (bright) and dropped (dim) patches.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every kept patch.")
@user_errors
def inspect(bundle, image, out_png, as_json):
    """Show which visual patches BUNDLE keeps for IMAGE (runs only the vision graph)."""
    import json

    from edgeprune.inspect_kept import draw_kept, kept_patches

    result = kept_patches(bundle, image)
    if out_png:
        draw_kept(result, out_png)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        rows, cols = result.grid
        per = [sum(1 for p, _, _ in result.kept if p == q) for q in range(result.partitions)]
        click.echo(f"{result.strategy}, budget {result.budget}: kept {len(result.kept)} patches (K = {result.k}); "
                   f"crop grid {rows}x{cols}; per partition (base first): {per}"
                   + (f"; wrote {out_png}" if out_png else ""))


@cli.command()
@click.argument("model_name", metavar="NAME")
@click.option("--budgets", default="0.1,0.2,0.4,1.0", show_default=True, help="Comma-separated budgets.")
@click.option("--strategies", default="hired,uniform", show_default=True, help="Comma-separated strategies.")
@click.option("--data", type=click.Path(), help="JSONL of {image, question, answer} for answer quality.")
@click.option("--out", "out_dir", type=click.Path(), help="Where bundles, sweep.json, sweep.png go [export/sweep-NAME].")
@click.option("--model", "model_dir", type=click.Path(), help="Local checkpoint dir (for `llava-next`).")
@click.option("--recipe", "recipe_file", type=click.Path(), help="Base recipe TOML.")
@click.option("--layers", type=int, default=2, show_default=True, help="LM layers of llava-next-7b-shape.")
@click.option("--image", type=click.Path(), help="Image for the timings [default: the built-in sample].")
@click.option("--max-new-tokens", type=click.IntRange(min=2), default=16, show_default=True)
@click.option("--precisions", default="fp32", show_default=True, help="Comma-separated precisions (fp32,fp16,int8,int4).")
@click.option("--vision-keeps", default="", help="Semicolon-separated vision_keep schedules, 'none' = no pruning "
              "(e.g. 'none;8:0.5;8:0.5,16:0.3') [default: none].")
@click.option("--json", "as_json", is_flag=True, help="Print the report (as in sweep.json) instead of a table.")
@user_errors
def sweep(model_name, budgets, strategies, data, out_dir, model_dir, recipe_file, layers, image, max_new_tokens,
          precisions, vision_keeps, as_json):
    """Export every strategy x budget and report TTFT, decode speed, memory and answer agreement."""
    from rich.table import Table

    from edgeprune.sweep import parse_list, run_sweep

    budget_list = parse_list(budgets, float, "budgets")
    strategy_list = parse_list(strategies, str, "strategies")
    base = _recipe(model_name, recipe_file)
    out = Path(out_dir or Path("export") / f"sweep-{model_name}")
    keeps = ["" if k.strip() in ("", "none") else k.strip() for k in vision_keeps.split(";")] if vision_keeps else [""]
    report = run_sweep(model_name, base, strategy_list, budget_list, out, model_dir, layers, data, image,
                       max_new_tokens=max_new_tokens, on_stage=_stage_logger(),
                       precisions=parse_list(precisions, str, "precisions"), vision_keeps=keeps)
    if as_json:
        click.echo(json.dumps(report | {"files": {"json": str(out / "sweep.json"), "png": str(out / "sweep.png")}}))
        return
    table = Table(title=f"{model_name} sweep ({report['questions']} questions)")
    cols = ["strategy", "budget", "precision", "vision keep", "visual tokens", "TTFT s", "vision s", "prefill s",
            "decode tok/s", "peak RSS GiB", "logit cos / greedy agr."]
    if report["questions"]:
        cols += ["agreement", "accuracy"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in report["rows"]:
        t, d = r.get("timings", {}), r.get("drift")
        cells = [r["strategy"], f"{r['budget']:g}", r["precision"], r["vision_keep"] or "-", str(r["visual_tokens"]),
                 f"{r['ttft_s']:.3f}", f"{t.get('vision_s', 0):.3f}", f"{t.get('prefill_s', 0):.3f}",
                 f"{r['decode_tokens_per_s']:.1f}", f"{r['peak_rss_bytes'] / 2**30:.2f}",
                 f"{d['logit_cosine_min']:.4f} / {d['greedy_agreement']:.2f}" if d else "-"]
        if report["questions"]:
            cells += [f"{r['agreement']:.2f}", f"{r['accuracy']:.2f}"]
        table.add_row(*cells)
    _table_console().print(table)
    click.echo(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")


@cli.command(name="sample-image")
@click.argument("out", type=click.Path())
@click.option("--size", default="640x480", show_default=True, help="WIDTHxHEIGHT")
@click.option("--json", "as_json", is_flag=True, help='Print {"path", "width", "height", "prompt"}.')
@user_errors
def sample_image(out, size, as_json):
    """Write a deterministic synthetic photo (a table scene) to OUT, for demos and benchmarks."""
    from edgeprune.errors import ConfigError
    from edgeprune.sample_image import write_sample_image

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like 640x480, got {size!r}") from None
    path = write_sample_image(out, width, height)
    if as_json:
        click.echo(json.dumps({"path": str(path), "width": width, "height": height, "prompt": SAMPLE_PROMPT}))
    else:
        click.echo(f"wrote {path}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
@user_errors
def targets(as_json):
    """List the TensorRT target profiles (edgeprune/recipes/targets/*.toml)."""
    import json

    from edgeprune.trt.targets import targets as all_targets

    known = all_targets()
    if as_json:
        click.echo(json.dumps({name: t.to_dict() for name, t in known.items()}))
        return
    for name, t in known.items():
        click.echo(f"{name:18s} {t.description}; sm {'/'.join(t.compute_capabilities)}, opset <= {t.max_opset}, "
                   f"{'/'.join(p.upper() for p in t.precisions)}, {t.device_memory_gib:g} GiB")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--target", "target_name", required=True, help="Target profile (see `edgeprune targets`).")
@click.option("--memory-gib", type=click.FloatRange(min=0, min_open=True), help="Device memory instead of the profile's.")
@click.option("--no-parser", is_flag=True, help="Skip the real TensorRT parser even when one is installed.")
@click.option("--lm-layers", type=click.IntRange(min=1), help="Estimate memory as if the LM had N layers "
              "(e.g. 32 for a full 7B judged from a --layers 2 export).")
@click.option("--json", "as_json", is_flag=True, help='Print {"target", "ok", "findings": [...], "memory", "parser"}.')
@user_errors
def check(bundle, target_name, memory_gib, no_parser, lm_layers, as_json):
    """Say whether BUNDLE will build for a target: opset, ops, shapes, precision, memory, TensorRT's parser. Exit 1 if not."""
    import json

    from edgeprune.trt.check import check_bundle
    from edgeprune.trt.targets import get_target

    report = check_bundle(bundle, get_target(target_name), memory_gib=memory_gib, use_parser=not no_parser,
                          lm_layers=lm_layers)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        for f in report.findings:
            where = f.graph + (f" {f.node}" if f.node else "")
            click.echo(f"{f.severity:7s} {where}: {f.message}")
        click.echo(f"check {target_name}: {'ok' if report else 'will NOT build (see error lines)'}")
    sys.exit(0 if report else 1)


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--target", "target_name", required=True, help="Target profile (see `edgeprune targets`).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest's new engines entry as JSON.")
@user_errors
def build(bundle, target_name, as_json):
    """Build TensorRT engines for BUNDLE into BUNDLE/engines/TARGET (vision + one LM engine, weights once)."""
    import json

    from rich.console import Console

    from edgeprune.trt.build import build_bundle
    from edgeprune.trt.targets import get_target

    target = get_target(target_name)
    console = Console(stderr=True)
    with console.status("building", spinner="dots") if console.is_terminal else _nullcontext() as status:
        def on_stage(text: str) -> None:
            if status is not None:
                status.update(text)

        entry = build_bundle(bundle, target, on_stage=on_stage)
    if as_json:
        click.echo(json.dumps(entry))
        return
    total = sum(e["bytes"] for e in entry["engines"].values())
    for name, e in entry["engines"].items():
        click.echo(f"{e['file']}: {e['bytes'] / 2**20:.1f} MiB from {e['graph']} in {e['build_seconds']:.1f} s")
    click.echo(f"built {len(entry['engines'])} engines for {target_name} with {entry['library']} {entry['version']}: "
               f"{total / 2**20:.1f} MiB")


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


@cli.command(name="models")
@click.option("--json", "as_json", is_flag=True, help='Print {name: {"description", "recipe", "checkpoint"}}.')
def models_cmd(as_json):
    """List the registered models."""
    from edgeprune import registry

    if as_json:
        click.echo(json.dumps({name: {"description": registry.get(name).description, "recipe": registry.get(name).recipe,
                                      "checkpoint": registry.get(name).checkpoint} for name in registry.names()}))
        return
    for name in registry.names():
        click.echo(f"{name:22s} {registry.get(name).description}")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--verify", is_flag=True, help="Hash every file against the manifest and list each mismatch (exit 1 if any).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
@user_errors
def info(bundle, verify, as_json):
    """Summarise BUNDLE from its manifest: model, recipe, shapes, graphs, engines, sizes."""
    from edgeprune.bundle_info import bundle_info, summary_lines

    report = bundle_info(bundle, verify=verify)
    if as_json:
        click.echo(json.dumps(report))
    else:
        for line in summary_lines(report):
            click.echo(line)
    sys.exit(1 if report["verified"] is False else 0)


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (127.0.0.1: this machine only).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free port).")
@click.option("--model-name", help="The model id clients send [default: the bundle directory's name].")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True, help="Requests generating at once.")
@click.option("--max-queue", type=click.IntRange(min=0), default=32, show_default=True,
              help="Requests waiting for a slot before the server answers 503.")
@click.option("--max-request-mb", type=click.IntRange(min=1), default=32, show_default=True,
              help="Largest request body (JSON with a base64 image), MiB.")
@click.option("--image-dir", default=".", show_default=True,
              help="Local image paths are read only inside this directory ('none': data: URLs only).")
@click.option("--max-image-pixels", type=click.IntRange(min=1), help="Refuse larger images [default: 100M].")
@click.option("--skip-hash-check", is_flag=True, help="Do not verify the bundle files' sha256 (faster start).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="warning",
              show_default=True, help="uvicorn's log level; info and debug also log every request.")
@user_errors
def serve(bundle, host, port, model_name, parallel, max_queue, max_request_mb, image_dir, max_image_pixels,
          skip_hash_check, log_level):
    """Serve BUNDLE over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health)."""
    from edgeprune_runtime.server import serve as run_server

    run_server(bundle, host, port, model_name=model_name, parallel=parallel, max_queue=max_queue,
               max_request_mb=max_request_mb, image_dir=image_dir, max_image_pixels=max_image_pixels,
               verify_hashes=not skip_hash_check, log_level=log_level)


_OUTPUT_ERRNOS = {errno.EPIPE, errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def main():
    """Entry point: usage errors too become one `error:` line (click would print a usage block), and so does
    an output that cannot be written (the reader of a pipe left, /dev/full, a full disk)."""
    try:
        try:
            code = cli.main(prog_name="edgeprune", standalone_mode=False)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare `edgeprune`: the help, as a request for it
            click.echo(e.ctx.get_help())
            code = 0
        sys.stdout.flush()  # inside the try: a buffered write that fails is an output error too
    except click.ClickException as e:  # bad option value, missing argument, unknown command
        _fail(f"{e.format_message()} (see `edgeprune --help`)", e.exit_code)
    except click.Abort:
        _fail("interrupted", 130)
    except OSError as e:
        if e.errno not in _OUTPUT_ERRNOS:
            raise
        # Point stdout at /dev/null so the interpreter's final flush cannot fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        why = "the reader closed the pipe" if e.errno == errno.EPIPE else os.strerror(e.errno)
        _fail(f"cannot write the output: {why}", 2)
    sys.exit(code if isinstance(code, int) else 0)
