"""Export never destroys what it did not make, and every failure is one line (issue 12), as a user meets it.

The issue's reproductions: a directory holding `manifest.json` (`{}`) and `src/` used to be replaced wholesale;
`--out .`, `--out /proc/x` and a full disk (`ulimit -f`) ended in tracebacks; SIGTERM left `.NAME.partial-*` and
`edgeprune-trace-*` behind. Plus `edgeprune run` with a prompt that is not UTF-8 and a subnormal temperature.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeprune.errors import ExportError
from edgeprune.export import export_bundle
from edgeprune_runtime.manifest import load_manifest

EDGEPRUNE = Path(sys.executable).with_name("edgeprune")


def cli(*args, cwd=None, env=None, shell_prefix="") -> subprocess.CompletedProcess:
    argv = [str(EDGEPRUNE), *map(str, args)]
    if shell_prefix:  # e.g. `ulimit -f 200;` before the command
        argv = ["bash", "-c", shell_prefix + " exec " + " ".join(f"'{a}'" for a in argv)]
    return subprocess.run(argv, capture_output=True, timeout=300, cwd=cwd, env=env)


def one_error_line(result: subprocess.CompletedProcess, pattern: str) -> str:
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0], lines[0]
    return lines[0]


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def debris(*dirs: Path) -> list[str]:
    return [p.name for d in dirs for p in d.iterdir() if ".partial-" in p.name or p.name.startswith("edgeprune-trace-")]


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """The issue's directory: `echo '{}' > manifest.json`, `src/index.js`."""
    d = tmp_path / "w"
    (d / "src").mkdir(parents=True)
    (d / "manifest.json").write_text("{}\n")
    (d / "src" / "index.js").write_text("x\n")
    return d


def test_a_directory_that_is_not_a_bundle_is_refused_untouched(user_dir):
    before = listing(user_dir)
    line = one_error_line(cli("export", "llava-next-tiny", "--budget", "0.2", "--out", user_dir),
                          "is not an edgeprune bundle")
    assert str(user_dir) in line and "--force" in line and "nothing was changed" in line
    assert listing(user_dir) == before
    assert sorted(p.name for p in user_dir.parent.iterdir()) == ["w"]


def test_force_moves_it_aside_and_deletes_nothing(user_dir):
    before = listing(user_dir)
    result = cli("export", "llava-next-tiny", "--budget", "0.2", "--out", user_dir, "--force")
    assert result.returncode == 0, result.stderr
    assert "aside to" in result.stderr.decode()
    load_manifest(user_dir)  # the new bundle, complete
    aside = [p for p in user_dir.parent.iterdir() if p.name.startswith("w.old-")]
    assert len(aside) == 1 and listing(aside[0]) == before


def test_an_old_bundle_is_replaced_only_while_it_holds_only_its_files(tiny, tiny_recipe, tmp_path):
    out = tmp_path / "bundle"
    export_bundle("llava-next-tiny", out, tiny_recipe(0.2), loaded=tiny)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="it holds notes.txt, which its manifest does not list"):
        export_bundle("llava-next-tiny", out, tiny_recipe(1.0), loaded=tiny)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "engines" / "rtx").mkdir(parents=True)  # `edgeprune build` output belongs to the bundle
    (out / "engines" / "rtx" / "lm.engine").write_bytes(b"plan")
    export_bundle("llava-next-tiny", out, tiny_recipe(1.0), loaded=tiny)
    assert load_manifest(out).data["recipe"]["budget"] == 1.0 and not (out / "engines").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_symlink_inside_makes_it_not_ours(tiny, tiny_recipe, tmp_path):
    out = tmp_path / "bundle"
    export_bundle("llava-next-tiny", out, tiny_recipe(0.2), loaded=tiny)
    (out / "data").symlink_to(tmp_path)
    with pytest.raises(ExportError, match="symlink"):
        export_bundle("llava-next-tiny", out, tiny_recipe(0.2), loaded=tiny)


@pytest.mark.parametrize("out, pattern", [(".", "is the current directory"), ("..", "one above it"),
                                          ("/proc/x", "cannot create the bundle /proc/x")])
def test_impossible_destinations_are_one_line(tmp_path, out, pattern):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    one_error_line(cli("export", "llava-next-tiny", "--out", out, cwd=work), pattern)
    assert (work / "keep.txt").read_text() == "mine" and sorted(os.listdir(work)) == ["keep.txt"]


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """`ulimit -f`: writes past the limit fail with EFBIG (Python ignores SIGXFSZ)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    one_error_line(cli("export", "llava-next-tiny", "--out", tmp_path / "b", env=env, shell_prefix="ulimit -f 200;"),
                   "File too large")
    assert debris(tmp_path, scratch) == [] and not (tmp_path / "b").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_during_export_cleans_up(tmp_path, signum):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    proc = subprocess.Popen([str(EDGEPRUNE), "export", "llava-next-tiny", "--out", str(tmp_path / "b")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))  # not inherited as ignored (nohup)
    deadline = time.monotonic() + 120
    while not debris(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # until the stage directory exists: the export is under way
    assert proc.poll() is None, "the export ended before it could be interrupted"
    time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = err.decode().strip().splitlines()
    assert lines == ["error: interrupted"], err
    assert debris(tmp_path, scratch) == [] and not (tmp_path / "b").exists()


def test_run_with_a_prompt_that_is_not_utf8(tiny_bundles, tmp_path):
    image = tmp_path / "cam.png"
    assert cli("sample-image", image).returncode == 0
    one_error_line(cli("run", tiny_bundles[0.2], "--image", image, "--prompt", b"caf\xc3".decode("utf-8", "surrogateescape")),
                   "not valid UTF-8")


def test_a_subnormal_temperature_is_greedy(tiny_bundles, tmp_path):
    """The T -> 0 limit of sampling is the argmax: the same tokens as greedy decoding, no NaN, no warnings."""
    image = tmp_path / "cam.png"
    assert cli("sample-image", image).returncode == 0
    args = ["run", tiny_bundles[0.2], "--image", image, "--prompt", "What is here?", "--max-new-tokens", 12, "--json"]
    greedy, tiny_t = cli(*args), cli(*args, "--temperature", "1e-320", "--top-p", "0.5", "--seed", "7")
    assert greedy.returncode == tiny_t.returncode == 0, tiny_t.stderr
    assert tiny_t.stderr == b""
    assert json.loads(tiny_t.stdout)["token_ids"] == json.loads(greedy.stdout)["token_ids"]
