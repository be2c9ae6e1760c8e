"""`make mutants`: mutmut over the modules that define correctness; mutation score per module.

    .venv/bin/python scripts/mutation.py [--max-children N] [--only 'edgeprune.plan.*'] [--survivors] [--out FILE]

What is mutated and which tests run is `[tool.mutmut]` in pyproject.toml. mutmut 3 names a mutant after its
file path (runtime/edgeprune_runtime/layout.py -> runtime.edgeprune_runtime.layout) and activates it only
where that name equals the module's `__name__` (edgeprune_runtime.layout), so the run happens in a fresh
staging copy, build/mutation/, in which edgeprune/ and edgeprune_runtime/ both sit at the top level (the
tests' conftest puts that copy first on sys.path). Every run starts from scratch (no cached verdicts) and
hypothesis runs derandomized (the `mutation` profile in tests/conftest.py), so two runs of one commit list
the same survivors.

Mutants that time out are run once more (a load spike on a shared machine is not a kill). Writes
docs/results/mutation.json: per module the count of each verdict and the score
(killed + timeout + segfault) / mutants, every survivor with its diff, every mutant's verdict, and the runs they
come from (`--only` globs, commit, date). Runs add up: a module this run did not touch keeps its entry,
and a module run in part keeps its earlier verdicts for the mutants not rerun while its file is
unchanged — so one module at a time (`--only 'edgeprune.plan.*'`), or just the report's survivors after
a new test (`--survivors`), updates the report. Exit status 0 when mutmut
ran, whatever the score (the README says why each listed survivor is equivalent).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
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
KILLED = ("killed", "timeout", "segfault")  # a test process that crashes under the mutant has detected it


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


def summarise(found: dict[str, str], earlier: dict[str, dict], run: dict) -> dict:
    """Per module: counts, score and survivors over this run's verdicts laid over the earlier report's.

    `--only` runs a subset; a module's earlier verdicts count only while its file is byte-identical
    (`file_sha256`), since mutmut numbers mutants by their place in the source. (Tests may have grown
    stronger since: a mutant once killed stays killed.) A module this run did not touch is kept as it was.
    """
    modules = {}
    for module, path in MODULES.items():
        everything = {k: v for k, v in found.items() if module_of(k) == module}
        ran = {k: v for k, v in everything.items() if v != "not checked"}  # `--only` leaves the rest unrun
        before = earlier.get(module, {})
        if not ran and before.get("mutants"):
            modules[module] = before
            continue
        sha = hashlib.sha256((ROOT / path).read_bytes()).hexdigest()
        same = before.get("file_sha256") == sha and "verdict_of" in before
        verdict_of = {**(before["verdict_of"] if same else {}), **ran}
        known_diffs = {s["name"]: s["diff"] for s in before.get("survivors", [])} if same else {}
        counts = Counter(verdict_of.values())
        total = len(verdict_of)
        killed = sum(counts[v] for v in KILLED)
        survivors = sorted((k for k, v in verdict_of.items() if v not in KILLED), key=_natural)
        modules[module] = {
            "file": path,
            "file_sha256": sha,
            "mutants": total,
            "not_run": len(everything) - total,
            "verdicts": dict(sorted(counts.items())),
            "score": round(killed / total, 4) if total else None,
            "survivors": [{"name": k, "verdict": verdict_of[k], "diff": known_diffs[k] if k in known_diffs and k not in ran
                           else _diff(k)} for k in survivors],
            "runs": (before.get("runs", []) if same else []) + ([run] if ran else []),
            "verdict_of": dict(sorted(verdict_of.items(), key=lambda kv: _natural(kv[0]))),
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
    """Per module, the entry of the report already at `out` ({} when there is none), each with its "runs"
    ([{"only", "commit", "date"}]): `--only` runs then add up to one report."""
    if not out.exists():
        return {}
    report = json.loads(out.read_text())
    stamp = report.get("provenance", {})
    modules = report.get("modules", {})
    for m in modules.values():
        m.pop("run", None)
        m.setdefault("runs", [{"only": report.get("only", []), "commit": stamp.get("commit"), "date": stamp.get("date")}])
        if "file_sha256" not in m and m["runs"][-1].get("commit"):  # reports before file_sha256 existed
            source = subprocess.run(["git", "show", f"{m['runs'][-1]['commit']}:{m['file']}"], cwd=ROOT, capture_output=True)
            if source.returncode == 0:
                m["file_sha256"] = hashlib.sha256(source.stdout).hexdigest()
    return modules


def _unkilled(earlier: dict[str, dict], globs: list[str]) -> list[str]:
    """The mutants an earlier report left alive, in modules whose file is unchanged since, matching `globs`."""
    names = []
    for m in earlier.values():
        if m.get("file_sha256") != hashlib.sha256((ROOT / m["file"]).read_bytes()).hexdigest():
            continue
        names += [k for k, v in m.get("verdict_of", {}).items()
                  if v not in KILLED and (not globs or any(fnmatch.fnmatchcase(k, g) for g in globs))]
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="*", default=[], help="mutant name globs, e.g. 'edgeprune.plan.*' (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "mutation.json")
    ap.add_argument("--survivors", action="store_true",
                    help="run only the mutants the report at --out lists as not killed (of the modules --only matches), "
                         "e.g. after adding a test")
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
        names = args.only
        if args.survivors:
            names = _unkilled(_earlier_runs(args.out), args.only)
            if not names:
                print(f"no surviving mutants of {' '.join(args.only) or 'any module'} in {args.out} whose file is unchanged")
                return 0
            print(f"rerunning {len(names)} mutant(s) not killed in {args.out}")
        stage()
        run = mutmut("run", "--max-children", str(args.max_children), *names)
        if run.returncode != 0:
            print(f"error: `mutmut run` exited with {run.returncode}; see its output above", file=sys.stderr)
            return 2
        # A timeout under a load spike (this machine is shared) is not a kill: run those mutants once more.
        timeouts = [k for k, v in verdicts().items() if v == "timeout"]
        if timeouts:
            print(f"\nrerunning {len(timeouts)} mutant(s) that timed out")
            mutmut("run", "--max-children", str(args.max_children), *timeouts)
    stamp = provenance()
    run = {"only": args.only, "survivors": args.survivors, "commit": stamp["commit"], "date": stamp["date"]}
    modules = summarise(verdicts(), _earlier_runs(args.out), run)
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
