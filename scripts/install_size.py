"""How large a runtime-only install is, per distribution, and how much of it the runtime never imports.

    .venv/bin/python scripts/record_result.py docs/results/runtime-install-size.json -- \\
        .venv/bin/python scripts/install_size.py --bundle export/tiny --image demo/table.png

Builds the runtime wheel from runtime/ and installs it into fresh venvs:

- `plain`: `pip install 'edgeprune_runtime-*.whl[cpu]'`, everything pip resolves;
- `no-ort`: the wheel without an extra (a machine whose ONNX Runtime is already installed adds nothing more);
- `minimal`: `pip install --no-deps` of the wheel and of the four distributions the runtime imports (numpy,
  pillow, tokenizers, onnxruntime): what the dependency trees add beyond them is never imported by the runtime.

Sizes are the bytes of the files each distribution's RECORD lists (site-packages), less the empty venv's own
(pip). Each variant with an ONNX Runtime answers on --bundle, and must give the same token ids as `plain`.
Prints one JSON object (with provenance) on the last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edgeprune.provenance import provenance  # noqa: E402

PIP = ["-m", "pip", "install", "-q", "--disable-pip-version-check"]
IMPORTED = ["numpy", "pillow", "tokenizers", "onnxruntime"]  # what edgeprune_runtime imports (besides itself)
SIZES = r"""
import json, importlib.metadata as md
out = {}
for d in md.distributions():
    total = 0
    for f in d.files or []:
        p = d.locate_file(f)
        try:
            total += p.stat().st_size
        except OSError:
            pass
    out[d.metadata["Name"].lower().replace("_", "-")] = {"version": d.version, "bytes": total}
print(json.dumps(out))
"""


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd))} failed: {done.stderr.strip()[-800:]}")
    return done


def sizes(python: Path) -> dict:
    return json.loads(run([python, "-c", SIZES]).stdout)


def answer(python: Path, bundle: Path, image: Path) -> list[int] | str:
    done = subprocess.run([str(python), "-m", "edgeprune_runtime", str(bundle), "--image", str(image), "--prompt",
                           "What is on the table?", "--max-new-tokens", "8", "--json"], capture_output=True, text=True,
                          timeout=300)
    return json.loads(done.stdout)["token_ids"] if done.returncode == 0 else done.stderr.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "runtime", work / "runtime",
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", work / "dist",
             work / "runtime"])
        wheel = next((work / "dist").glob("edgeprune_runtime-*.whl"))
        variants = {"plain": [f"{wheel}[cpu]"], "no-ort": [str(wheel)],
                    "minimal": ["--no-deps", str(wheel), *IMPORTED]}
        empty = work / "empty"
        venv.create(empty, with_pip=True)
        base = sizes(empty / "bin" / "python")
        report = {"wheel": wheel.name, "variants": {}}
        for name, spec in variants.items():
            env = work / name
            venv.create(env, with_pip=True)
            python = env / "bin" / "python"
            run([python, *PIP, *spec], timeout=900)
            dists = {k: v for k, v in sizes(python).items() if k not in base}
            report["variants"][name] = {
                "pip_install": spec if name != "minimal" else ["--no-deps", "edgeprune_runtime-*.whl", *IMPORTED],
                "total_bytes": sum(d["bytes"] for d in dists.values()),
                "distributions": dict(sorted(dists.items(), key=lambda kv: -kv[1]["bytes"])),
                "answer": answer(python, args.bundle, args.image),
            }
    plain, minimal = report["variants"]["plain"], report["variants"]["minimal"]
    if not isinstance(plain["answer"], list) or minimal["answer"] != plain["answer"]:
        raise SystemExit(f"error: the variants answer differently: plain {plain['answer']!r}, minimal {minimal['answer']!r}")
    cut = sorted(set(plain["distributions"]) - set(minimal["distributions"]))
    report["not_imported"] = {"distributions": cut,
                              "bytes": sum(plain["distributions"][d]["bytes"] for d in cut)}
    report["provenance"] = provenance()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
