"""OpenMP's thread policy against load: which default keeps the idle speed and bounds a shared CPU.

    python benchmarks/threads_bench.py                      # the whole matrix (about 20 minutes on 2 cores)
    python benchmarks/threads_bench.py --loads 0,1 --reps 1 # a shorter one

The matrix: policy x load x workload. A policy is the environment a process starts with (OpenMP
reads it when torch loads its runtime, so each cell is a fresh process); a load is how many
competing busy processes (one core each, a Python busy loop) this script starts before the cell
and stops after it; the workloads are what ddpm's commands spend their time in:

- demo train: the `demo` preset's training step (16x16, batch 64, its precision "auto"), bench.py's
  step with ddpm's default fast paths;
- demo sample: 5 ancestral steps of the demo network at batch 64 (what `make demo` samples);
- cifar10 forward / train: the paper's CIFAR-10 network at batch 8, fp32 (bench.py's CPU targets);
- inception: FID's Inception-v3 features of 8 images of 32x32 (random weights: the same work).

Policies, by the variables they set (each cell's own, nothing else inherited):
- default: none (libgomp's own: an idle thread spins ~300,000 times, then sleeps);
- passive: OMP_WAIT_POLICY=PASSIVE (sleep at once);
- spin-Nk: GOMP_SPINCOUNT=N*1000 (spin N thousand times, then sleep);
- 1-thread: OMP_NUM_THREADS=1;
- ddpm: what ddpm itself does (`ddpm.threads`): `adapt()` between calls, as its loops call it
  between steps (fewer threads while other programs use the cores), given 5 s to settle;
- adapt+spin-10k: the same with GOMP_SPINCOUNT=10000.

Each cell is the median time per call after a warm-up, capped at --cap-s seconds a workload (a
collapsed cell is then marked with its few calls). Policies alternate within each load level,
and the whole matrix repeats --reps times; the result is the median over repetitions. Writes
benchmarks/results/threads-<date>.json and prints a Markdown table of each cell's time, its
ratio to the default policy's idle time, and the thread count it ended with ("2t").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin-10k": {"GOMP_SPINCOUNT": "10000"},
    "spin-100k": {"GOMP_SPINCOUNT": "100000"},
    "1-thread": {"OMP_NUM_THREADS": "1"},
    # ddpm's own: `ddpm.threads.adapt()` called between calls, as ddpm's loops call it between steps
    "ddpm": {"THREADS_BENCH_DDPM": "1"},
    # with the short spin of "spin-10k" (measured on 2026-12-04 as a candidate; not ddpm's choice)
    "adapt+spin-10k": {"THREADS_BENCH_DDPM": "1", "GOMP_SPINCOUNT": "10000"},
}
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME", "DDPM_THREAD_POLICY")
WORKLOADS = ("demo train", "demo sample", "cifar10 forward", "cifar10 train", "inception")


def worker(names: list[str], cap_s: float) -> None:
    """One cell's process: time each workload, print one JSON line."""
    adapt = None
    if os.environ.get("THREADS_BENCH_DDPM"):
        import ddpm.threads

        adapt = ddpm.threads.adapt
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import bench  # noqa: E402
    from ddpm.io.inception_weights import file_sha256
    from ddpm.io.inception_weights import load_inception
    from ddpm.network.inception import write_random_weights
    from ddpm.network.unet import UNet
    from ddpm.process.diffusion import GaussianDiffusion
    from ddpm.run.config import RunConfig

    def workload(preset: str, batch: int, precision: str, steps: int = 5):
        run = RunConfig.from_preset(preset)
        torch.manual_seed(0)
        base = UNet.from_config(run.model)
        args = argparse.Namespace(batch=batch, precision=precision, sample_steps=steps)
        return bench.Workload(args, torch.device("cpu"), base, GaussianDiffusion.from_config(run.diffusion))

    from ddpm.network.fast import resolve_precision

    demo_precision = resolve_precision("auto", torch.device("cpu")).value
    out = {"demo_precision": demo_precision}
    for name in names:
        if name == "demo train":
            fn, _ = workload("demo", 64, demo_precision).train("ddpm")
        elif name == "demo sample":
            fn, _ = workload("demo", 64, demo_precision).sample("ddpm")
        elif name == "cifar10 forward":
            fn, _ = workload("cifar10", 8, "fp32").forward("ddpm")
        elif name == "cifar10 train":
            fn, _ = workload("cifar10", 8, "fp32").train("ddpm")
        else:
            path = write_random_weights(Path(os.environ.get("TMPDIR", "/tmp")) / "threads-bench-inception.pth")
            net = load_inception(path, expected_sha256=file_sha256(path), device="cpu")
            x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
            fn = lambda: net(x)  # noqa: E731
        fn()  # warm-up
        settle = time.monotonic()
        while adapt is not None and time.monotonic() - settle < 5.0:  # adapt's first looks at the load
            fn()
            adapt()
        times, t_start = [], time.monotonic()
        while len(times) < 7 and (len(times) < 3 or time.monotonic() - t_start < 3.0):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
            if adapt is not None:
                adapt()
            if time.monotonic() - t_start > cap_s:
                break
        out[name] = dict(median_s=statistics.median(times), calls=len(times), threads=torch.get_num_threads())
    print(json.dumps(out), flush=True)


