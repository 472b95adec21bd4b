"""Fault injection against the real training script (launch/train.py in subprocesses, real
DeepSpeed engines, torchrun over gloo for the multi-rank cases), tiny model, few steps:

- kill -9 at random moments of training and at each stage of a save (seeded), the next run
  resuming through the stale run lock;
- a truncated and a bit-flipped checkpoint file (refused with --strict-resume, else set aside
  with a fall-back to the newest intact checkpoint);
- NaN losses mid-run on one rank of two; disk full while saving (a small tmpfs, where this
  machine allows mounting one); a second run on a folder in use; a rank failing with a settings
  error (repeated 2-rank runs); resuming with another model, data, DP size or ZeRO stage.

Every fault is counted in ``TALLY``; test_zz_report checks and prints the figure (faults
injected, faults survived, good checkpoints lost) and writes it to $EMBER_FAULT_REPORT when set.
A survived fault: the run stops (or goes on) as documented, the newest good checkpoint is still
there and intact, and the run that resumes reproduces the uninterrupted run's losses.
"""
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from launch import checkpoint as C
from launch import lock as L
from launch import settings as S
from test_train import MODEL as TRAIN_MODEL
from test_train import slurm_job
from test_train import tiny  # noqa: F401  (the module's prepared tiny corpus)

TRAIN = str(ROOT / "launch" / "train.py")
MODEL = [*TRAIN_MODEL, "--eval-interval", "4"]
STEPS = 16
CKPTS = ["step00000008", "step00000012", "step00000016"]
TALLY = {"injected": 0, "survived": 0, "good_checkpoints_lost": 0, "resumed_runs_equal": 0,
         "resumed_runs": 0, "by_kind": {}}


def count(kind: str, survived: bool, lost: int = 0) -> None:
    TALLY["injected"] += 1
    TALLY["survived"] += int(survived)
    TALLY["good_checkpoints_lost"] += lost
    k = TALLY["by_kind"].setdefault(kind, [0, 0])
    k[0] += 1
    k[1] += int(survived)


def args(tiny, out, save=None, *extra, config="ember_zero2_fp32.json", steps=STEPS):
    corpus, cache = tiny
    a = ["--data", str(corpus), "--cache-dir", str(cache), "--out", str(out), "--steps",
         str(steps), "--deepspeed_config", str(ROOT / "ds_configs" / config), *MODEL]
    return a + (["--save", str(save)] if save else []) + list(extra)


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("EMBER_FAULT", None)
    e.update(extra)
    return e


def train(a, nproc=1, timeout=240, launcher="torchrun", **env_extra):
    """One run of launch/train.py (plain python, or nproc ranks by torchrun or deepspeed)."""
    port = str(free_port())
    cmd = ([sys.executable, TRAIN] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", port, TRAIN] if launcher == "torchrun"
           else [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                 "--master_addr", "127.0.0.1", "--master_port", port, TRAIN])
    return subprocess.run(cmd + a, cwd=ROOT, env=env(**env_extra), capture_output=True,
                          text=True, timeout=timeout)


def train_all(runs: list[tuple[list, int, dict]]) -> list:
    return [train(a, nproc=n, **e) for a, n, e in runs]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(out) -> dict:
    """step -> train loss from metrics.csv (the whole history, across resumed runs)."""
    rows = (Path(out) / "metrics.csv").read_text().splitlines()[1:]
    got = {}
    for line in rows:
        cells = line.split(",")
        assert int(cells[0]) not in got or int(cells[0]) == 0, f"step {cells[0]} twice"
        if cells[2]:
            got[int(cells[0])] = float(cells[2])
    return got


