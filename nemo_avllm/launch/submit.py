"""`avllm launch`: build the recipe's stages from `conf/launch.yaml`, check them, and submit them
as one NeMo-Run experiment (stage 2 depends on stage 1), or print what would be submitted.

    avllm launch recipe=two_stage executor=slurm nodes=4 gpus_per_node=8 exp_dir=/lustre/avllm/runs \
        slurm.account=myacct slurm.partition=batch slurm.container_image=nvcr.io#myorg/nemo_avllm:latest \
        'slurm.container_mounts=[/lustre:/lustre]' \
        stage1.model.data.train_manifest=/lustre/data/desc.jsonl stage2.model.data.train_manifest=/lustre/data/inst.jsonl

Stage keys are the full stage configs (`stage1.*` = conf/stage1_pretrain.yaml, `stage2.*` =
conf/stage2_finetune.yaml); what differs from a stage's defaults becomes that job's overrides."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from nemo_avllm.errors import UserError

from omegaconf import DictConfig, OmegaConf

from nemo_avllm.launch import recipes
from nemo_avllm.launch.overrides import diff_overrides

log = logging.getLogger(__name__)

RECIPES = ("stage1", "stage2", "two_stage")
EXECUTORS = ("local", "slurm")
DEPENDENCY_PLACEHOLDER = "STAGE1_JOB_ID"  # shown in a dry run; sbatch --parsable's job id at submission


def stage_overrides(stage_cfg: DictConfig, stage: str) -> list[str]:
    """The overrides of `conf/<stage config>.yaml` that give `stage_cfg`: `model=<name>` for the
    conf/model config it is closest to, then every key that still differs."""
    from nemo_avllm import config

    name = recipes.STAGE_CONFIGS[stage]
    best = None
    for model in sorted(p.stem for p in (config.conf_dir() / "model").glob("*.yaml")):
        pre = [] if model == "vicuna7b" else [f"model={model}"]  # vicuna7b: the stage configs' default
        ov = pre + diff_overrides(stage_cfg, config.load(name, pre))
        if best is None or len(ov) < len(best):
            best = ov
    return best


def build_stages(cfg: DictConfig) -> list[recipes.Stage]:
    if cfg.recipe not in RECIPES:
        raise UserError(f"recipe={cfg.recipe!r}: expected one of {', '.join(RECIPES)}")
    exp_dir = os.path.abspath(str(cfg.exp_dir))
    layout = dict(nodes=int(cfg.nodes), gpus_per_node=int(cfg.gpus_per_node), exp_dir=exp_dir)
    if cfg.recipe == "stage1":
        return [recipes.stage1_pretrain(stage_overrides(cfg.stage1, "stage1"), **layout)]
    if cfg.recipe == "stage2":
        restore = OmegaConf.select(cfg, "stage2.model.restore_from", throw_on_missing=False)
        s2 = [o for o in stage_overrides(cfg.stage2, "stage2") if not o.startswith("model.restore_from=")]
        return [recipes.stage2_finetune(restore, s2, **layout)]
    return recipes.two_stage(stage_overrides(cfg.stage1, "stage1"), stage_overrides(cfg.stage2, "stage2"),
                             stage2_nodes=cfg.get("stage2_nodes"), **layout)


def check_stage(stage: recipes.Stage, world_size: int, paths: bool = True) -> DictConfig:
    """Compose the stage exactly as the job will and run training's checks (parallel sizes vs the
    process count, batch divisibility, ...) before anything is submitted. The feature cache is
    checked by the job itself (its path may exist only on the cluster); with `paths=False` (SLURM:
    paths are the container's) no input path is checked here."""
    from nemo_avllm import config
    from nemo_avllm.training.train import validate, with_overrides

    try:
        composed = config.load(stage.config_name, list(stage.overrides))
    except Exception as e:  # a typo in a key, a bad value: name the stage and its overrides
        raise UserError(f"{stage.name}: the overrides {list(stage.overrides)} do not compose "
                         f"conf/{stage.config_name}.yaml: {e}") from e
    validate(with_overrides(composed, **{"model.data.feature_cache": None}), world_size=world_size, paths=paths)
    if not composed.model.get("tokenizer"):  # the job would stop at start (stage 2 after waiting for stage 1)
        raise UserError(f"{stage.name}: model.tokenizer is not set: give the LLM's Hugging Face tokenizer folder "
                        f"({stage.name}.model.tokenizer=/path/to/vicuna-7b-v1.5)")
    return composed


# Paths a stage reads, checked on the submit host when it sees the cluster's file system.
INPUT_KEYS = ("model.tokenizer", "model.restore_from", "model.data.train_manifest", "model.data.validation_manifest",
              "model.data.index", "model.vision.checkpoint", "model.audio.checkpoint")


def host_path(path: str, mounts) -> str:
    """A container path as the host sees it, through `host:container` mounts (longest match)."""
    best = None
    for m in mounts or []:
        host, _, inside = str(m).partition(":")
        inside = (inside or host).split(":")[0]
        if path == inside or path.startswith(inside.rstrip("/") + "/"):
            if best is None or len(inside) > len(best[1]):
                best = (host, inside)
    return path if best is None else best[0] + path[len(best[1]):]


def check_cluster_paths(stage: recipes.Stage, composed: DictConfig, mounts, skip=()) -> None:
    """Every absolute input path of a SLURM stage (mapped through the container mounts) exists, where
    this host sees its top folder (a login node that mounts /lustre); other paths are left to the job."""
    for key in INPUT_KEYS:
        if key in skip:
            continue
        value = OmegaConf.select(composed, key, default=None, throw_on_missing=False)
        for v in value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]:
            if not v or not str(v).startswith("/"):
                continue
            host = Path(host_path(str(v), mounts))
            if Path("/", *host.parts[1:2]).exists() and not host.exists():
                shown = f"{v} (on this host {host})" if str(host) != str(v) else str(v)
                raise UserError(f"{stage.name}: {key}={shown} does not exist; fix the path or slurm.container_mounts")
            if key == "model.restore_from" and host.exists():  # stage 2 from a stage 1 that finished
                from nemo_avllm.training import checkpoint, restore

                restore.check_finished(checkpoint.resolve(host), composed.model)


