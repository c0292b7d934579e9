"""Running ragdist under the launchers users already have.

    ragdist.launch.rank      one training rank under deepspeed / torchrun / srun (rank-0 console, SLURM env)
    ragdist.launch.ray_job   the entry point of `ray job submit`: service + Ray Train ranks + evaluation
    ragdist.launch.ray_head  start, join and stop (by PID) a Ray head or worker with its own temp dir
    ragdist.launch.slurm     SLURM variables → torch's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    ragdist.launch.sweep     the Hydra callback that gives a multirun one wandb group and a summary table

The shell side (deepspeed.sh, torchrun.sh, ray_submit.sh, slurm/*.sbatch) lives in launch/ at the repo root.
"""
