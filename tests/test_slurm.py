"""The SLURM batch script on a real one-node SLURM cluster (slurmctld + slurmd + munged on loopback).

launch/slurm/local_up.sh brings the cluster up (installing the Debian packages when it runs as
root with apt); without them the tests skip, saying why. The daemons are stopped by PID in the
fixture's finally, and each job's Ray processes are checked to be gone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ragdist.distributed import free_port
from tests.conftest import ROOT
from tests.test_launch import CHEAP, launch_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


class Slurm:
    def __init__(self, prefix: Path, env: dict[str, str]):
        self.prefix = prefix
        self.env = env

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )

    def sbatch(self, out_dir: Path, run_dir: Path, overrides: list[str], *flags: str) -> str:
        proc = self.run(
            "sbatch", "--parsable", "--ntasks=2", f"--output={out_dir}/slurm-%j.out",
            f"--export=ALL,RAGDIST_RUN_DIR={run_dir}", *flags,
            str(ROOT / "launch" / "slurm" / "cpu.sbatch"), *overrides,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, timeout: float, until: tuple[str, ...] = FINAL) -> dict[str, str]:
        """Poll `scontrol show job` (sbatch --wait polls far too slowly) until a state in `until`."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if time.monotonic() > deadline:
                self.run("scancel", job_id)
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s")
            time.sleep(1.0)

    def diagnose(self, out: Path) -> str:
        text = out.read_text()[-6000:] if out.is_file() else "(no job output)"
        ctld = self.prefix / "log" / "slurmctld.log"
        return f"--- job output\n{text}\n--- slurmctld.log\n" + "\n".join(ctld.read_text().splitlines()[-20:])


@pytest.fixture(scope="module")
def slurm():
    # A short prefix of its own (munge's socket path is limited) and ports of its own, so that a
    # cluster someone else runs on this machine is neither used nor disturbed.
    prefix = Path(tempfile.mkdtemp(prefix="rds-", dir="/tmp"))
    env = launch_env(RAGDIST_SLURM_PREFIX=str(prefix), RAGDIST_SLURM_PORTS=f"{free_port()} {free_port()}")
    env.pop("RAY_ADDRESS", None)
    try:
        up = subprocess.run([str(ROOT / "launch" / "slurm" / "local_up.sh")], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
        if up.returncode == 3:
            pytest.skip("no SLURM here: " + (up.stderr.strip().splitlines() or ["local_up.sh exit 3"])[-1])
        assert up.returncode == 0, up.stderr[-4000:]
        env["SLURM_CONF"] = str(prefix / "etc" / "slurm.conf")
        yield Slurm(prefix, env)
    finally:
        subprocess.run([str(ROOT / "launch" / "slurm" / "local_down.sh")], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = prefix / "run" / f"{name}.pid"
            if pid_file.is_file():
                pid = pid_file.read_text().strip()
                assert (
                    not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/comm").read_text().strip() != name
                )
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture
def index_root(tmp_path_factory) -> Path:
    """The launch tests' index root (tests/test_launch.py): whichever runs first builds it."""
    return tmp_path_factory.getbasetemp() / "launch-index"


def _no_ray_left(job_id: str) -> None:
    from ragdist.launch.ray_head import node_processes

    assert node_processes(f"/tmp/rdr-{job_id}") == []


def test_sbatch_bad_override_fails_fast_and_cleans_up(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job_id = slurm.sbatch(tmp_path, run_dir, ["+experiment=tiny", "index.num_shard=4"])
    info = slurm.wait(job_id, timeout=300)
    out = tmp_path / f"slurm-{job_id}.out"
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", slurm.diagnose(out)
    assert "num_shard" in out.read_text() and "requeueing" not in out.read_text()
    _no_ray_left(job_id)


def test_sbatch_preempted_job_requeues_and_resumes(slurm, tmp_path, index_root):
    """2 ranks via srun; SIGUSR1 mid-training → checkpoint, exit 75, `scontrol requeue`, resume, report."""
    steps = 10
    run_dir = tmp_path / "run"
    overrides = [*CHEAP, f"trainer.max_steps={steps}", f"index.root={index_root}"]
    job_id = slurm.sbatch(tmp_path, run_dir, overrides)
    out = tmp_path / f"slurm-{job_id}.out"
    # SIGUSR1 once training is under way, as `#SBATCH --signal=USR1@120` delivers it: to the
    # job's steps (the ranks), not to the batch shell.
    deadline = time.monotonic() + 420
    while not (out.is_file() and f"step 2/{steps}" in out.read_text()):
        state = slurm.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), slurm.diagnose(out)
        assert time.monotonic() < deadline, slurm.diagnose(out)
        time.sleep(0.5)
    sig = slurm.run("scancel", "--signal=USR1", job_id)
    assert sig.returncode == 0, sig.stderr
    info = slurm.wait(job_id, timeout=450)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", slurm.diagnose(out)
    assert "received SIGUSR1" in log and f"requeueing job {job_id}" in log and "(start 2)" in log
    train = json.loads((run_dir / "train_rag.json").read_text())
    assert train["steps"] == steps and train["world_size"] == 2
    assert train["resumed_from"] and "train_state/rag/step_" in train["resumed_from"]
    resumed_at = int(train["resumed_from"].rsplit("_", 1)[1])
    assert 2 <= resumed_at < steps
    assert json.loads((run_dir / "report.json").read_text())["results"]["rag"]["n"] == 8
    assert not (run_dir / "logs" / "preempted").exists()  # cleared by the second start
    _no_ray_left(job_id)
