"""launch/multinode: the pre-flight check (check.sh), the deepspeed launcher over real ssh + pdsh,
and slurm.sbatch's resources on a CPU and a GPU partition.

- ssh: a real OpenSSH server (Debian's openssh-server) started by the test on 127.0.0.1 with its
  own host key, client key and known_hosts file (the client reads them through an ``ssh``
  wrapper in PATH that adds ``-F <test ssh_config>``, as a user's ~/.ssh/config would). Where
  sshd or pdsh is not installed those tests are skipped (``apt-get install openssh-server pdsh``
  enables them); the checks that need no server (unreachable hosts, a bad hostfile) always run.
- slurm.sbatch: stand-ins for srun / scontrol that record what srun was asked to start (the
  two-node training run under the same stand-ins is tests/test_train.py's
  ``test_two_nodes_match_one_node[slurm]``).
"""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from launch import data as D

CHECK = ["bash", str(ROOT / "launch" / "multinode" / "check.sh")]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def run(cmd, timeout=120, **env):
    e = dict(os.environ, **env)
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def problems(proc):
    return [line for line in proc.stdout.splitlines()
            if line.startswith("check: ") and "problem(s)" not in line and "OK (" not in line]


# ------------------------------------------------------------------------------------------
# without a server: unreachable hosts and a bad hostfile are reported per host

def test_check_reports_unreachable_hosts_and_bad_hostfile(tmp_path):
    port = free_port()                       # nothing listens there
    hosts = random.sample(["127.0.0.1", "localhost"], 2)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"# comment\n{hosts[0]} slots=2\n\n{hosts[1]} slots=1  # second\n"
                        "node-x slots=two\n")
    proc = run([*CHECK, "--ssh-port", str(port), str(hostfile)])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = problems(proc)
    assert lines[0] == f'check: {hostfile}:5: expected "<host> slots=<n>", got "node-x slots=two"'
    assert [line.split(":")[1].strip() for line in lines[1:]] == hosts     # hostfile order
    assert all("cannot ssh to it" in line and "Connection refused" in line for line in lines[1:])
    assert proc.stdout.splitlines()[-1] == f"check: 3 problem(s); 2 host(s) in {hostfile}"
    missing = run([*CHECK, str(tmp_path / "nope")])
    assert missing.returncode == 2 and "hostfile not found" in missing.stdout
    assert run([*CHECK, "--bogus", str(hostfile)]).returncode == 2


# ------------------------------------------------------------------------------------------
# a real sshd on 127.0.0.1

@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("no OpenSSH server here (apt-get install openssh-server pdsh enables this)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True)
    shutil.copy(d / "id.pub", d / "authorized_keys")
    (d / "authorized_keys").chmod(0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"PidFile {d / 'sshd.pid'}\n")
    # the user's side: key, known_hosts (empty: no host is known yet), an ssh that reads them
    (d / "ssh_config").write_text(f"Host *\n  IdentityFile {d / 'id'}\n  IdentitiesOnly yes\n"
                                  f"  UserKnownHostsFile {d / 'known_hosts'}\n")
    (d / "known_hosts").write_text("")
    (d / "bin").mkdir()
    (d / "bin" / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {d / "ssh_config"} "$@"\n')
    (d / "bin" / "ssh").chmod(0o755)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)       # sshd's privilege-separation folder
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "w"))
    for _ in range(100):
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    if proc.poll() is not None:
        pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
    hostfile = d / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    env = {"PATH": f"{d / 'bin'}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}"
                   f"{os.environ['PATH']}"}
    yield dict(dir=d, port=port, hostfile=hostfile, env=env)
    proc.terminate()
    proc.wait(timeout=30)


def apply_fix(line, known_hosts):
    """Run the ``fix: ...`` command of a check line, with the test's known_hosts file."""
    fix = line.split("(fix: ", 1)[1].rstrip(")")
    assert fix.endswith(">> ~/.ssh/known_hosts"), line
    subprocess.run(["bash", "-c", fix.replace("~/.ssh/known_hosts", str(known_hosts))], check=True,
                   capture_output=True, env=dict(os.environ))


