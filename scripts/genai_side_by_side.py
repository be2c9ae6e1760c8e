"""Decode speed side by side: onnxruntime-genai's INT4 build of a bundle's language model vs our INT4 and fp32 bundles.

    pip install -e '.[genai]'          # onnxruntime-genai 0.18 (CPU), a benchmark-only extra
    flock /tmp/edgeprune-7b.lock nice -n 5 .venv/bin/python scripts/record_result.py \\
        docs/results/genai-side-by-side-7b-shape.json -- .venv/bin/python scripts/genai_side_by_side.py \\
        --int4-bundle export/fast7b --fp32-bundle export/fp32-7b --work export/genai-7b

1. The INT4 bundle's source model (registry name and options from its manifest, e.g. `llava-next-7b-shape`
   with `--layers 2`) is loaded and its language model saved as a Hugging Face Llama checkpoint directory
   (`WORK/hf`: LlamaForCausalLM weights, config, tokenizer), the input onnxruntime-genai's builder takes.
2. `python -m onnxruntime_genai.models.builder -i WORK/hf -o WORK/genai-int4 -p int4 -e cpu` (its defaults:
   MatMulNBits blocks of 32, accuracy level 4) builds the peer.
3. Each side runs in its own child process, one after the other: our two bundles generate greedily from the
   built-in sample image (`Bundle.generate`, EOS ignored); the peer gets a prompt of random token ids as long
   as our INT4 bundle's context after prefill (visual + prompt tokens), so both decode over the same cache
   length. decode tokens/s = (tokens - 1) / (time after the first token), as `edgeprune bench` counts it.

Prints one JSON object (`--json` style, last stdout line) with provenance. Existing WORK/hf and
WORK/genai-int4 are reused (delete them to rebuild).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INSTALL = "pip install -e '.[genai]' (onnxruntime-genai 0.18, CPU)"
PROMPT = "Describe the image in detail."


class SideBySideError(Exception):
    """A user-fixable problem: printed as one `error:` line."""


def save_llama_checkpoint(bundle: Path, out: Path) -> dict:
    """Saves the language model of `bundle`'s source model as a Hugging Face Llama directory at `out`.

    Returns {"model", "options", "layers", "parameters"}. Raises SideBySideError for a non-Llama LM."""
    import torch
    from transformers import LlamaForCausalLM

    from edgeprune import registry
    from edgeprune_runtime.manifest import load_manifest

    source = load_manifest(bundle, verify_hashes=False).data["source"]
    loaded = registry.get(source["model"]).loader(source.get("path") if source["model"] == "llava-next" else None,
                                                  **source.get("options", {}))
    model = loaded.model
    text_config = model.config.text_config
    if text_config.model_type != "llama":
        raise SideBySideError(f"the bundle's language model is {text_config.model_type!r}; this comparison saves Llama only")
    lm = LlamaForCausalLM(text_config).eval()
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise SideBySideError(f"cannot map the language model onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    tmp = out.with_name(out.name + ".partial")
    with torch.no_grad():
        lm.save_pretrained(tmp, safe_serialization=True)
    loaded.processor.tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return {"model": source["model"], "options": source.get("options", {}), "layers": text_config.num_hidden_layers,
            "parameters": sum(p.numel() for p in lm.parameters())}


def build_genai(hf_dir: Path, out: Path, cache: Path) -> list[str]:
    """Runs onnxruntime-genai's model builder (INT4, CPU); returns the command it ran."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", "int4", "-e", "cpu", "-c", str(cache)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise SideBySideError(f"onnxruntime-genai's builder failed: {tail}")
    return command


# --- child-process measurements ------------------------------------------------------------------


def measure_bundle(bundle: str, image: str, tokens: int) -> dict:
    from edgeprune_runtime import Bundle

    with Bundle(bundle, verify_hashes=False) as b:
        r = b.generate(image, PROMPT, max_new_tokens=tokens, ignore_eos=True)
    return {"decode_tokens_per_s": r.decode_tokens_per_s, "generated_tokens": len(r.token_ids),
            "context_tokens": r.visual_tokens + r.prompt_tokens, "ttft_s": r.ttft_s}


