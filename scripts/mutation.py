"""`make mutants`: mutmut over the modules that define correctness; mutation score per module.

    .venv/bin/python scripts/mutation.py [--max-children N] [--only 'edgeprune.plan.*'] [--out FILE]

What is mutated and which tests run is `[tool.mutmut]` in pyproject.toml. mutmut 3 names a mutant after its
file path (runtime/edgeprune_runtime/layout.py -> runtime.edgeprune_runtime.layout) and activates it only
where that name equals the module's `__name__` (edgeprune_runtime.layout), so the run happens in a fresh
staging copy, build/mutation/, in which edgeprune/ and edgeprune_runtime/ both sit at the top level (the
tests' conftest puts that copy first on sys.path). Every run starts from scratch (no cached verdicts) and
hypothesis runs derandomized (the `mutation` profile in tests/conftest.py), so two runs of one commit list
the same survivors.

Mutants that time out are run once more (a load spike on a shared machine is not a kill). Writes
docs/results/mutation.json: per module the count of each verdict and the score
(killed + timeout) / mutants, every survivor with its diff, and the run it comes from (`--only` globs,
commit, date). A module this run did not touch keeps its entry from the file already there, so a
module at a time (`--only 'edgeprune.plan.*'`) adds up to the whole report. Exit status 0 when mutmut
ran, whatever the score (the README says why each listed survivor is equivalent).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edgeprune.provenance import provenance, write_json  # noqa: E402

STAGE = ROOT / "build" / "mutation"
MODULES = {  # module name in the staging copy -> file in this repository
    "edgeprune.plan": "edgeprune/plan.py",
    "edgeprune.selection": "edgeprune/selection.py",
    "edgeprune_runtime.layout": "runtime/edgeprune_runtime/layout.py",
    "edgeprune_runtime.kvcache": "runtime/edgeprune_runtime/kvcache.py",
    "edgeprune_runtime.preprocess": "runtime/edgeprune_runtime/preprocess.py",
}
KILLED = ("killed", "timeout")


def stage() -> None:
    if STAGE.exists():
        shutil.rmtree(STAGE)
    junk = shutil.ignore_patterns("__pycache__", ".hypothesis", "*.egg-info", "build")
    STAGE.mkdir(parents=True)
    shutil.copytree(ROOT / "edgeprune", STAGE / "edgeprune", ignore=junk)
    shutil.copytree(ROOT / "runtime" / "edgeprune_runtime", STAGE / "edgeprune_runtime", ignore=junk)
    shutil.copytree(ROOT / "tests", STAGE / "tests", ignore=junk)
    shutil.copy2(ROOT / "pyproject.toml", STAGE / "pyproject.toml")


def mutmut(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}  # one thread per child: children run side by side
    return subprocess.run([str(exe), *args], cwd=STAGE, env=env, text=True, capture_output=capture)


def verdicts() -> dict[str, str]:
    """{mutant name: verdict} from `mutmut results --all true` (lines `    name: verdict`)."""
    out = mutmut("results", "--all", "true", capture=True)
    if out.returncode != 0:
        raise SystemExit(f"error: `mutmut results` failed: {out.stderr.strip().splitlines()[-1:]}")
    found = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\s+(\S+__mutmut_\d+): (.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def module_of(mutant: str) -> str:
    return next(m for m in sorted(MODULES, key=len, reverse=True) if mutant.startswith(m + "."))


def summarise(found: dict[str, str]) -> dict:
    modules = {}
    for module, path in MODULES.items():
        everything = {k: v for k, v in found.items() if module_of(k) == module}
        mine = {k: v for k, v in everything.items() if v != "not checked"}  # `--only` leaves the rest unrun
        counts = Counter(mine.values())
        total = len(mine)
        killed = sum(counts[v] for v in KILLED)
        survivors = sorted((k for k, v in mine.items() if v not in KILLED), key=_natural)
        modules[module] = {
            "file": path,
            "mutants": total,
            "not_run": len(everything) - total,
            "verdicts": dict(sorted(counts.items())),
            "score": round(killed / total, 4) if total else None,
            "survivors": [{"name": k, "verdict": mine[k], "diff": _diff(k)} for k in survivors],
        }
    return modules


def _natural(name: str):
    head, _, n = name.rpartition("__mutmut_")
    return head, int(n)


def _diff(name: str) -> str:
    out = mutmut("show", name, capture=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("+", "-")) and not ln.startswith(("+++", "---"))]
    return "\n".join(lines)


def _earlier_runs(out: Path) -> dict[str, dict]:
    """Per module, the entry of the report already at `out` ({} when there is none), each with its "run"
    ({"only", "commit", "date"}): `--only` runs of one module at a time then add up to one report."""
    if not out.exists():
        return {}
    report = json.loads(out.read_text())
    stamp = report.get("provenance", {})
    modules = report.get("modules", {})
    for m in modules.values():
        m.setdefault("run", {"only": report.get("only", []), "commit": stamp.get("commit"), "date": stamp.get("date")})
    return modules


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="*", default=[], help="mutant name globs, e.g. 'edgeprune.plan.*' (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "mutation.json")
    ap.add_argument("--report-only", action="store_true",
                    help="write the JSON from the last run in build/mutation/ without running anything")
    args = ap.parse_args(argv)
    if shutil.which("mutmut", path=str(Path(sys.executable).parent)) is None:
        print("error: mutmut is not installed in this environment; run `make setup` (the dev extra has it)", file=sys.stderr)
        return 2
    if args.report_only:
        if not (STAGE / "mutants").is_dir():
            print("error: no mutation run in build/mutation/; run `make mutants` first", file=sys.stderr)
            return 2
    else:
        stage()
        run = mutmut("run", "--max-children", str(args.max_children), *args.only)
        if run.returncode != 0:
            print(f"error: `mutmut run` exited with {run.returncode}; see its output above", file=sys.stderr)
            return 2
        # A timeout under a load spike (this machine is shared) is not a kill: run those mutants once more.
        timeouts = [k for k, v in verdicts().items() if v == "timeout"]
        if timeouts:
            print(f"\nrerunning {len(timeouts)} mutant(s) that timed out")
            mutmut("run", "--max-children", str(args.max_children), *timeouts)
    stamp = provenance()
    modules = summarise(verdicts())
    earlier = _earlier_runs(args.out)
    for name, m in modules.items():
        if m["mutants"]:
            m["run"] = {"only": args.only, "commit": stamp["commit"], "date": stamp["date"]}
        elif earlier.get(name, {}).get("mutants"):
            modules[name] = earlier[name]  # not run this time: keep the earlier run's verdicts (its "run" says which)
    report = {"command": "make mutants", "only": args.only, "provenance": stamp, "modules": modules}
    write_json(args.out, report)
    print(f"\n{'module':32} {'mutants':>8} {'killed':>7} {'score':>7}  survivors")
    for module, m in modules.items():
        if m["mutants"]:
            killed = sum(m["verdicts"].get(v, 0) for v in KILLED)
            names = ", ".join(s["name"].rpartition(".")[2] for s in m["survivors"])
            print(f"{module:32} {m['mutants']:8} {killed:7} {m['score']:7.1%}  {names}")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