def test_check_over_real_ssh(sshd, tmp_path):
    """Unknown host keys are named with the exact ssh-keyscan fix, which works; then the repository,
    .venv, shared folders, data and interface are checked on every host."""
    env, hostfile, port = sshd["env"], str(sshd["hostfile"]), str(sshd["port"])
    known = sshd["dir"] / "known_hosts"
    known.write_text("")
    first = run([*CHECK, "--ssh-only", "--ssh-port", port, hostfile], **env)
    lines = problems(first)
    assert first.returncode == 1 and len(lines) == 2, first.stdout + first.stderr
    for line, host in zip(lines, ["127.0.0.1", "localhost"]):
        assert line.startswith(f"check: {host}: ssh host key not in ~/.ssh/known_hosts")
        assert f"fix: ssh-keyscan -p {port} -H {host} >> ~/.ssh/known_hosts" in line
    apply_fix(lines[0], known)                                    # fix one host only
    second = problems(run([*CHECK, "--ssh-only", "--ssh-port", port, hostfile], **env))
    assert second == [lines[1]]
    apply_fix(lines[1], known)

    save, cache = tmp_path / f"save{random.randrange(10**6)}", tmp_path / "cache"
    data = tmp_path / "texts.txt"
    data.write_text("one\n\ntwo\n")
    full = [*CHECK, "--ssh-port", port, "--save", str(save), "--cache", str(cache),
            "--data", str(data), "--net-if", "lo", hostfile]
    ok = run(full, **env)
    assert ok.returncode == 0 and problems(ok) == [], ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith("check: 2 host(s) OK (ssh, repository, .venv, shared folders, "
                                      "interface lo)")
    assert save.is_dir() and not list(save.iterdir())             # its marker is cleaned up
    bad = run([*CHECK, "--ssh-port", port, "--data", str(tmp_path / "nope"), "--net-if",
               "nosuch0", hostfile], **env, MASTER_ADDR="master.invalid")
    assert bad.returncode == 1
    for host in ("127.0.0.1", "localhost"):
        assert f"check: {host}: data path {tmp_path / 'nope'} not found" in bad.stdout
        assert f"check: {host}: network interface nosuch0 not found" in bad.stdout
        assert f"check: {host}: MASTER_ADDR master.invalid does not resolve here" in bad.stdout
    # a key the server does not accept: passwordless login is not set up
    keys = sshd["dir"] / "authorized_keys"
    saved = keys.read_text()
    keys.write_text("")
    try:
        denied = run([*CHECK, "--ssh-only", "--ssh-port", port, hostfile], **env)
    finally:
        keys.write_text(saved)
    lines = problems(denied)
    assert denied.returncode == 1 and len(lines) == 2, denied.stdout
    for line, host in zip(lines, ("127.0.0.1", "localhost")):
        assert line == (f"check: {host}: ssh needs a password or key it does not have: "
                        f"passwordless ssh is not set up (fix: ssh-copy-id -p {port} {host})")

    # a repository whose path holds no project, then no .venv, then a .venv without the packages
    fake = tmp_path / "elsewhere"
    (fake / "launch" / "multinode").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "multinode" / "check.sh", fake / "launch" / "multinode")
    fake_check = ["bash", str(fake / "launch" / "multinode" / "check.sh"), "--ssh-port", port,
                  hostfile]
    out = run(fake_check, **env).stdout
    assert f"check: localhost: repository not found at {fake}" in out
    (fake / "launch" / "train.py").write_text("")
    out = run(fake_check, **env).stdout
    assert f"check: 127.0.0.1: no virtual environment at {fake}/.venv" in out
    (fake / ".venv" / "bin").mkdir(parents=True)
    base = getattr(sys, "_base_executable", None) or shutil.which("python3")
    os.symlink(os.path.realpath(base), fake / ".venv" / "bin" / "python")
    out = run(fake_check, **env).stdout
    assert "check: localhost: the .venv python cannot import torch, deepspeed, megatron.core" in out


LEVIATHAN = json.dumps({"seed_dim": 16, "modes": 8, "heads": 2, "knots": 4}, separators=(",", ":"))
MODEL = ["--vocab-size", "256", "--model", "hidden_size=32", "--model", "num_layers=1",
         "--model", "num_heads=2", "--model", "ffn_hidden_size=64", "--model", "seq_length=32",
         "--model", f"leviathan={LEVIATHAN}", "--eval-samples", "8",
         "--ds", "train_micro_batch_size_per_gpu=4", "--no-progress",
         "--deepspeed_config", str(ROOT / "ds_configs" / "ember_zero2_fp32.json")]


