"""One command for a session with an NVIDIA GPU: does the runtime's CUDA backend agree with the CPU, and how fast is it?

    .venv/bin/pip install onnxruntime-gpu      # over the CPU wheel: pip uninstall -y onnxruntime first
    .venv/bin/python scripts/gpu_check.py --out docs/results/gpu-check.json

Needs: onnxruntime-gpu (CUDA provider), torch with CUDA (the transformers side of the bench), transformers, onnx and
this checkout's two packages, installed or on PYTHONPATH (`PYTHONPATH=.:runtime python scripts/gpu_check.py`): every
edgeprune command runs as `python -m edgeprune` with the interpreter that runs this script.

What it does, each part recorded in one JSON report (with provenance, written atomically):

  1. tiny twin, budget 1.0, three images: greedy token ids of `--backend cuda` == `--backend cpu` (must hold);
  2. llava-next-7b-shape --layers 2, budget 0.2: the same comparison; agreement = shared prefix of the two
     token streams (fp32 GPU matmuls use TF32, so a late divergence is possible and is reported, not hidden);
  3. `edgeprune bench llava-next-7b-shape --layers 2 --budget 0.2 --backend cuda`, fp32 and fp16, each side in its
     own process: time to first token, decode tokens/s, GPU memory, decode bytes/token and the fraction of the
     GPU's memory bandwidth that reaches (peak from GPU_BANDWIDTH_GBS by device name, or --peak-gbs);
  4. `--backend trt` after `edgeprune build --target rtx`: expected to be refused on compute capability 9.0
     (the refusal line is recorded).

`--dry-run` runs the same flow with the CPU backend standing in for CUDA and only the tiny-twin part unless
--with-7b is given (how tests/test_gpu_check.py checks this script on a machine without a GPU). Without
--dry-run on a machine the CUDA backend cannot use, it stops with the runtime's one-line refusal.
7b-shape exports hold 8-13 GB of RAM: on a shared machine run this under `flock /tmp/edgeprune-7b.lock`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runtime"))

EDGEPRUNE = [sys.executable, "-m", "edgeprune"]  # this interpreter's edgeprune (a venv, or PYTHONPATH=.:runtime)
PROMPT = "What is shown in this image?"
TINY_IMAGES = {"photo": (480, 640), "wide": (60, 200), "tall": (300, 90)}
# Peak memory bandwidth, GB/s, from NVIDIA's data sheets (SXM/PCIe/NVL differ)
GPU_BANDWIDTH_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039,
                     "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935, "L40S": 864, "L4": 300}


class CheckError(Exception):
    pass


def _run(args: list, what: str) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise CheckError(f"{what} failed: {last}")
    return proc.stdout


def export(model: str, out: Path, budget: float, precision: str = "fp32", layers: int | None = None) -> Path:
    args = [*EDGEPRUNE, "export", model, "--budget", budget, "--precision", precision, "--out", out]
    if layers is not None:
        args += ["--layers", layers]
    _run(args, f"export {model} ({precision})")
    return out


def tokens(bundle: Path, image: Path, backend: str, max_new_tokens: int) -> dict:
    """`edgeprune run --json` in its own process (each backend loads its own ONNX Runtime sessions)."""
    out = _run([*EDGEPRUNE, "run", bundle, "--image", image, "--prompt", PROMPT, "--json", "--backend", backend,
                "--max-new-tokens", max_new_tokens, "--skip-hash-check"], f"run --backend {backend}")
    return json.loads(out.strip().splitlines()[-1])


def agreement(a: list[int], b: list[int]) -> dict:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"equal": a == b, "shared_prefix": same, "tokens": max(len(a), len(b))}


def compare(bundle: Path, images: dict[str, Path], gpu_backend: str, max_new_tokens: int) -> dict:
    rows = {}
    for name, path in images.items():
        cpu, gpu = tokens(bundle, path, "cpu", max_new_tokens), tokens(bundle, path, gpu_backend, max_new_tokens)
        rows[name] = {"cpu": cpu["token_ids"], "under_test": gpu["token_ids"], "backend_reported": gpu["backend"],
                      **agreement(cpu["token_ids"], gpu["token_ids"])}
    return rows


def bandwidth_fraction(report: dict, gpu_name: str | None, peak_gbs: float | None) -> dict:
    ours = report["edgeprune"]
    peak = peak_gbs or next((v for k, v in GPU_BANDWIDTH_GBS.items() if gpu_name and k in gpu_name), None)
    achieved = ours.get("decode_gb_per_s")
    return {"gpu": gpu_name, "peak_gb_per_s": peak, "decode_gb_per_s": achieved,
            "fraction": achieved / peak if achieved and peak else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gpu-check.json")
    ap.add_argument("--work", type=Path, help="keep bundles here (default: a temporary directory)")
    ap.add_argument("--dry-run", action="store_true", help="CPU stands in for CUDA (no GPU needed); tiny twin only")
    ap.add_argument("--with-7b", action="store_true", help="with --dry-run: run the 7b-shape parts on the CPU too")
    ap.add_argument("--skip-7b", action="store_true", help="tiny twin only")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--peak-gbs", type=float, help="the GPU's peak memory bandwidth, GB/s (default: by device name)")
    args = ap.parse_args(argv)
    from edgeprune.provenance import provenance, write_json
    from edgeprune_runtime.errors import RuntimeStatusError

    gpu_backend = "cpu" if args.dry_run else "cuda"
    report: dict = {"dry_run": args.dry_run, "backend_under_test": gpu_backend, "provenance": provenance()}
    if not args.dry_run:
        from edgeprune_runtime.backends.select import cuda_device

        try:
            report["compute_capability"] = cuda_device()
        except RuntimeStatusError as e:
            print(f"error: {e.message} (or run with --dry-run)", file=sys.stderr)
            return 2
    with_7b = not args.skip_7b and (args.with_7b or not args.dry_run)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeprune-gpu-check-"))
    try:
        import numpy as np
        from PIL import Image

        images, rng = {}, np.random.default_rng(3)
        for name, (h, w) in TINY_IMAGES.items():  # noise: every crop grid and many patch values
            images[name] = work / f"{name}.png"
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(images[name])
        tiny = export("llava-next-tiny", work / "tiny-1.0", 1.0)
        report["tiny_budget_1.0"] = compare(tiny, images, gpu_backend, args.max_new_tokens)
        report["tiny_equal"] = all(r["equal"] for r in report["tiny_budget_1.0"].values())
        if with_7b:
            big = export("llava-next-7b-shape", work / "7b-fp32", 0.2, layers=2)
            report["7b_shape_budget_0.2"] = compare(big, {"photo": images["photo"]}, gpu_backend, args.max_new_tokens)
            gpu_name = None
            if not args.dry_run:
                import torch

                gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
            report["bench"] = {}
            for precision in ("fp32", "fp16"):
                bundle = big if precision == "fp32" else export("llava-next-7b-shape", work / "7b-fp16", 0.2, "fp16", 2)
                bench = json.loads(_run([*EDGEPRUNE, "bench", "llava-next-7b-shape", "--layers", 2, "--bundle", bundle,
                                         "--backend", gpu_backend, "--max-new-tokens", 32, "--json"],
                                        f"bench {precision}").strip().splitlines()[-1])
                bench["bandwidth"] = bandwidth_fraction(bench, gpu_name, args.peak_gbs)
                report["bench"][precision] = bench
                if precision == "fp16":
                    shutil.rmtree(bundle, ignore_errors=True)
            if not args.dry_run:
                report["trt"] = trt_check(big, images["photo"])
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, report)
    print(json.dumps({"tiny_equal": report["tiny_equal"], "out": str(args.out)}))
    return 0 if report["tiny_equal"] else 1


def trt_check(bundle: Path, image: Path) -> dict:
    """Builds the rtx engines and asks the runtime for --backend trt; on an H100 (9.0) the answer is a refusal."""
    build = subprocess.run([*EDGEPRUNE, "build", bundle, "--target", "rtx", "--json"], capture_output=True, text=True)
    if build.returncode != 0:
        return {"built": False, "why": (build.stderr.strip().splitlines() or ["?"])[-1]}
    run = subprocess.run([*EDGEPRUNE, "run", bundle, "--image", image, "--prompt", PROMPT, "--json", "--backend", "trt",
                          "--max-new-tokens", "8"], capture_output=True, text=True)
    return {"built": True, "ran": run.returncode == 0,
            "answer": json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else None,
            "refusal": (run.stderr.strip().splitlines() or [""])[-1] if run.returncode else None}


if __name__ == "__main__":
    sys.exit(main())
