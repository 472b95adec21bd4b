"""What the zero-code hook (``ember_ds-autoload.pth``, ember_ds/_autoload.py) costs.

Start-up of a Python process that never imports deepspeed, with and without the hook, in two
pairs of throwaway venvs on the same base interpreter, identical except that one of each pair
holds the .pth (the exact line ``pip install`` writes):
  bare      ``venv --without-pip``: no other .pth file, the worst case (the hook's line is the
            first thing the process compiles)
  standard  ``venv`` with pip and setuptools (setuptools' distutils-precedence.pth), as most
            environments are
For each: ``python -c pass``
  instructions  user-space instructions counted by valgrind (callgrind), PYTHONHASHSEED=0: one
                deterministic number each, blind to the machine's load (skipped without valgrind)
  cpu_ms        user + system CPU time of the process (os.wait4)
  wall_ms       wall-clock time
  site_us       ``-X importtime``: the cumulative time of ``import site``, which includes
                processing every .pth file
timed in interleaved pairs, order alternating, so load from other processes hits both alike;
differences are reported as mean with a 95% interval over the pairs.
In-process, on the bench's own interpreter (warm, so lower than a process's first compile):
  pth_exec_us   compiling and running the .pth line (what ``site`` does with it)
  miss_ns       one call of the finder for a module that is not deepspeed
And the one-off cost in a process that does import deepspeed (this project's venv, where the
hook is installed): ``python -c "import deepspeed"`` with the hook against
EMBER_DS_NO_AUTOLOAD=1 (the difference is importing ember_ds, which registers Ember).

    python bench/bench_autoload.py                          # 200 pairs, 6 deepspeed pairs
    python bench/bench_autoload.py --pairs 400 --ds-pairs 10 --out bench/results/autoload_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOK = runpy.run_path(str(ROOT / "ember_ds" / "_autoload.py"), run_name="bench")


def make_venv(path: Path, with_hook: bool, with_pip: bool) -> Path:
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(path)],
                   check=True, capture_output=True)
    py = path / "bin" / "python"
    sp = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                        capture_output=True, text=True, check=True).stdout.strip()
    if with_hook:
        Path(sp, HOOK["PTH_NAME"]).write_text(HOOK["pth_line"]())
    return py


def run_once(cmd, env=None):
    """(wall seconds, user + system CPU seconds) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        raise RuntimeError(f"{cmd} failed ({status})")
    return wall, ru.ru_utime + ru.ru_stime


def site_us(py) -> float:
    err = subprocess.run([str(py), "-X", "importtime", "-c", "pass"], capture_output=True,
                         text=True, check=True).stderr
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+site$", line)
        if m:
            return float(m.group(1))
    raise RuntimeError("no 'site' line in -X importtime output")


def instructions(py):
    if shutil.which("valgrind") is None:
        return None
    err = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          str(py), "-c", "pass"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONHASHSEED="0")).stderr
    m = re.search(r"Collected : (\d+)", err)
    return int(m.group(1)) if m else None


def paired(fn, a, b, n):
    """n interleaved pairs (order alternating); returns (results for a, results for b)."""
    va, vb = [], []
    for i in range(n):
        if i % 2:
            vb.append(fn(b)), va.append(fn(a))
        else:
            va.append(fn(a)), vb.append(fn(b))
    return va, vb