def test_deepspeed_hostfile_over_ssh_and_pdsh(sshd, tmp_path):
    """deepspeed_hostfile.sh on two "hosts" (127.0.0.1, localhost) through real ssh + pdsh: it
    stops before launching when a host key is unknown; launcher flags pass before "--" (an
    --exclude'd host is not checked); the
    user's ~/.deepspeed_env reaches the ranks; the JSON --model value survives the remote shell;
    the losses equal one node's 2-rank torchrun run."""
    if not shutil.which("pdsh"):
        pytest.skip("pdsh is not installed (apt-get install pdsh enables this)")
    env, port = sshd["env"], str(sshd["port"])
    known = sshd["dir"] / "known_hosts"
    known.write_text("")
    subprocess.run(["bash", "-c", f"ssh-keyscan -p {port} -H 127.0.0.1 >> {known}"], check=True,
                   capture_output=True)
    corpus = tmp_path / "tiny.txt"
    docs = list(D.iter_file_documents(D.DEFAULT_CORPUS))
    start = random.randrange(len(docs) - 60)
    corpus.write_text("\n\n".join(docs[start:start + 40]) + "\n")
    cache = tmp_path / "cache"
    D.prepare_data([corpus], cache, D.DataSettings(vocab_size=256), log=lambda m: None)
    home = tmp_path / "home"
    home.mkdir()
    # the user's own file: the cache folder comes from here only (no --cache-dir below)
    (home / ".deepspeed_env").write_text(f"# my settings\n\nEMBER_DATA_CACHE={cache}\n")
    out = tmp_path / "ds"
    hostfile = tmp_path / "hostfile"          # a third host, down, left out with --exclude
    hostfile.write_text(sshd["hostfile"].read_text() + "node-gone.invalid slots=1\n")
    cmd = ["bash", "launch/multinode/deepspeed_hostfile.sh", "--ssh_port", port,
           "--exclude", "node-gone.invalid", "--master_port", str(free_port()), "--",
           "--data", str(corpus), "--out", str(out), "--steps", "2", *MODEL]
    denv = dict(env, HOME=str(home), HOSTFILE=str(hostfile), EMBER_NO_SETUP="1",
                OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    denv.pop("EMBER_DATA_CACHE", None)
    stopped = run(cmd, **denv)
    assert stopped.returncode == 2 and not out.exists(), stopped.stdout + stopped.stderr
    assert f"check: localhost: ssh host key not in ~/.ssh/known_hosts" in stopped.stderr
    assert f"ssh-keyscan -p {port} -H localhost >> ~/.ssh/known_hosts" in stopped.stderr
    subprocess.run(["bash", "-c", f"ssh-keyscan -p {port} -H localhost >> {known}"], check=True,
                   capture_output=True)
    proc = run(cmd, timeout=300, **denv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    env_file = (ROOT / "runs" / ".deepspeed_env").read_text().splitlines()
    assert env_file[0] == f"EMBER_DATA_CACHE={cache}" and "OMP_NUM_THREADS=1" in env_file
    s = json.loads((out / "summary.json").read_text())
    assert s["world"] == 2 and Path(s["data"]).parent == cache

    ref_out = tmp_path / "ref"
    ref = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(ROOT / "launch" / "train.py"), "--data", str(corpus), "--cache-dir",
               str(cache), "--out", str(ref_out), "--steps", "2", *MODEL], timeout=300,
              OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    assert ref.returncode == 0, ref.stderr[-5000:]
    r = json.loads((ref_out / "summary.json").read_text())
    assert s["train_losses"] == pytest.approx(r["train_losses"], rel=1e-6)
    assert s["val_loss_after"] == pytest.approx(r["val_loss_after"], rel=1e-6)


# ------------------------------------------------------------------------------------------
# slurm.sbatch: the same file on a CPU and a GPU partition

SRUN_RECORDER = """#!/usr/bin/env bash
# stand-in for srun: records its options and the environment the ranks would get
{ echo "NPROC_PER_NODE=$NPROC_PER_NODE OMP_NUM_THREADS=$OMP_NUM_THREADS"
  echo "MASTER=$MASTER_ADDR:$MASTER_PORT NNODES=$NNODES"; echo "ARGS $*"; } > "$SRUN_RECORD"
"""


@pytest.mark.parametrize("partition", ["cpu", "gpu", "gpu_per_node", "srun_mode"])
def test_slurm_resources_come_from_sbatch(partition, tmp_path):
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text(SRUN_RECORDER)
    (stub / "scontrol").write_text("#!/usr/bin/env bash\necho node-07\nsleep 0.3\necho node-08\n")
    for f in stub.iterdir():
        f.chmod(0o755)
    cpus, gpus, nodes = random.randint(2, 64), random.randint(1, 8), random.randint(1, 4)
    env = {k: v for k, v in os.environ.items() if k not in (
        "NPROC_PER_NODE", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", "MODE") and
        not k.startswith("SLURM_")}
    env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NODELIST="node-[07-08]",
               SLURM_NNODES=str(nodes), SLURM_CPUS_PER_TASK=str(cpus), EMBER_NO_SETUP="1",
               SRUN_RECORD=str(tmp_path / "record"), PATH=f"{stub}{os.pathsep}{os.environ['PATH']}")
    if partition == "gpu":
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    elif partition == "gpu_per_node":
        env["SLURM_GPUS_PER_NODE"] = f"h100:{gpus}"
    elif partition == "srun_mode":
        env["MODE"] = "srun"
    proc = subprocess.run(["bash", "launch/multinode/slurm.sbatch", "--steps", "3"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rec = (tmp_path / "record").read_text()
    assert f"--cpus-per-task={cpus}" in rec and "MASTER=node-07:29500" in rec
    if partition == "cpu":
        assert f"NPROC_PER_NODE=1 OMP_NUM_THREADS={cpus}" in rec
        assert f"--nodes={nodes} --ntasks={nodes} --ntasks-per-node=1" in rec
    elif partition == "srun_mode":
        assert f"OMP_NUM_THREADS={cpus}" in rec and "--ntasks-per-node=1" not in rec
        assert "exec python launch/train.py" in rec
    else:
        # GPU nodes: one rank per GPU, the task's CPUs shared by its ranks
        assert f"NPROC_PER_NODE={gpus} OMP_NUM_THREADS={max(1, cpus // gpus)}" in rec
        assert "torch.distributed.run" in rec
    assert rec.rstrip().endswith("_ --steps 3")
    # the header asks for nodes only: no GPUs, CPU count or time limit a partition may refuse
    header = [line for line in (ROOT / "launch/multinode/slurm.sbatch").read_text().splitlines()
              if line.startswith("#SBATCH")]
    assert not [h for h in header if any(k in h for k in ("gpus", "gres", "cpus", "time", "mem"))]


# ------------------------------------------------------------------------------------------
# [launcher flags] -- [train.py flags] in the scripts run on every node

@pytest.mark.parametrize("script", ["torchrun_multinode.sh", "deepspeed_no_ssh.sh"])
def test_launcher_flags_before_the_double_dash(script, tmp_path):
    """A launcher flag with a visible effect (torchrun --log-dir, DeepSpeed
    --enable_each_rank_log: the launcher writes the ranks' logs there) goes to the launcher, the
    flags after "--" to train.py (its settings error comes back)."""
    logs = tmp_path / f"logs{random.randrange(1000)}"
    flag = ["--log-dir", str(logs)] if script.startswith("torchrun") else \
        ["--enable_each_rank_log", str(logs)]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\n")
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NNODES="1", NODE_RANK="0",
               NPROC_PER_NODE="1", HOSTFILE=str(hostfile), EMBER_NO_SETUP="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ["bash", f"launch/multinode/{script}"]
    split = run([*cmd, *flag, "--", "--preset", "nosuch"], **env)
    assert split.returncode != 0
    assert "unknown preset 'nosuch'" in split.stdout + split.stderr + "".join(
        f.read_text() for f in logs.rglob("*") if f.is_file())
    assert logs.is_dir()              # made by the launcher, from the flag before "--"
    # (without "--" every flag goes to train.py: tests/test_train.py's two-node runs)