def measure_genai(model_dir: str, context: int, tokens: int, vocab: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(model_dir)
    ids = np.random.default_rng(0).integers(3, vocab, context).astype(np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=context + tokens, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)  # prefill
    times = []
    for _ in range(tokens):
        generator.generate_next_token()
        times.append(time.perf_counter())
    return {"decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]), "generated_tokens": len(times),
            "context_tokens": context, "ttft_s": times[0] - start}


def _child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise SideBySideError(f"measurement {args[0]} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(int4_bundle: Path, fp32_bundle: Path, work: Path, tokens: int) -> dict:
    from edgeprune.provenance import provenance
    from edgeprune.sample_image import write_sample_image
    from edgeprune_runtime.manifest import load_manifest

    try:
        import onnxruntime_genai as og
    except ImportError:
        raise SideBySideError(f"onnxruntime-genai is not installed: {INSTALL}") from None
    manifests = {}
    for what, bundle in (("int4", int4_bundle), ("fp32", fp32_bundle)):
        m = load_manifest(bundle, verify_hashes=False)
        precision = m.data.get("onnx", {}).get("precision", "fp32")
        if precision != what:
            raise SideBySideError(f"--{what}-bundle {bundle} holds a {precision} bundle; export one with --precision {what}")
        manifests[what] = m
    if manifests["int4"].data["source"] != manifests["fp32"].data["source"]:
        raise SideBySideError("the two bundles come from different source models; export both from the same one")
    work.mkdir(parents=True, exist_ok=True)
    hf, peer = work / "hf", work / "genai-int4"
    checkpoint = None
    if not (hf / "config.json").is_file():
        checkpoint = save_llama_checkpoint(int4_bundle, hf)
    builder = None
    if not (peer / "genai_config.json").is_file():
        builder = build_genai(hf, peer, work / "cache")
    image = str(write_sample_image(work / "sample.png"))
    ours_int4 = _child("bundle", str(int4_bundle), image, str(tokens))
    ours_fp32 = _child("bundle", str(fp32_bundle), image, str(tokens))
    genai = _child("genai", str(peer), str(ours_int4["context_tokens"]), str(tokens),
                   str(manifests["int4"].shapes.vocab_size))
    weights = lambda b: sum(f.stat().st_size for f in Path(b).rglob("*") if f.is_file())  # noqa: E731
    return {
        "model": manifests["int4"].data["source"]["model"], "options": manifests["int4"].data["source"].get("options", {}),
        "max_new_tokens": tokens, "prompt": PROMPT,
        "onnxruntime_genai": {"version": og.__version__, "precision": "int4", "build_command": builder,
                              "model_bytes": weights(peer), **genai},
        "edgeprune_int4": {"bundle": str(int4_bundle), "lm_weights_bytes": (int4_bundle / "lm" / "lm.weights").stat().st_size,
                           **ours_int4},
        "edgeprune_fp32": {"bundle": str(fp32_bundle), "lm_weights_bytes": (fp32_bundle / "lm" / "lm.weights").stat().st_size,
                           **ours_fp32},
        "ratios": {"int4_vs_genai_int4": ours_int4["decode_tokens_per_s"] / genai["decode_tokens_per_s"],
                   "int4_vs_fp32_bundle": ours_int4["decode_tokens_per_s"] / ours_fp32["decode_tokens_per_s"]},
        **({"checkpoint": checkpoint} if checkpoint else {}),
        "provenance": provenance(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, *rest = argv[1:]
        if kind == "bundle":
            report = measure_bundle(rest[0], rest[1], int(rest[2]))
        else:
            report = measure_genai(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        print(json.dumps(report))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--int4-bundle", type=Path, required=True)
    ap.add_argument("--fp32-bundle", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("export/genai-side-by-side"),
                    help="where the Llama checkpoint and the onnxruntime-genai model go (reused when present)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if args.max_new_tokens < 2:
        print("error: --max-new-tokens must be at least 2 to time decoding", file=sys.stderr)
        return 2
    try:
        report = run(args.int4_bundle, args.fp32_bundle, args.work, args.max_new_tokens)
    except SideBySideError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bundle the runtime refuses (RuntimeStatusError) and friends: one line
        from edgeprune_runtime.errors import RuntimeStatusError

        if isinstance(e, RuntimeStatusError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
