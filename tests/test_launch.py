"""Launch paths against the real tools: deepspeed, torchrun, `ray start` + `ray job submit`, Hydra multirun.

Each run is the tiny config cut to a few steps and the RAG variant only; the launcher is what is
under test. Servers a test starts (a second Ray head) are stopped by PID in a finally.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

VENV_BIN = Path(sys.executable).parent

# A few steps, one variant, a short evaluation: enough to show the launcher ran every stage.
CHEAP = [
    "+experiment=tiny",
    "trainer.max_steps=3",
    "trainer.warmup_steps=1",
    "trainer.log_every=1",
    "trainer.variants=[rag]",
    "data.max_eval=8",
    "eval.strategies=[rag]",
    "eval.plots=false",
]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launched job: this venv's tools first (one `ninja` for DeepSpeed's ops)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", **extra)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    return env


@pytest.fixture(scope="session")
def launch_index(tmp_path_factory) -> Path:
    """One index root for every launch test in the session: the first run builds, the rest reuse."""
    return tmp_path_factory.getbasetemp() / "launch-index"


def check_run(run_dir: Path, steps: int = 3, world: int = 2) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    assert report["results"]["rag"]["n"] == 8
    train = json.loads((run_dir / "train_rag.json").read_text())
    assert train["steps"] == steps and train["world_size"] == world, train
    assert (run_dir / "checkpoints" / "rag" / "config.json").is_file()
    return report


def _tail(proc: subprocess.CompletedProcess, n: int = 6000) -> str:
    return f"--- stdout\n{proc.stdout[-n:]}\n--- stderr\n{proc.stderr[-n:]}"


# ---------------------------------------------------------------- helpers without processes


def test_slurm_hostlist_and_tasks_per_node():
    from ragdist.launch.slurm import first_host, tasks_on_node

    assert first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host("node7") == "node7"
    assert first_host("a-b[10,12]") == "a-b10"
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]


def test_slurm_env_becomes_torch_env():
    from ragdist.errors import ConfigError
    from ragdist.launch.slurm import adopt_slurm_ranks, tasks_on_node

    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_JOB_NODELIST": "n[04-07]", "SLURM_JOB_ID": "1234"}  # fmt: skip
    assert adopt_slurm_ranks(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == (
        "5",
        "8",
        "1",
        "2",
    )
    assert env["MASTER_ADDR"] == "n04" and 20000 <= int(env["MASTER_PORT"]) < 29000
    # what a batch script exported wins; a launcher's RANK means SLURM is not in charge
    env2 = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "x", "MASTER_ADDR": "10.1.2.3"}
    assert adopt_slurm_ranks(env2) and env2["MASTER_ADDR"] == "10.1.2.3"
    assert not adopt_slurm_ranks({"RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    # one task (a submitit sweep job) is a driver, not a rank
    single = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert not adopt_slurm_ranks(single) and "RANK" not in single
    with pytest.raises(ConfigError, match="SLURM_TASKS_PER_NODE"):
        tasks_on_node("2(x2", 0)


def _node_gpus(setting: str, **env: str) -> str:
    """launch/common.sh's count of the GPUs a SLURM step's Ray node offers, in a clean environment."""
    clean = {k: v for k, v in os.environ.items() if k not in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")}
    proc = subprocess.run(
        ["bash", "-c", 'source "$1/launch/common.sh" && ray_gpus "$2"', "t", str(ROOT), setting],
        env={**clean, "PYTHON": sys.executable, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_slurm_scripts_parse_and_count_the_allocations_gpus():
    for script in [*(ROOT / "launch" / "slurm").glob("*.sbatch"), *(ROOT / "launch").rglob("*.sh")]:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    assert _node_gpus("auto", SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="0,1") == "4"
    assert _node_gpus("auto", CUDA_VISIBLE_DEVICES="0,3,5") == "3"
    assert _node_gpus("auto", CUDA_VISIBLE_DEVICES="GPU-1a2b,GPU-3c4d") == "2"
    assert _node_gpus("auto", CUDA_VISIBLE_DEVICES="NoDevFiles") == "0"
    assert _node_gpus("auto") == "0"
    assert _node_gpus("0", SLURM_GPUS_ON_NODE="8") == "0"  # cpu.sbatch: never GPUs for Ray
    assert _node_gpus("2", SLURM_GPUS_ON_NODE="8") == "2"
    # gpu.sbatch hands Ray the allocation's GPUs, cpu.sbatch none (job.sh's default)
    gpu = (ROOT / "launch" / "slurm" / "gpu.sbatch").read_text()
    assert "RAGDIST_RAY_GPUS=${RAGDIST_RAY_GPUS:-auto}" in gpu
    assert "RAGDIST_RAY_GPUS" not in (ROOT / "launch" / "slurm" / "cpu.sbatch").read_text()
    assert "--num-gpus 0" not in (ROOT / "launch" / "slurm" / "job.sh").read_text()


def test_rank_refuses_to_run_without_a_shared_run_dir():
    proc = subprocess.run(
        [sys.executable, "-m", "ragdist.launch.rank", "+experiment=tiny"],
        env=dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "hydra.run.dir" in proc.stderr and "Traceback" not in proc.stderr


def test_ray_temp_dir_too_long_is_refused_before_starting_anything():
    from ragdist.errors import ConfigError
    from ragdist.launch.ray_head import start_head

    with pytest.raises(ConfigError, match="unix socket"):
        start_head("/tmp/" + "x" * 60)
    with pytest.raises(ConfigError, match="absolute"):
        start_head("relative/dir")


def test_sweep_summary_of_jobs_with_and_without_reports(tmp_path):
    """The summary reads what each job left: a report, none (failed job), or a broken one."""
    from ragdist.launch.sweep import summarize

    for num, (shards, k, f1) in enumerate([(1, 1, 0.25), (2, 1, 0.5), (1, 3, None), (2, 3, "broken")]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- index.num_shards={shards}\n- retrieval.top_k={k}\n- +experiment=tiny\n"
        )
        if f1 == "broken":
            (job / "report.json").write_text("{not json")
        elif f1 is not None:
            report = {"results": {"rag": {"em": f1 / 2, "f1": f1, "recall@1": 1.0, "n": 8, "top_k": k}},
                      "training": {"rag": {"last_loss": 3.5, "steps": 5}}}  # fmt: skip
            (job / "report.json").write_text(json.dumps(report))
    s = summarize(tmp_path, group="sweep-x")
    assert s["varying"] == ["index.num_shards", "retrieval.top_k"]
    assert s["common_overrides"] == ["+experiment=tiny"]
    assert [j["status"] for j in s["jobs"]][:3] == ["completed", "completed", "no report"]
    assert s["jobs"][3]["status"].startswith("unreadable report.json")
    assert s["best_job"] == "1" and s["metric"] == "rag/f1"
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 ★ | 2 | 1 | completed | 25.0 | 50.0 | 100.0 | 3.5 |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["wandb_group"] == "sweep-x"


# ---------------------------------------------------------------- launchers


@pytest.mark.slow
def test_deepspeed_launcher(ray_cluster, tmp_path, launch_index):
    """`deepspeed --num_gpus 2` through launch/deepspeed.sh; each rank gets (and drops) --local_rank."""
    run_dir = tmp_path / "run"

    def ds_shm_files() -> set[str]:
        return {f.name for f in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}

    before = ds_shm_files()
    proc = subprocess.run(
        [str(ROOT / "launch" / "deepspeed.sh"), *CHEAP, f"index.root={launch_index}",
         "retrieval.service_name=launch-deepspeed", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=launch_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, _tail(proc)
    assert "deepspeed --num_gpus 2" in proc.stderr and "--no_local_rank" not in proc.stderr
    check_run(run_dir)
    # rank 1 wrote to its own log, not to the console
    assert (run_dir / "logs" / "rank-1.log").stat().st_size > 0
    # the launcher's LOCAL_SIZE makes DeepSpeed map a shared-memory buffer per rank: none stays behind
    assert ds_shm_files() <= before


@pytest.mark.slow
def test_torchrun_launcher(ray_cluster, tmp_path, launch_index):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(ROOT / "launch" / "torchrun.sh"), *CHEAP, f"index.root={launch_index}",
         "retrieval.service_name=launch-torchrun", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=launch_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, _tail(proc)
    assert "torch.distributed.run --nnodes 1 --node_rank 0 --nproc_per_node 2" in proc.stderr
    check_run(run_dir)
    assert (run_dir / "logs" / "rank-1.log").is_file()


@pytest.mark.slow
def test_ray_job_submit(ray_cluster, tmp_path, launch_index):
    """A second, separate Ray head (`ray start --head` on loopback), a submitted job, status, logs, stop."""
    import ray

    from ragdist.launch.ray_head import node_processes, start_head, stop

    temp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))
    run_dir = tmp_path / "run"
    sid = f"ragdist-test-{uuid.uuid4().hex[:8]}"
    env = launch_env(RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)  # the session's cluster is not the one under test
    ray_bin = str(VENV_BIN / "ray")
    try:
        head = start_head(temp, num_cpus=2)
        assert head.dashboard.startswith("http://127.0.0.1:") and head.address != ray_cluster
        # launch/ray_submit.sh runs `ray job submit --address URL --working-dir REPO -- python -m
        # ragdist.launch.ray_job ...` and waits for the job, as a user would
        submit = subprocess.run(
            [str(ROOT / "launch" / "ray_submit.sh"), "--cpus-per-worker", "0.5",
             *CHEAP, f"index.root={launch_index}", f"hydra.run.dir={run_dir}"],
            cwd=ROOT, env=dict(env, RAY_DASHBOARD_ADDRESS=head.dashboard, SUBMISSION_ID=sid),
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert submit.returncode == 0, _tail(submit)
        assert (
            f"ray job submit --address {head.dashboard} --submission-id {sid} --working-dir {ROOT}"
            in submit.stderr
        )
        status = subprocess.run([ray_bin, "job", "status", "--address", head.dashboard, sid],
                                env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0 and f"Job '{sid}' succeeded" in status.stdout, _tail(status)
        logs = subprocess.run([ray_bin, "job", "logs", "--address", head.dashboard, sid],
                              env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert "Ray Train workers" in logs.stdout and f"report: {run_dir}" in logs.stdout, _tail(logs)
        check_run(run_dir)
    finally:
        stop(temp)
        leftover = node_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert leftover == []
    # stopping that head by PID left the session's cluster alone
    assert ray.is_initialized() and ray.get(ray.put(7)) == 7


@pytest.mark.slow
def test_hydra_sweep_2x2(ray_cluster, tmp_path, launch_index):
    """`ragdist-train -m` over index.num_shards × retrieval.top_k: four jobs, one wandb group, one summary."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["ragdist-train", "-m", "+experiment=sweep_tiny", f"index.root={launch_index}",
         "trainer.nproc=1", "trainer.max_steps=2", "eval.strategies=[rag]", "eval.plots=false", "logger=wandb",
         "retrieval.service_name=sweep-${hydra:job.num}", f"hydra.sweep.dir={sweep}"],
        env={"RAY_ADDRESS": ray_cluster, "PATH": os.pathsep.join([str(VENV_BIN), os.environ["PATH"]])},
    )  # fmt: skip
    assert proc.returncode == 0, _tail(proc)
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["varying"] == ["index.num_shards", "retrieval.top_k"]
    jobs = summary["jobs"]
    assert [j["status"] for j in jobs] == ["completed"] * 4, jobs
    grid = {
        tuple(o.split("=")[1] for o in j["overrides"] if o.startswith(("index.num", "retrieval.top")))
        for j in jobs
    }
    assert grid == {("1", "1"), ("1", "3"), ("2", "1"), ("2", "3")}
    for j in jobs:
        report = json.loads((Path(j["dir"]) / "report.json").read_text())
        assert j["metrics"]["rag/f1"] == report["results"]["rag"]["f1"]
        # each job served its own snapshot with its own number of shards
        shards = next(o for o in j["overrides"] if o.startswith("index.num_shards=")).split("=")[1]
        manifest = json.loads((Path(report["index_snapshot"]) / "manifest.json").read_text())
        assert str(manifest["num_shards"]) == shards
    # every job's wandb run (offline) belongs to the sweep's one group
    group = summary["wandb_group"]
    assert group.startswith("sweep-")
    runs = sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) >= 4 and all(group.encode() in r.read_bytes() for r in runs), runs
    assert "| job | index.num_shards | retrieval.top_k | status |" in (sweep / "summary.md").read_text()
    assert "sweep summary:" in proc.stdout