def executors_mounts(cfg: DictConfig) -> list[str]:
    from nemo_avllm.launch import executors

    return executors.container_mounts(cfg.slurm.container_mounts, os.path.abspath(str(cfg.exp_dir)))


def make_executor(cfg: DictConfig, nodes: int, stage: recipes.Stage, composed: DictConfig):
    from nemo_avllm.launch import executors
    from nemo_avllm.training.restore import FINISHED

    if cfg.executor == "local":
        if nodes != 1:
            raise UserError(f"executor=local runs on one machine: nodes={nodes}; use executor=slurm")
        env = {k: str(v) for k, v in (cfg.local.get("env") or {}).items()}
        return executors.local_executor(int(cfg.gpus_per_node), env=env)
    s = cfg.slurm
    exp_dir = os.path.abspath(str(cfg.exp_dir))
    if s.get("host") and not os.path.isabs(str(cfg.exp_dir)):
        raise UserError(f"exp_dir={cfg.exp_dir} must be an absolute path on the cluster when slurm.host is set")
    return executors.slurm_executor(
        account=s.account, partition=s.partition, nodes=nodes, gpus_per_node=int(cfg.gpus_per_node),
        container_image=s.container_image, container_mounts=executors_mounts(cfg),
        time=s.time, job_dir=str(s.job_dir or Path(exp_dir) / "nemo_run_jobs"), host=s.host, user=s.user,
        exclusive=bool(s.exclusive), signal=s.signal, retries=int(s.retries), code=s.code,
        env={k: str(v) for k, v in (s.get("env") or {}).items()},
        cpus_per_task=executors.cpus_per_task(composed), finished=str(Path(exp_dir) / stage.run_name / FINISHED),
    )


def describe(job, executor_kind: str) -> str:
    """What a dry run would submit: the sbatch command and script (slurm) or the torchrun command."""
    info = job._dryrun_info
    if executor_kind == "slurm":
        return repr(info.request)
    role = info._app.roles[0]
    return " ".join([role.entrypoint, *role.args])


def main(cfg: DictConfig) -> int:
    if cfg.executor not in EXECUTORS:
        raise UserError(f"executor={cfg.executor!r}: expected local or slurm")
    stages = build_stages(cfg)
    stage2_nodes = cfg.get("stage2_nodes") if cfg.recipe == "two_stage" else None
    nodes_of = {"stage1": int(cfg.nodes), "stage2": int(stage2_nodes or cfg.nodes)}
    slurm = cfg.executor == "slurm"
    if slurm:
        from nemo_avllm.launch.executors import check_image

        check_image(cfg.slurm.container_image)
    composed = {}
    for st in stages:
        # SLURM: paths are the cluster's; two-stage: stage 2's checkpoint is written by stage 1
        later = cfg.recipe == "two_stage" and st.name == "stage2"
        composed[st.name] = check_stage(st, nodes_of[st.name] * int(cfg.gpus_per_node), paths=not slurm and not later)
        if slurm and not cfg.slurm.get("host"):
            mounts = executors_mounts(cfg)
            check_cluster_paths(st, composed[st.name], mounts, skip=("model.restore_from",) if later else ())
    if cfg.dryrun:  # NeMo-Run writes its records even for a dry run: keep them out of the run folders
        with tempfile.TemporaryDirectory() as tmp:
            return _experiment(cfg, stages, nodes_of, tmp, composed)
    return _experiment(cfg, stages, nodes_of, composed=composed, base_dir=str(cfg.nemo_run_dir or Path(os.path.abspath(str(cfg.exp_dir))) / "nemo_run"))


def _experiment(cfg: DictConfig, stages: list[recipes.Stage], nodes_of: dict, base_dir: str, composed: dict) -> int:
    import nemo_run as run

    slurm = cfg.executor == "slurm"
    with run.Experiment(str(cfg.experiment), base_dir=base_dir, log_level="WARN") as exp:
        previous = None
        for st in stages:
            executor = make_executor(cfg, nodes_of[st.name], st, composed[st.name])
            if cfg.dryrun and slurm and previous:
                executor.dependencies = [f"slurm://nemo_run/{DEPENDENCY_PLACEHOLDER}/master/0"]
            previous = exp.add(st.script(quote=slurm), executor=executor, name=st.name,
                               dependencies=[previous] if previous else None)
        if cfg.dryrun:
            exp.dryrun(log=False)
            for job in exp.jobs:
                after = f" (runs after {job.dependencies[0]} succeeds)" if job.dependencies else ""
                print(f"# ---- {job.id}{after} ----\n{describe(job, cfg.executor)}\n")
            if slurm and len(stages) > 1:
                print(f"# {DEPENDENCY_PLACEHOLDER} is stage 1's job id, filled in when the experiment is submitted")
            return 0
        exp.run(detach=bool(cfg.detach) and slurm)
    if slurm:  # submitted; `nemo experiment status <id>` follows the jobs
        return 0
    # local: leaving the experiment waited for every job
    states = {name: str(job["status"]) for name, job in exp.status(return_dict=True).items()}
    print(f"avllm launch: {states}")
    return 0 if all(s.startswith("SUCCEEDED") for s in states.values()) else 1