def intact(folder: Path) -> bool:
    """Checked here with zipfile / zlib, apart from launch/checkpoint.py: every file of the
    manifest has its size, and its records' CRC-32 (torch zip files) or its pieces' CRC-32."""
    try:
        files = json.loads((folder / "manifest.json").read_text())["files"]
    except (OSError, ValueError):
        return False
    for name, (size, check) in files.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != size:
            return False
        if isinstance(check, str):
            with zipfile.ZipFile(p) as z:
                if z.testzip() is not None:
                    return False
        else:
            data = p.read_bytes()
            pieces = [data[i:i + C.PIECE] for i in range(0, max(len(data), 1), C.PIECE)]
            if [f"{zlib.crc32(x):08x}" for x in pieces] != check:
                return False
    return True


def newest_good(save: Path) -> int:
    """Step of the newest intact checkpoint in a --save folder (0: none)."""
    steps = [int(p.name[4:]) for p in save.glob("step*") if intact(p)] if save.is_dir() else []
    return max(steps, default=0)


def latest_ok(save: Path) -> bool:
    latest = save / "latest"
    return not latest.exists() or intact(save / latest.read_text().strip())


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted run: 16 steps, checkpoints at 8, 12, 16 (kept for the damage tests)."""
    d = tmp_path_factory.mktemp("fault_ref")
    ok(train(args(tiny, d / "out", d / "ckpt", "--save-interval", "4", "--keep", "3")))
    ref = losses(d / "out")
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (d / "ckpt").glob("step*")) == CKPTS
    return ref, d / "ckpt"


def test_kill_9_at_random_points_then_resume(tiny, reference, tmp_path):
    """A chain of runs on one folder, each killed with SIGKILL (at a random moment of training,
    or at a save stage via EMBER_FAULT), each next run resuming; the last one finishes. The
    whole history equals the uninterrupted run and the newest good checkpoint never regresses."""
    ref, _ = reference
    out, save = tmp_path / "out", tmp_path / "ckpt"
    a = args(tiny, out, save, "--save-interval", "1", "--resume")
    rng = random.Random(9)
    faults = [("kill:save-written", None), ("kill:save-renamed", None), ("kill:prune", None),
              ("timed", 11), ("timed", 12)]
    previous_killed = False
    for kind, seed in faults:
        before = newest_good(save)
        if kind == "timed":
            proc = subprocess.Popen([sys.executable, TRAIN, *a], cwd=ROOT, env=env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log = []
            for line in proc.stdout:            # training starts after "validation loss before"
                log.append(line)
                if "validation loss before" in line:
                    break
            time.sleep(random.Random(seed).uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            log += proc.stdout.readlines()
            proc.wait()
            text = "".join(log)
        else:
            step = before + rng.randint(2, 3)
            p = train(a, EMBER_FAULT=f"{kind}@{step}")
            text = p.stdout + p.stderr
            proc = p
            assert p.returncode == -signal.SIGKILL, text[-4000:]
        if previous_killed:                      # the killed run's lock was left behind
            assert "took over the stale lock" in text, text[-3000:]
        previous_killed = proc.returncode == -signal.SIGKILL
        if not previous_killed:                  # finished before the kill: not a fault
            continue
        after = newest_good(save)
        count(kind, latest_ok(save) and after >= before, lost=int(after < before))
    final = ok(train(a))
    assert "took over the stale lock" in final.stdout or not previous_killed
    got = losses(out)
    TALLY["resumed_runs"] += 1
    assert got == ref, (got, ref)                # every step of every resumed segment
    TALLY["resumed_runs_equal"] += 1
    assert newest_good(save) == STEPS and latest_ok(save)
    assert not list(save.glob(".tmp-*")) and not (save / L.LOCK_NAME).exists()


def _corrupt(ckpt: Path, tmp_path: Path) -> tuple[Path, str, str]:
    save = tmp_path / "ckpt"
    shutil.copytree(ckpt, save)
    trunc = save / "step00000016" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    trunc.write_bytes(trunc.read_bytes()[:1000])               # a half-written file
    flip = save / "step00000012" / "mp_rank_00_model_states.pt"
    with zipfile.ZipFile(flip) as z:                             # a bit of the weights' bytes
        rec = max(z.infolist(), key=lambda i: i.file_size)
    b = bytearray(flip.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", b, rec.header_offset + 26)
    at = rec.header_offset + 30 + name_len + extra_len + random.Random(6).randrange(rec.file_size)
    b[at] ^= 0x04                                                # one flipped bit
    flip.write_bytes(bytes(b))
    return save, f"step00000016/{trunc.name}", f"step00000012/{flip.name}"


def test_damaged_checkpoints_are_named_and_skipped(tiny, reference, tmp_path):
    ref, ckpt = reference
    save, truncated, flipped = _corrupt(ckpt, tmp_path)
    strict = train(args(tiny, tmp_path / "out", save, "--resume", "--strict-resume"))
    assert strict.returncode == 2
    assert f"{truncated}: 1000 bytes, expected" in strict.stderr and "truncated" in strict.stderr
    assert (save / "step00000016").is_dir()                     # refused: nothing moved
    # a run with nothing left to train: damaged ones set aside, latest moved to the intact one
    p = ok(train(args(tiny, tmp_path / "out8", save, "--resume", steps=8)))
    assert truncated in p.stdout and f"{flipped}: checksum mismatch in record" in p.stdout
    assert (save / "latest").read_text() == "step00000008"
    p = ok(train(args(tiny, tmp_path / "out", save, "--resume")))
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["start_step"] == 8 and s["resumed_from"].endswith("step00000008")
    TALLY["resumed_runs"] += 1
    assert losses(tmp_path / "out") == {k: ref[k] for k in range(9, STEPS + 1)}
    TALLY["resumed_runs_equal"] += 1
    assert (save / "corrupt-step00000016").is_dir() and (save / "corrupt-step00000012").is_dir()
    assert intact(save / "step00000016") and (save / "latest").read_text() == "step00000016"
    count("truncated file", True)
    count("flipped bit", True)


@pytest.mark.dist
def test_nan_mid_run_on_one_rank_stops_all_and_keeps_the_good_checkpoint(tiny, tmp_path):
    save = tmp_path / "ckpt"
    nan = ",".join(f"nan@{s}#1" for s in (5, 6, 7))              # rank 1 only
    p = train(args(tiny, tmp_path / "out", save, "--save-interval", "2", "--keep", "1",
                   "--max-skipped-steps", "2"), nproc=2, EMBER_FAULT=nan)
    text = p.stdout + p.stderr
    assert p.returncode != 0
    assert "error: training diverged: non-finite loss or gradients at steps 5-7" in text
    assert f"the newest good checkpoint is {save / 'step00000004'}" in text
    assert "not saving step 6" in text
    assert sorted(x.name for x in save.glob("step*")) == ["step00000004"]
    assert intact(save / "step00000004") and (save / "latest").read_text() == "step00000004"
    last = (tmp_path / "out" / "metrics.csv").read_text().splitlines()[-1].split(",")
    assert (last[0], last[2]) == ("7", "nan")                   # both ranks stopped at step 7
    count("NaN mid-run", True)


def test_second_run_on_a_folder_in_use_refuses(tiny, tmp_path):
    """Run A holds the folders (stopped with SIGSTOP while it holds them); run B refuses in one
    line naming A; A then finishes untouched."""
    out, save = tmp_path / "out", tmp_path / "ckpt"
    a = args(tiny, out, save, "--save-interval", "4")
    first = subprocess.Popen([sys.executable, TRAIN, *a], cwd=ROOT, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in first.stdout:
        log.append(line)
        if "validation loss before" in line:
            break
    first.send_signal(signal.SIGSTOP)
    try:
        second = train(args(tiny, out, save, "--save-interval", "4", "--seed", "7"))
    finally:
        first.send_signal(signal.SIGCONT)
    log += first.stdout.readlines()
    assert first.wait() == 0, "".join(log)[-4000:]
    assert second.returncode == 2
    err = [x for x in second.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and f"is in use by another run (pid {first.pid} on " in err[0]
    assert sorted(losses(out)) == list(range(1, STEPS + 1))     # A's history, once
    assert newest_good(save) == STEPS
    count("two runs on one folder", True)


def _tmpfs(path: Path, kib: int) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_while_saving(tiny, reference, tmp_path):
    _, ckpt = reference
    size = sum(p.stat().st_size for p in (ckpt / "step00000008").iterdir())
    extra = sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())   # scripts, tokenizer
    save = tmp_path / "small"
    if not _tmpfs(save, (int(size * 1.6) + extra) // 1024 + 8):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        p = train(args(tiny, tmp_path / "out", save, "--save-interval", "2", "--keep", "3"))
        lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        assert p.returncode == 1, p.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith(
            "error: no space left on device while writing checkpoint step00000004/"), lines
        assert (save / "latest").read_text() == "step00000002" and intact(save / "step00000002")
        assert not list(save.glob(".tmp-*"))                    # the partial save is gone
        count("disk full", True)
    finally:
        subprocess.run(["umount", str(save)], capture_output=True)


@pytest.mark.dist
def test_a_failing_rank_always_reports(tiny, tmp_path):
    """Repeated 2-rank runs: a settings error on every rank (a mistyped ds_config path; under
    SLURM's slurm.sbatch with an srun stand-in, torchrun and the deepspeed launcher), and on
    rank 1 only (while rank 0 goes on starting
    up): the message reaches the log every time, and the exit status says it failed."""
    typo = tmp_path / "ember_zer2.json"
    runs = [(["--deepspeed_config", str(typo), "--no-progress"], 2, {"launcher": launcher})
            for launcher in ("torchrun", "deepspeed")] + \
        [(args(tiny, tmp_path / "out"), 2, {"EMBER_FAULT": "config-error#1"})]
    cmd, slurm_env = slurm_job(tmp_path, ["--deepspeed_config", str(typo), "--no-progress"])
    slurm = subprocess.run(cmd, cwd=ROOT, env=slurm_env, capture_output=True, text=True,
                           timeout=240)
    assert slurm.returncode != 0
    assert f"error: ds_config not found: {typo}" in slurm.stdout + slurm.stderr, \
        (slurm.stdout + slurm.stderr)[-3000:]
    count("settings error, every rank", True)
    for i, p in enumerate(train_all(runs)):
        assert p.returncode != 0
        if i < 2:
            assert f"error: ds_config not found: {typo}" in p.stderr, p.stderr[-3000:]
            count("settings error, every rank", True)
        else:
            assert "error: injected settings error on rank 1 (EMBER_FAULT) [rank 1 of 2]" in \
                p.stderr, p.stderr[-3000:]
            count("settings error, one rank", True)


def test_resume_refusals_name_every_difference(tiny, reference, tmp_path):
    """Refused before DeepSpeed loads anything, in one line, exit status 2: another model and
    vocabulary (found before the data is prepared), other data (after). Another job shape is
    not refused: it is converted (tests/test_reshard.py)."""
    _, ckpt = reference
    other = tmp_path / "other.txt"                      # other data, same vocabulary size
    other.write_text(tiny[0].read_text()[:-2000])
    cases = [
        ("ember_zero2_fp32.json", ["--embedding", "dense", "--model", "num_layers=2",
                                   "--vocab-size", "320"], 1,
         ["embedding 'leviathan' (this run: 'dense')", "model num_layers 1 (this run: 2)",
          "vocab_size 256 (this run: 320)"]),
        ("ember_zero2_fp32.json", ["--data", str(other)], 1, ["data_digest"]),
    ]
    runs = []
    for i, (config, extra, nproc, _) in enumerate(cases):
        save = tmp_path / f"ckpt{i}"
        shutil.copytree(ckpt, save)
        runs.append((args(tiny, tmp_path / f"out{i}", save, "--resume", *extra, config=config),
                     nproc, {}))
    for i, (p, (_, _, _, wants)) in enumerate(zip(train_all(runs), cases)):
        errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        assert p.returncode != 0 and errors, p.stderr[-3000:]
        assert errors[0].startswith("error: cannot resume from ")
        for w in wants:
            assert w in errors[0], errors[0]
        assert sorted(x.name for x in (tmp_path / f"ckpt{i}").glob("step*")) == CKPTS
    # another job shape: accepted, and named for the conversion's log line
    saved = C.read_train_state(ckpt / "step00000016")
    other_shape = dict(saved, zero_stage=1, dp=2, tp=2)
    assert S.check_resume(saved, other_shape, ckpt / "step00000016") == []
    assert S.shape_changed(saved, other_shape) == ["tp 1 -> 2", "dp 1 -> 2", "zero_stage 2 -> 1"]
    assert S.shape_changed(saved, saved) == []
    assert S.check_resume(saved, dict(saved, seed=7), "x") == [
        "resuming with seed = 7 (checkpoint: 1234): the run will not match an uninterrupted one"]


def test_lock_takes_over_a_dead_holder_and_refuses_a_live_one(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    (tmp_path / L.LOCK_NAME).write_text(json.dumps(
        {"host": L.socket.gethostname(), "pid": int(dead.stdout), "time": 0}))
    notes = []
    lock = L.RunLock(tmp_path, "output", log=notes.append).acquire()
    assert notes and "took over the stale lock" in notes[0]
    holder = json.loads((tmp_path / L.LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(L.LockError, match=f"in use by another run \\(pid {os.getpid()} on "):
        L.RunLock(tmp_path, "output").acquire()
    lock.release()
    assert not (tmp_path / L.LOCK_NAME).exists()
    other = {"host": "elsewhere", "pid": 1, "time": time.time()}
    (tmp_path / L.LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(L.LockError, match="pid 1 on elsewhere"):
        L.RunLock(tmp_path, "output").acquire()
    old = time.time() - L.STALE_AFTER - 5
    os.utime(tmp_path / L.LOCK_NAME, (old, old))                # not refreshed: presumed dead
    L.RunLock(tmp_path, "output", log=notes.append).acquire().release()
    assert "pid 1 on elsewhere" in notes[-1]


def test_prune_keeps_finite_checkpoints(tmp_path):
    """--keep N counts checkpoints with finite losses; the newest finite one always stays."""
    for step, loss in ((2, 5.0), (4, 4.0), (6, float("nan")), (8, 3.9)):
        d = tmp_path / C.tag_of(step)
        d.mkdir()
        (d / C.TRAIN_STATE).write_text(json.dumps({"train_loss": loss, "val_loss": loss}))
        (d / C.MANIFEST).write_text("{}")
    C.Checkpointer(tmp_path, None, 0, 1, None, keep=2).prune(keep_tag="step00000008")
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000004", "step00000008"]


def test_zz_report():
    """The figure: faults injected, survived, good checkpoints lost (0), resumed runs equal."""
    if not TALLY["injected"]:
        pytest.skip("run with the fault tests")
    line = (f"faults injected {TALLY['injected']}, survived {TALLY['survived']}, good "
            f"checkpoints lost {TALLY['good_checkpoints_lost']}, resumed runs equal to the "
            f"uninterrupted run {TALLY['resumed_runs_equal']}/{TALLY['resumed_runs']}")
    print(f"\n[faults] {line}\n[faults] by kind: {TALLY['by_kind']}")
    if os.environ.get("EMBER_FAULT_REPORT"):
        Path(os.environ["EMBER_FAULT_REPORT"]).write_text(json.dumps(TALLY, indent=1))
    assert TALLY["good_checkpoints_lost"] == 0 and TALLY["survived"] == TALLY["injected"], line
    assert TALLY["resumed_runs_equal"] == TALLY["resumed_runs"], line
