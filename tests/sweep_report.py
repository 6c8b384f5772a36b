"""Run every case of tests/sweep_cases.py in-process and print what a user would get.

    .venv/bin/python tests/sweep_report.py [-k SUBSTRING] [--width N] [--json PATH]

One row per case: id, outcome, stderr line count, then the first stderr line (for a traceback:
the exception's type and first message line). Outcomes:
  ok            exit != 0, one stderr line, naming the offending thing
  traceback:T   exception T escaped main() (a user would see a traceback)
  rc0           exit status 0: the bad input was accepted
  multiline     exit != 0 but stderr had 0 or several non-empty lines (argparse: usage + error)
  no-needle     exit != 0, one line, but it does not name the offending thing
Totals per outcome at the end. Each case runs in a fresh temporary folder, which is also the
working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep_cases as sc  # noqa: E402


def _rmtree(path: Path) -> None:
    def onerror(fn, p, exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            fn(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def run_case(case: sc.Case, tmp: Path, fx: sc.Fixtures) -> dict:
    cwd = os.getcwd()
    os.chdir(tmp)
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    try:
        argv = case.setup(tmp, fx)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc, exc, wlines = sc.call_main(argv)
    finally:
        os.chdir(cwd)
    lines = sc.nonempty_lines(err.getvalue()) + wlines
    outcome = sc.classify(case, rc, exc, lines)
    if exc is not None:
        msg = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {msg[0] if msg else ''}"
    else:
        detail = lines[0] if lines else "(no stderr)"
    res = dict(id=case.id, outcome=outcome, rc=rc, lines=len(lines), detail=detail, stderr=lines,
               argv=[str(a) for a in argv], seconds=round(time.perf_counter() - t0, 2))
    if outcome == "ok" and case.weights_first and sc.mentions(lines[0], (sc.WEIGHTS_MISSING,)):
        res["weights_missing"] = True
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default=None, help="only cases whose id contains this")
    ap.add_argument("--width", type=int, default=150, help="cut the detail column at this many characters (0: never)")
    ap.add_argument("--json", default=None, help="also write every result (with full stderr) to this JSON file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # tiny networks: one thread is faster on a shared 2-core machine
    cases = [c for c in sc.CASES if args.k is None or args.k in c.id]
    base = Path(tempfile.mkdtemp(prefix="ddpm-sweep-"))
    results = []
    t0 = time.perf_counter()
    try:
        with sc.isolated_env(base):
            fx = sc.build_fixtures(base / "fixtures")
            for i, case in enumerate(cases):
                tmp = base / f"case-{i:03d}"
                tmp.mkdir()
                results.append(run_case(case, tmp, fx))
                _rmtree(tmp)
    finally:
        _rmtree(base)
    total_s = time.perf_counter() - t0

    idw = max(len(r["id"]) for r in results)
    ow = max(len(r["outcome"]) for r in results)
    for r in results:
        detail = r["detail"]
        if args.width and len(detail) > args.width:
            detail = detail[: args.width - 1] + "…"
        print(f"{r['id']:<{idw}}  {r['outcome']:<{ow}}  {r['lines']:>2}  {detail}")
    counts = Counter(r["outcome"].split(":")[0] for r in results)
    tb = Counter(r["outcome"] for r in results if r["outcome"].startswith("traceback"))
    print()
    print(f"{len(results)} cases in {total_s:.0f} s")
    for k in ("ok", "traceback", "rc0", "multiline", "no-needle"):
        extra = ""
        if k == "traceback" and tb:
            extra = "  (" + ", ".join(f"{t.split(':', 1)[1]} {n}" for t, n in tb.most_common()) + ")"
        if k == "ok":
            w = sum(1 for r in results if r.get("weights_missing"))
            extra = f"  ({w} of them stopped at the missing Inception weights)" if w else ""
        print(f"  {k:<10} {counts.get(k, 0):>4}{extra}")
    slow = sorted(results, key=lambda r: -r["seconds"])[:5]
    print("slowest: " + ", ".join(f"{r['id']} {r['seconds']:.1f}s" for r in slow))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
