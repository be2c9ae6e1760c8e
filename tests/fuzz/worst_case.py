"""Peak memory of a fresh process that loads the fuzzer's worst bundle (largest traced peak of a session) and
serves one request, beside the same for the unmutated fake bundles, under the budget the fuzzer enforced.

    EDGEPRUNE_FUZZ_REPORT=/tmp/fuzz.json .venv/bin/python -m pytest -m fuzz_deep tests/fuzz
    .venv/bin/python tests/fuzz/worst_case.py /tmp/fuzz.json      # prints one JSON object

Growth = VmHWM after the request - VmRSS once the runtime's imports are done (Linux; the peak is reset
through /proc/self/clear_refs), so what is measured is what the bundle and the request made the process use.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CHILD = r"""
import json, sys
import numpy, onnxruntime, PIL.Image, tokenizers
from edgeprune_runtime import capi

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

bundle, image, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
open("/proc/self/clear_refs", "w").write("5")
base = kb("VmRSS")
out, params, gen = capi.Out(), capi.Out(), capi.Out()
load = capi.Bundle_Create(bundle, out, memory_budget_mb=budget)
result = {"load": load.name, "message": capi.GetLastError() if load else ""}
if load == capi.Status.OK:
    capi.GeneratorParams_Create(params)
    capi.GeneratorParams_SetMaxNewTokens(params.value, 2)
    st = capi.Generator_Create(out.value, params.value, image, "What is this?", False, gen)
    if st == capi.Status.OK:
        while capi.Generator_IsDone(gen.value, params) == capi.Status.OK and not params.value:
            if capi.Generator_GenerateNextToken(gen.value) != capi.Status.OK:
                break
    result["request"] = st.name
print(json.dumps(result | {"growth_bytes": (kb("VmHWM") - base) * 1024, "base_rss_bytes": base * 1024}))
"""


def measure(bundle: Path, image: Path, budget_mb: int) -> dict:
    env = {"PYTHONPATH": str(ROOT / "runtime"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(image), str(budget_mb)], capture_output=True,
                          text=True, timeout=600, env=env)
    if proc.returncode:
        raise SystemExit(f"error: the measuring process failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


def main(report_path: str) -> None:
    sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "tests" / "runtime")]
    import numpy as np
    from PIL import Image

    from fake_bundle import make_fake_bundle

    report = json.loads(Path(report_path).read_text())
    budget_mb = report["budget_bytes"] >> 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "cam.png"  # what the fuzz harness serves
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(image)
        plain, _ = make_fake_bundle(tmp / "plain")
        long_cache, _ = make_fake_bundle(tmp / "long", new_slots=60_000)
        print(json.dumps({
            "budget_mb": budget_mb,
            "worst": {"traced_peak_bytes": report["peak_bytes"], "in_session_rss_growth_bytes": report.get("rss_growth_bytes"),
                      "note": report.get("note"), "fresh_process": measure(Path(report["bundle"]), image, budget_mb)},
            "baseline_fake_bundle": measure(plain, image, budget_mb),
            "baseline_long_cache_bundle": measure(long_cache, image, budget_mb),
        }, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: worst_case.py REPORT.json (written by a fuzz run with EDGEPRUNE_FUZZ_REPORT=REPORT.json)")
    main(sys.argv[1])