def cell(policy: str, names: list[str], cap_s: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(POLICIES[policy])
    if "THREADS_BENCH_DDPM" not in env:  # the other policies keep every thread: ddpm's loops do not adapt them
        env["DDPM_THREAD_POLICY"] = "off"
    r = subprocess.run([sys.executable, __file__, "--worker", ",".join(names), "--cap-s", str(cap_s)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{policy}: the worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}")
    p.add_argument("--loads", default="0,1,2", help="competing busy processes, comma-separated (default 0,1,2)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--reps", type=int, default=2, help="repetitions of the whole matrix (default 2)")
    p.add_argument("--cap-s", type=float, default=20.0, help="at most this long per workload and cell")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args.worker.split(","), args.cap_s)
        return 0
    policies, names = args.policies.split(","), args.workloads.split(",")
    loads = [int(v) for v in args.loads.split(",")]
    for x in policies:
        if x not in POLICIES:
            p.error(f"policy {x!r}: give some of {', '.join(POLICIES)}")
    for x in names:
        if x not in WORKLOADS:
            p.error(f"workload {x!r}: give some of {', '.join(WORKLOADS)}")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    results: dict = {}
    for rep in range(args.reps):
        for load in loads:
            procs = busy(load)
            try:
                time.sleep(1.0 if load else 0.0)
                order = policies[rep % len(policies):] + policies[:rep % len(policies)]
                for policy in order:
                    r = cell(policy, names, args.cap_s)
                    results.setdefault(f"{policy}|{load}", []).append(r)
                    print(f"rep {rep} load {load} {policy}: " + ", ".join(
                        f"{n} {r[n]['median_s'] * 1000:.0f} ms ({r[n]['threads']}t)" for n in names), flush=True)
            finally:
                for q in procs:
                    q.kill()
                for q in procs:
                    q.wait()
    table = {}
    for key, runs in results.items():
        policy, load = key.split("|")
        table[key] = dict(policy=policy, load=int(load),
                          **{n: statistics.median(r[n]["median_s"] for r in runs) for n in names},
                          calls={n: min(r[n]["calls"] for r in runs) for n in names},
                          threads={n: sorted({r[n]["threads"] for r in runs}) for n in names})
    base = {n: table["default|0"][n] for n in names} if "default|0" in table else None
    lines = ["| policy | load | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for load in loads:
        for policy in policies:
            row = table[f"{policy}|{load}"]
            cells = []
            for n in names:
                s = f"{row[n] * 1000:.0f} ms"
                if base:
                    s += f" ({row[n] / base[n]:.2f}x)"
                if row["calls"][n] < 3:
                    s += f" [{row['calls'][n]} calls]"
                s += f" {'/'.join(map(str, row['threads'][n]))}t"
                cells.append(s)
            lines.append(f"| {policy} | {load} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    import torch

    record = dict(command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), date=started.isoformat(timespec="seconds"),
                  machine=dict(cpu=cpu_name(), cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                               loadavg_start=load_before, loadavg_end=os.getloadavg()),
                  policies={k: POLICIES[k] for k in policies}, loads=loads, reps=args.reps, cap_s=args.cap_s,
                  table=table, runs=results, markdown=text)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"threads-{started:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"\n{started:%Y-%m-%d %H:%M} UTC, {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n\n{text}\n"
          f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
