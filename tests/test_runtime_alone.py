"""The runtime installed alone: `pip install ./runtime` into a fresh venv (no torch, transformers or onnx)
answers with the same token ids as `edgeprune run`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fresh_venv_runtime_matches_edgeprune_run(tmp_path, tiny_bundles):
    from edgeprune.sample_image import write_sample_image

    source = tmp_path / "runtime-src"  # a copy: pip's build would leave build/ in the source tree
    shutil.copytree(ROOT / "runtime", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              f"{source}[cpu]"], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; "
                            "print([m for m in ('torch', 'transformers', 'onnx') if u.find_spec(m)])"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", "the runtime's install pulled in a heavy package"

    image = write_sample_image(tmp_path / "table.png")
    args = [str(tiny_bundles[0.2]), "--image", str(image), "--prompt", "What is on the table?", "--json",
            "--max-new-tokens", "8"]
    alone = subprocess.run([str(python), "-m", "edgeprune_runtime", *args], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    ours = subprocess.run([str(Path(sys.executable).with_name("edgeprune")), "run", *args], capture_output=True,
                          text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["token_ids"] == json.loads(ours.stdout)["token_ids"]
