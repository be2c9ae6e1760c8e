"""Run a measuring command and keep its JSON report, with provenance, under docs/results/.

    .venv/bin/python scripts/record_result.py docs/results/bench-7b-shape.json -- \\
        .venv/bin/edgeprune bench llava-next-7b-shape --budget 0.2 --layers 2 --json
    .venv/bin/python scripts/record_result.py docs/results/sweep-7b-shape.json \\
        --take export/sweep-7b/sweep.json --copy export/sweep-7b/sweep.png=docs/results/sweep-7b-shape.png -- \\
        .venv/bin/edgeprune sweep llava-next-7b-shape --layers 2 --out export/sweep-7b ...

The report is the command's last stdout line (commands run with --json print one JSON object) or, with
--take, a file the command wrote. `edgeprune bench` and `sweep` stamp their reports with `provenance`
(commit, CPU model, cores, library versions, the command line: edgeprune/provenance.py); this script
adds the exact command it ran as `recorded_command` and writes the file atomically, so a failed or
interrupted run leaves the previous result in place. scripts/readme_tables.py turns these files into the
README's tables.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edgeprune.provenance import write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("error: give the command after `--`, e.g. record_result.py OUT.json -- edgeprune bench NAME --json",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the results JSON to write (docs/results/NAME.json)")
    ap.add_argument("--take", type=Path, help="read the report from this file (written by the command)")
    ap.add_argument("--copy", action="append", default=[], metavar="SRC=DST", help="also keep SRC as DST (a plot)")
    args = ap.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        print("error: no command after `--`", file=sys.stderr)
        return 2
    copies = []
    for pair in args.copy:
        if "=" not in pair:
            print(f"error: --copy takes SRC=DST, got {pair!r}", file=sys.stderr)
            return 2
        copies.append(tuple(Path(p) for p in pair.split("=", 1)))
    try:
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # stderr (progress, errors) passes through
    except OSError as e:
        print(f"error: cannot run {command[0]}: {e.strerror}", file=sys.stderr)
        return 2
    if proc.returncode != 0:
        print(f"error: the command exited with {proc.returncode}; nothing was written", file=sys.stderr)
        return proc.returncode
    try:
        if args.take:
            report = json.loads(args.take.read_text())
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
            report = json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        print(f"error: no JSON report from the command ({e}); run it with --json or give --take FILE", file=sys.stderr)
        return 2
    if not isinstance(report, dict) or "provenance" not in report:
        print("error: the report has no `provenance`; record only edgeprune bench/sweep reports", file=sys.stderr)
        return 2
    report["recorded_command"] = shlex.join([_short(c) for c in command])
    options = (["--take", str(args.take)] if args.take else []) + [f"--copy={pair}" for pair in args.copy]
    if options:  # what record_result.py itself was given, so the README can print the whole command
        report["recorded_options"] = shlex.join(_short(o) for o in options)
    for src, dst in copies:
        tmp = dst.with_name(f".{dst.name}.tmp")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


def _short(arg: str) -> str:
    """A path inside the repository as a relative path (the command as a reader would type it)."""
    p = Path(arg)
    if p.is_absolute() and p.is_relative_to(ROOT):
        return str(p.relative_to(ROOT))
    return arg


if __name__ == "__main__":
    sys.exit(main())
