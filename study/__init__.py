"""Studies: many runs of cfd3d jobs (methods x prompts x seeds), executed locally or on a Ray
cluster, resumable, and summarised in a report.

Use
---
A study config (``configs/study-embedded.yaml``) names its methods (each a job config file with
overrides), its prompts, seeds, metrics and executor. ``python run.py study --config
configs/study-embedded-quick.yaml`` runs one; from Python::

    from cfd.config import load_config
    from study import StudyConfig, run_study

    cfg = load_config(StudyConfig, "configs/study-embedded-quick.yaml", ["max_parallel=2"])
    summary = run_study(cfg)   # {"study_dir": ..., "runs": 8, "done": 8, "failed": 0, ...}

Every run is ``python run.py --config <method config> <overrides> <prompt key>=<prompt>
seed=<k> output_dir=<study>/runs/<method>/<prompt slug>/seed<k>``, in its own folder, with its
output in ``run.log`` there (a method's ``job_keys`` name its job's prompt, seed and output keys:
``prompt`` for ``generate`` and ``refine``; its ``scene_scale`` brings the scene it saves into
the world's frame for scoring: 1.6 for the embedded generator's box). Running the same study
again continues it: finished runs (a ``metrics.json``) are skipped, runs stopped after a
checkpoint continue with ``run.py --resume``, failed runs are retried (``retry_failed``). A failed run is recorded with its exit code and the end
of its log, and the study goes on. ``state.json`` (rewritten atomically) holds every run's status;
a driver killed even with SIGKILL loses nothing, and the runs it had started die with it.

The report (``results.csv``, ``report.md``, ``plots/``, ``report.html`` with each run's orbit
video) is written into ``<output_dir>/<name>/`` at the end of every study run, also a partial one.

Metrics
-------
``metrics`` names the fields of each run's ``metrics.json`` the report collects (a distill run of
the embedded prior reports held-out ``psnr`` and ``mask_iou`` against the shape world, and its
``wall_s``). ``scoring`` adds the study's own, computed in the driver from each finished run's
saved scene (``splats.ply``, or ``nerf.safetensors`` with its config), after the runs and before
the report (``study.scoring`` defines each one exactly):

* ``scoring.geometry``: per run, ``chamfer`` (symmetric, plain distances, world units) and
  ``f_score`` / ``precision`` / ``recall`` at ``f_score_tau`` of ``surface_points`` points on
  the run's surface against as many on its prompt's ground truth (the shape world's variant
  and turn about the up axis nearest to it, named in ``gt_variant``); embedded-testbed prompts
  only.
* ``scoring.diversity``: per method and prompt over the seeds, the ground-truth variants the
  runs reached and the mean Chamfer distance between two seeds' surfaces.
* ``scoring.clip_model``: per run, the CLIP score and CLIP R-precision (among the study's
  prompts) of ``views`` renders on an orbit.
* ``scoring.dinov2_model``: per method, the Fréchet distance between the DINOv2 features of its
  runs' renders and those of the reference set, the ground truth of every study prompt rendered
  the same way (TRELLIS's protocol).
* ``scoring.export_gpteval3d``: each run's renders in GPTEval3D's layout, in
  ``<output_dir>/<name>/gpteval3d/``.

Models load from local folders (or the Hugging Face cache) only; a missing one stops the study
before any run. A scored run is not scored again (its folder's ``study_scores.json`` holds the
scores with the settings that made them); the scores also go to ``state.json`` and the report.
Each run's peak memory (its job process's resident high-water mark, VmHWM) goes to
``results.csv``.

Executors
---------
``executor: local`` runs ``max_parallel`` subprocesses at once (default: cores //
``threads_per_run``). ``executor: ray`` submits one Ray task per run (``ray.num_cpus``,
``ray.num_gpus`` reserved per task); the task starts the run's subprocess on its node, and a task
whose worker or node died is rerun up to ``ray.max_retries`` times, resuming from the run's last
checkpoint. ``ray.address``: null starts a local Ray cluster for the study, ``auto`` joins the
cluster this machine belongs to, ``ray://<head>:10001`` goes through Ray Client. Ray, matplotlib
and scipy come with ``pip install -e ".[study]"``.

On a Slurm cluster
------------------
Every node must see the repository and the study folder at the same path (a shared file system):
the runs read the configs and write into the study folder from whichever node Ray picks. In one
batch job (``sbatch`` with, say, ``--nodes=4 --ntasks-per-node=1 --gpus-per-node=4``):

1. take the allocated hosts (``scontrol show hostnames "$SLURM_JOB_NODELIST"``); the first is the
   head;
2. on the head, through ``srun --nodes=1 --ntasks=1 -w <head>``, start
   ``ray start --head --node-ip-address=<head ip> --port=6379 --num-cpus=<cores>
   --num-gpus=<gpus> --block`` in the background, and wait a few seconds;
3. on every other node, the same way, ``ray start --address=<head ip>:6379 --num-cpus=<cores>
   --num-gpus=<gpus> --block`` in the background;
4. on the head, run the driver: ``python run.py study --config configs/study-embedded.yaml
   executor=ray ray.address=auto ray.num_gpus=1 threads_per_run=4``.

Ray then spreads the runs over the nodes, one GPU each (add ``device=cuda`` to each method's
overrides in the study's YAML so that the jobs use it; Ray sets each task's
CUDA_VISIBLE_DEVICES). If the allocation ends early, submit the same job again: the study
continues where it stopped.
"""

from .config import ExecutorKind, JobKeys, MethodConfig, RayConfig, ScoringConfig, StudyConfig


def __getattr__(name: str):
    """``study.run_study``, imported on first use: the driver brings torch, scipy and matplotlib,
    which Ray workers (they import only ``study.launch``) should not load."""
    if name == "run_study":
        from .driver import run_study

        return run_study
    raise AttributeError(f"module 'study' has no attribute '{name}'")


__all__ = ["ExecutorKind", "JobKeys", "MethodConfig", "RayConfig", "ScoringConfig", "StudyConfig",
           "run_study"]
