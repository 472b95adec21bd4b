"""What Ember's statistics all-reduces cost under ZeRO-2: 2 CPU ranks (gloo), real DeepSpeed
engines, the project's GPT.

    python bench/bench_ember_comm.py                     # tiny preset, 2 ranks, 20 rounds
    python bench/bench_ember_comm.py --preset tiny --batch 8 --rounds 30 --out r.json

Runs itself under torchrun (2 ranks, 1 thread each) and builds, on the same model (same
initial weights), four ZeRO-2 engines from ds_configs/ember_zero2_fp32.json:

  adamw           the same config with DeepSpeed's AdamW instead of Ember
  ember           Ember, its all-reduces on a dedicated process group (the default)
  ember_shared    Ember with dedicated_comm=False (DeepSpeed's data-parallel group)
  ember_nocomm    Ember with the statistics all-reduce replaced by nothing: timing only
                  (the ranks' states diverge), the step without Ember's collectives

A round steps each engine once (forward, backward, step; order rotated), after a barrier. The
time of Ember's all-reduces is measured inside the step (StatComm.all_reduce, wrapped), and the
overhead of the collectives is ember - ember_nocomm, per round (paired). Per step and table
Ember sends V_local + D floats (fp32) over the partitioning group. Prints a table and writes
JSON (default bench/results/ember_comm_cpu.json).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARMS = ("adamw", "ember", "ember_shared", "ember_nocomm")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8, help="micro batch per rank")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ember_comm_cpu.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def launch(args) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--worker",
           "--preset", args.preset, "--batch", str(args.batch), "--rounds", str(args.rounds),
           "--warmup", str(args.warmup), "--out", args.out]
    if args.seq:
        cmd += ["--seq", str(args.seq)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    load0 = list(os.getloadavg())
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return proc.returncode
    res = json.loads(Path(args.out).read_text())
    res["meta"].update(loadavg_start=load0, loadavg_end=list(os.getloadavg()))
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(res["table"])
    print(f"wrote {args.out}")
    return 0


def worker(args) -> None:
    import copy
    import logging

    import torch
    import torch.distributed as dist

    import deepspeed
    import ember_ds
    from models.gpt import GPT, GPTConfig

    ember_ds.disable_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    over = {"seq_length": args.seq} if args.seq else {}
    cfg = GPTConfig.from_preset(args.preset, embedding="dense", **over)
    base_cfg = json.loads((ROOT / "ds_configs" / "ember_zero2_fp32.json").read_text())
    base_cfg.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1,
                    train_batch_size=args.batch * world)
    engines, embers = {}, {}
    for arm in ARMS:
        ds = copy.deepcopy(base_cfg)
        if arm == "adamw":
            p = ds["optimizer"]["params"]
            ds["optimizer"] = {"type": "AdamW", "params": dict(
                lr=p["body_lr"], betas=p["body_betas"], eps=p["eps"],
                weight_decay=p["body_weight_decay"])}
        elif arm == "ember_shared":
            ds["optimizer"]["params"]["dedicated_comm"] = False
        model = GPT(cfg)   # the same initial weights every time (seeded by parameter name)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds)
        engines[arm] = engine
        opt = engine.basic_optimizer
        if isinstance(opt, ember_ds.Ember):
            embers[arm] = opt

    comm_s = {arm: 0.0 for arm in embers}
    comm_calls = {arm: 0 for arm in embers}
    floats = {arm: 0 for arm in embers}
    for arm, opt in embers.items():
        inner = opt._comm.all_reduce

        def timed(buf, group, arm=arm, inner=inner):
            if arm == "ember_nocomm":
                return None
            t0 = time.perf_counter()
            inner(buf, group)
            comm_s[arm] += time.perf_counter() - t0
            comm_calls[arm] += 1
            floats[arm] += buf.numel()
        opt._comm.all_reduce = timed

    g = torch.Generator().manual_seed(1234 + rank)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_length + 1), generator=g)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step(arm):
        engine = engines[arm]
        loss = engine(inputs, labels=labels).mean()
        engine.backward(loss)
        engine.step()

    names = list(ARMS)
    times = {a: [] for a in names}
    comm_per_step = {a: [] for a in embers}
    for rnd in range(args.warmup + args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for arm in order:
            dist.barrier()
            c0 = comm_s.get(arm, 0.0)
            t0 = time.perf_counter()
            step(arm)
            dt = time.perf_counter() - t0
            if rnd >= args.warmup:
                times[arm].append(dt)
                if arm in embers:
                    comm_per_step[arm].append(comm_s[arm] - c0)
    # the slower rank's time per step (a step ends when both have finished it)
    t = torch.tensor([times[a] for a in names], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    c = torch.tensor([comm_per_step[a] for a in embers], dtype=torch.float64)
    dist.all_reduce(c, op=dist.ReduceOp.MAX)
    if rank == 0:
        times = {a: t[i].tolist() for i, a in enumerate(names)}
        comm_per_step = {a: c[i].tolist() for i, a in enumerate(embers)}
        write(args, cfg, world, times, comm_per_step, comm_calls, floats, embers)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def _q(values):
    v = sorted(values)
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return dict(median=statistics.median(v), q1=q[0], q3=q[2])


def _fmt(d, k=1) -> str:
    return f"{d['median']:.{k}f} [{d['q1']:.{k}f}, {d['q3']:.{k}f}]"


def write(args, cfg, world, times, comm_per_step, comm_calls, floats, embers) -> None:
    import torch
    n_steps = args.warmup + args.rounds
    rows = {}
    for arm, ts in times.items():
        row = dict(step_ms=_q([1e3 * x for x in ts]),
                   ratio_to_adamw=_q([x / y for x, y in zip(ts, times["adamw"])]))
        if arm in comm_per_step and arm != "ember_nocomm":
            row["allreduce_ms_per_step"] = _q([1e3 * x for x in comm_per_step[arm]])
            row["allreduce_share_of_step"] = _q([x / y for x, y in zip(comm_per_step[arm], ts)])
            row["allreduce_calls_per_step"] = comm_calls[arm] / n_steps
            row["floats_per_step"] = floats[arm] / n_steps
            row["overhead_vs_nocomm_ms"] = _q([1e3 * (x - y) for x, y in
                                               zip(ts, times["ember_nocomm"])])
        rows[arm] = row
    lines = [f"ZeRO-2, {world} ranks (gloo, CPU, 1 thread each), preset {args.preset} "
             f"(V {cfg.vocab_size}, D {cfg.hidden_size}, {cfg.num_layers} layers), micro batch "
             f"{args.batch} x {cfg.seq_length}; {args.rounds} rounds, medians [q1, q3]",
             f"{'arm':>13} {'step ms':>22} {'/ AdamW':>20} {'all-reduce ms/step':>24} "
             f"{'share':>7} {'vs nocomm ms':>22}"]
    for arm, r in rows.items():
        line = f"{arm:>13} {_fmt(r['step_ms']):>22} {_fmt(r['ratio_to_adamw'], 3):>20}"
        if "allreduce_ms_per_step" in r:
            line += (f" {_fmt(r['allreduce_ms_per_step'], 2):>24} "
                     f"{100 * r['allreduce_share_of_step']['median']:6.1f}% "
                     f"{_fmt(r['overhead_vs_nocomm_ms'], 2):>22}")
        lines.append(line)
    text = "\n".join(lines)
    meta = dict(world=world, backend="gloo", zero_stage=2, preset=args.preset,
                vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_layers,
                micro_batch=args.batch, seq=cfg.seq_length, rounds=args.rounds,
                warmup=args.warmup, torch=torch.__version__,
                time=time.strftime("%Y-%m-%dT%H:%M:%S"), tables=len(embers["ember"].token_tables),
                cpu_path=ember_ds_describe())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, arms=rows, raw_step_s=times, table=text),
                              indent=2) + "\n")


def ember_ds_describe() -> str:
    from ember_ds import cpu_fused
    return cpu_fused.describe()


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
