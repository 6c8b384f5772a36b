"""The prepared device check: one command on a CUDA machine, inside 8 minutes, one summary table.

    bash benchmarks/gpu_check.sh          # on the device machine; BENCHMARKS.md has the exact call

It needs no network and no install: the project runs from `src/` on the machine's own torch, and
diffusers (for the side-by-side figures) comes from a wheel folder when one is carried
(`benchmarks/gpu_check_prepare.sh` makes it, with the CIFAR-10 JPEGs beside it). Phases, most
important first; each runs in a subprocess with its own time limit, and a phase that would not
fit in what is left of the budget is reported as skipped rather than overrunning it:

1. tests/test_cuda.py: compiled / channels-last / bf16 against eager, CUDA-graph sampling against
   eager, a SIGKILLed training run resumed against an uninterrupted one, per-image seeds.
2. training throughput, CIFAR-10 preset, batch 128, bf16: ddpm eager and compiled against
   diffusers' UNet2DModel eager, the same weights, in one process, alternating
   (benchmarks/bench.py), with peak GPU memory and a profile of one step each (diffusers compiled
   is phase 6: two compiles in one phase did not fit its limit).
3. sampling throughput: images/s at 1000 steps, batch 256, fp32 (what `ddpm sample` runs), ddpm
   against diffusers eager and compiled.
4. 300 training steps of the CIFAR-10 preset (bf16) on the CIFAR-10 JPEGs when carried (synthetic
   images otherwise) with `ddpm train`, then 256 samples with `ddpm sample`, saved as one grid.
5. sampling in bf16 (as 3.), 6. training in bf16, diffusers eager against diffusers compiled,
   7. training throughput in fp32 (all four, as 2.), 8. what classifier-free
   guidance costs (benchmarks/guidance_bench.py), and 9. FID's Inception-v3 features per second,
   ddpm against torch-fidelity's own pipeline (benchmarks/fid_bench.py speed, random weights: the
   package that carries the real ones is too large to carry), if time is left.

Model FLOP utilisation: the network's forward FLOPs per image are known (`ddpm info --preset
cifar10`: 12.44 GFLOPs at 32x32, a multiply-add counting 2); a training step costs 3x the forward.
bench.py reports TFLOP/s and their share of the GPU's dense peak (its PEAK_TFLOPS table).

Writes into --out: summary.md (the table, also printed), train-bf16.json, sample-fp32.json,
sample-bf16.json, train-bf16-diffusers-compiled.json, train-fp32.json (bench.py's records), grid.png (the 256 samples) and log.txt
(every phase's output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPLS = "ddpm-eager,ddpm-compiled,diffusers,diffusers-compiled"


class Check:
    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s, self.t0 = out, budget_s, time.monotonic()
        self.rows: list[tuple[str, str, str]] = []  # (phase, result, seconds)
        self.log = open(out / "log.txt", "a")

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def run(self, phase: str, cmd: list[str], limit_s: float, env=None) -> subprocess.CompletedProcess | None:
        """Run one phase's command with min(limit_s, what is left) seconds; None if it was skipped."""
        limit = min(limit_s, self.left())
        if limit < 30:
            self.rows.append((phase, f"skipped: {self.left():.0f} s of the budget left", "0"))
            return None
        self.log.write(f"\n===== {phase}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
        self.log.flush()
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                               timeout=limit)
        except subprocess.TimeoutExpired as e:
            self.log.write((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
            self.log.write((e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))
            self.rows.append((phase, f"timed out after {limit:.0f} s", f"{time.monotonic() - t0:.0f}"))
            return None
        self.log.write(r.stdout + r.stderr)
        self.log.flush()
        r.seconds = time.monotonic() - t0
        return r

    def add(self, phase: str, result: str, seconds: float) -> None:
        self.rows.append((phase, result, f"{seconds:.0f}"))
        print(f"{phase}: {result} ({seconds:.0f} s)", flush=True)


def _bench(check: Check, phase: str, name: str, limit_s: float, args: list[str]) -> None:
    path = check.out / f"{name}.json"
    path.unlink(missing_ok=True)  # never read an earlier check's record
    t0 = time.monotonic()
    r = check.run(phase, [sys.executable, "benchmarks/bench.py", "--device", "cuda", "--out", str(path), *args], limit_s)
    # A phase whose record was written counts even when the process then overran its limit (the
    # second H200 run's bf16 training wrote its record at 140 s and was stopped in the profiler's
    # teardown at 150 s).
    if not path.exists():
        if r is not None:
            check.add(phase, f"FAILED (exit {r.returncode}; see log.txt)", r.seconds)
        return
    seconds = r.seconds if r is not None else time.monotonic() - t0
    results = json.loads(path.read_text())["results"]
    for res in results:
        if res["task"] == "sample":
            figure = f"{res['img_per_s_1000_steps']:.1f} img/s at 1000 steps"
        else:
            figure = f"{res['steps_per_s']:.1f} steps/s, {res['img_per_s']:.0f} img/s"
        mfu = f"{100 * res['fraction_of_peak']:.0f}% MFU" if "fraction_of_peak" in res else f"{res['tflops']:.3g} TFLOP/s"
        ratio = f", {res['speedup_vs_diffusers']:.2f}x diffusers eager" if "speedup_vs_diffusers" in res else ""
        mem = f", peak {res['peak_mem_mib']:.0f} MiB" if res.get("peak_mem_mib") is not None else ""
        check.add(f"{phase}: {res['impl']}", f"{figure}, {mfu}{ratio}{mem}", seconds / len(results))


def _cifar_data(check: Check) -> tuple[str, str]:
    """The CIFAR-10 training JPEGs when carried (.data/cifar10-jpeg.tar.gz), else synthetic images."""
    tarball = ROOT / ".data" / "cifar10-jpeg.tar.gz"
    dest = Path("/tmp/ddpm-gpu-check-data")
    if tarball.exists():
        if not (dest / "cifar10-jpeg" / "train").is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(tarball) as tar:
                tar.extractall(dest, filter="data")
        return str(dest / "cifar10-jpeg" / "train"), "CIFAR-10 train JPEGs (50,000)"
    import numpy as np

    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "synthetic.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8))
    return str(path), "synthetic images (10,000; no .data/cifar10-jpeg.tar.gz carried)"


def _train_and_sample(check: Check) -> None:
    phase = "300 steps of cifar10 (bf16) + 256 samples"
    if check.left() < 90:
        check.rows.append((phase, f"skipped: {check.left():.0f} s of the budget left", "0"))
        return
    source, what = _cifar_data(check)
    run_dir, samples = Path("/tmp/ddpm-gpu-check-run"), Path("/tmp/ddpm-gpu-check-samples")
    for d in (run_dir, samples):
        shutil.rmtree(d, ignore_errors=True)
    ddpm = [sys.executable, "-m", "ddpm"]
    r = check.run(phase + ": train", [*ddpm, "train", "--preset", "cifar10", "--data", source, "--out", str(run_dir),
                                      "--steps", "300", "--no-progress", "--set", "train.precision=bf16",
                                      "--set", "train.checkpoint_every=300", "--set", "train.log_every=50"], 240)
    if r is None:
        return
    if r.returncode != 0:
        check.add(phase + ": train", f"FAILED (exit {r.returncode}; see log.txt)", r.seconds)
        return
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = logged[-1]
    steady = [rec["img_per_s"] for rec in logged[1:]] or [last["img_per_s"]]  # the first interval holds the compile
    check.add(phase + ": train", f"{what}; loss {logged[0]['loss']:.3f} at step {logged[0]['step']} -> {last['loss']:.3f} "
                                 f"at step {last['step']}; {sum(steady) / len(steady):.0f} img/s after the first "
                                 f"{logged[0]['step']} steps; {r.seconds:.0f} s in all, start and compile included",
              r.seconds)
    r = check.run(phase + ": sample", [*ddpm, "sample", "--run", str(run_dir), "--n", "256", "--batch", "256",
                                       "--out", str(samples), "--no-progress"], 180)
    if r is None:
        return
    if r.returncode != 0:
        check.add(phase + ": sample", f"FAILED (exit {r.returncode}; see log.txt)", r.seconds)
        return
    import numpy as np
    import torch

    from ddpm.io.images import make_grid, write_png

    x = np.load(samples / "samples.npz")["x"]
    write_png(make_grid(torch.from_numpy(x).permute(0, 3, 1, 2), nrow=16), check.out / "grid.png")
    check.add(phase + ": sample", f"256 samples (Algorithm 2, 1000 steps) in {r.seconds:.0f} s with the start and "
                                  f"compile: grid.png", r.seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu-check", help="where the results go (default $OUT)")
    p.add_argument("--budget-s", type=float, default=450, help="the whole check's time, in seconds (default 450)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this check is for a machine with one", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    r = check.run("tests/test_cuda.py", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s",
                                          "tests/test_cuda.py"], 150)
    if r is not None:
        tail = [line for line in r.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
        ops = [line for line in r.stdout.splitlines() if line.startswith("ops without")]
        check.add("tests/test_cuda.py", f"{'passed' if r.returncode == 0 else 'FAILED'}: {tail[0]}"
                                        f"{'; ' + ops[0] if ops else ''}", r.seconds)
    common = ["--warmup", "3", "--reps", "5", "--min-rep-s", "0.5"]
    # diffusers-compiled trains in a later phase: its compile and ddpm's (82 s) together overran 150 s
    # on the first H200 run (2026-12-04), which then reported no training figure at all.
    _bench(check, "train bf16 b128", "train-bf16", 150,
           ["--batch", "128", "--precision", "bf16", "--tasks", "train", "--impls", "ddpm-eager,ddpm-compiled,diffusers",
            "--profile", *common])
    _bench(check, "sample fp32 b256", "sample-fp32", 120,
           ["--batch", "256", "--precision", "fp32", "--tasks", "sample", "--impls", "ddpm,diffusers,diffusers-compiled",
            "--sample-steps", "20", "--profile", *common])
    _train_and_sample(check)
    _bench(check, "sample bf16 b256", "sample-bf16", 120,
           ["--batch", "256", "--precision", "bf16", "--tasks", "sample", "--impls", "ddpm,diffusers,diffusers-compiled",
            "--sample-steps", "20", *common])
    _bench(check, "train bf16 b128, compiled diffusers", "train-bf16-diffusers-compiled", 150,
           ["--batch", "128", "--precision", "bf16", "--tasks", "train", "--impls", "diffusers,diffusers-compiled",
            *common])
    _bench(check, "train fp32 b128", "train-fp32", 150,
           ["--batch", "128", "--precision", "fp32", "--tasks", "train", "--impls", IMPLS, *common])
    r = check.run("guided sampling", [sys.executable, "benchmarks/guidance_bench.py", "--device", "cuda", "--steps", "20",
                                      "--reps", "3"], 90)
    if r is not None:
        rows = [line for line in r.stdout.splitlines() if "| guided" in line]
        check.add("guided sampling (w = 3) vs unconditional, one batch", "; ".join(
            f"{c[1].strip()} B={c[2].strip()} {c[3].strip()}: {c[6].strip()}" for c in (line.split("|") for line in rows))
            if r.returncode == 0 and rows else f"FAILED (exit {r.returncode}; see log.txt)", r.seconds)

    r = check.run("inception features", [sys.executable, "benchmarks/fid_bench.py", "speed", "--device", "cuda",
                                         "--weights", "random", "--n", "512", "--batch", "128", "--work", str(out)], 90)
    if r is not None:
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        check.add("Inception-v3 features/s, fp32 (random weights: the speed of the FID network), ddpm vs torch-fidelity",
                  "; ".join(f"{x['size']}px: {x['ddpm_img_per_s']:.0f} vs {x['torch-fidelity_img_per_s']:.0f} img/s"
                            for x in rows) if r.returncode == 0 and rows else
                  f"FAILED (exit {r.returncode}; see log.txt)", r.seconds)

    total = time.monotonic() - check.t0
    lines = [f"# gpu_check: {gpu}, torch {torch.__version__}, {started}, {total:.0f} s", "",
             "| phase | result | seconds |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in check.rows]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print("\n" + text)
    return 0 if all("FAILED" not in b for _, b, _ in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