def summary(without, with_, scale, unit):
    diffs = [(y - x) * scale for x, y in zip(without, with_)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    sem = statistics.stdev(diffs) / n ** 0.5 if n > 1 else float("nan")
    return {"unit": unit, "n": n,
            "without_median": statistics.median(without) * scale,
            "with_median": statistics.median(with_) * scale,
            "diff_mean": mean, "diff_median": statistics.median(diffs),
            "diff_ci95": [mean - 1.96 * sem, mean + 1.96 * sem],
            "rel_diff_mean": mean / (statistics.fmean(without) * scale)}


def startup(without, with_, pairs):
    res = {}
    ia, ib = instructions(without), instructions(with_)
    if ia and ib:
        res["instructions"] = {"without": ia, "with": ib, "diff": ib - ia,
                               "rel_diff": (ib - ia) / ia}
    for py in (without, with_):   # warm the OS caches
        run_once([str(py), "-c", "pass"])
    a, b = paired(lambda py: run_once([str(py), "-c", "pass"]), without, with_, pairs)
    res["wall_ms"] = summary([x[0] for x in a], [x[0] for x in b], 1e3, "ms")
    res["cpu_ms"] = summary([x[1] for x in a], [x[1] for x in b], 1e3, "ms")
    a, b = paired(site_us, without, with_, pairs)
    res["site_us"] = summary(a, b, 1.0, "us")
    return res


def in_process():
    line = HOOK["pth_line"]()

    def run_line():
        exec(line, {})
        sys.meta_path[:] = [f for f in sys.meta_path if not hasattr(f, "ember_ds_hook")]

    reps = [timeit.timeit(run_line, number=200) / 200 for _ in range(15)]
    exec(line, {})
    hook = sys.meta_path[0]
    miss = [timeit.timeit(lambda: hook.find_spec("json", None), number=200000) / 200000
            for _ in range(9)]
    sys.meta_path.remove(hook)
    return {"pth_exec_us": {"min": min(reps) * 1e6, "median": statistics.median(reps) * 1e6},
            "miss_ns": {"min": min(miss) * 1e9, "median": statistics.median(miss) * 1e9},
            "pth_bytes": len(line)}


def deepspeed_import(pairs):
    py = ROOT / ".venv" / "bin" / "python"
    if not py.exists():
        py = Path(sys.executable)
    env_on = {k: v for k, v in os.environ.items() if k != HOOK["OFF_VAR"]}
    env_off = dict(env_on, **{HOOK["OFF_VAR"]: "1"})
    out = subprocess.run([str(py), "-c", "import deepspeed, sys; print('ember_ds' in sys.modules)"],
                         env=env_on, capture_output=True, text=True, check=True).stdout
    if out.split()[-1:] != ["True"]:
        return {"skipped": f"the hook is not active in {py} (ember_ds not imported by deepspeed)"}
    cmd = [str(py), "-c", "import deepspeed"]
    on, off = paired(lambda env: run_once(cmd, env), env_on, env_off, pairs)
    return {"wall_ms": summary([x[0] for x in off], [x[0] for x in on], 1e3, "ms"),
            "cpu_ms": summary([x[1] for x in off], [x[1] for x in on], 1e3, "ms")}


def fmt(s):
    lo, hi = s["diff_ci95"]
    return (f"{s['without_median']:9.2f} {s['with_median']:9.2f} {s['diff_mean']:+9.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] {s['unit']:>2} {100 * s['rel_diff_mean']:+6.2f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--ds-pairs", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "autoload_cpu.json"))
    args = ap.parse_args()
    res = {"python": sys.version.split()[0], "machine": platform.machine(),
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
           "loadavg_start": os.getloadavg(), "pairs": args.pairs}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, pip in (("bare", False), ("standard", True)):
            without = make_venv(Path(tmp, kind + "_without"), False, pip)
            with_ = make_venv(Path(tmp, kind + "_with"), True, pip)
            res[kind] = startup(without, with_, args.pairs)
    res.update(in_process())
    res["deepspeed_import"] = deepspeed_import(args.ds_pairs) if args.ds_pairs else {}
    res["loadavg_end"] = os.getloadavg()

    print(f"python -c pass, {args.pairs} interleaved pairs; load average "
          f"{res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f} on {res['cpus']} CPUs")
    print(f"{'venv':9} {'measure':8} {'without':>9} {'with':>9} {'diff: mean [95% CI]':>30} "
          f"{'rel':>7}")
    for kind in ("bare", "standard"):
        r = res[kind]
        if "instructions" in r:
            i = r["instructions"]
            print(f"{kind:9} {'instr':8} {i['without'] / 1e6:8.2f}M {i['with'] / 1e6:8.2f}M "
                  f"{i['diff'] / 1e6:+9.3f}M {'(valgrind, exact)':>21} "
                  f"{100 * i['rel_diff']:+6.2f}%")
        for m in ("cpu_ms", "wall_ms", "site_us"):
            print(f"{kind:9} {m:8} {fmt(r[m])}")
    ds = res["deepspeed_import"]
    if "skipped" in ds:
        print("import deepspeed:", ds["skipped"])
    elif ds:
        for m in ("cpu_ms", "wall_ms"):
            print(f"{'deepspeed':9} {m:8} {fmt(ds[m])}   (python -c 'import deepspeed': hook on "
                  f"vs {HOOK['OFF_VAR']}=1)")
    print(f"in-process (warm): .pth line {res['pth_exec_us']['min']:.0f} us (min; median "
          f"{res['pth_exec_us']['median']:.0f}), finder call for another module "
          f"{res['miss_ns']['min']:.0f} ns (min), .pth {res['pth_bytes']} bytes")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
