"""Multi-loop QPO (paper Algorithm 1): the run is the ordered list of its stages
(`qpo_ray.run.stages.plan`), each run by its own module:

    step0      score the prompt collection on collection-set queries -> rewards (+ scale)
    filter     expert filter -> D_0, the training set of loop 1
    train_1    pi_1 = ORL(pi_0, D_0)
    augment_t  sample queries, P_t = pi_t(q) at the target reward, score, reward on the
               stored Step-0 scale; D_t = D_{t-1} + filter(D_A)         (t = 1 .. T-1)
    train_t+1  pi_{t+1} = ORL(pi_t, D_t), continuing from pi_t's checkpoint
    test       policy vs baselines -> report

The loop builds the run context once (config, task and splits, scorer, tracker, run
directory) and hands it to each stage's `run`, then to its `log` (MLflow): one list,
one dispatch. Every stage writes into the run directory and is marked done afterwards
(see qpo_ray.run.rundir); `run_qpo(None, resume_dir=...)` continues at the first unfinished
stage, and logs to MLflow what the interrupted process had not. Random choices are
seeded from ``cfg.seed`` + the stage's index in the plan, never from process state, so
a resumed run builds the same dataset as an uninterrupted one.

The functions below `run_qpo` run one stage's work alone, for the `qpo` subcommands and
the jobs/ scripts.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional

from qpo_ray.common.console import log
from qpo_ray.common import faults
from qpo_ray.config import Config
from qpo_ray.common.progress import send_library_logs_to
from qpo_ray.common.shared_storage import check_shared_run_dir
from qpo_ray.run.rundir import RunDir, lock_outputs, lock_run_dir
from qpo_ray.run.pipeline import PIPELINE, Stage, plan
from qpo_ray.run.stages import augment, step0, test
from qpo_ray.run.stages import filter as filter_stage
from qpo_ray.run.stages.context import RunContext
from qpo_ray.run.tracking import Tracker
from qpo_ray.tasks import fit_to_data

KINDS = [kind for kind, _ in PIPELINE]


def _module(stage: Stage) -> ModuleType:
    """The module qpo_ray.run.stages.<kind>, which runs a stage (`run(ctx, stage)`) and logs
    it (`log(ctx, stage, outputs)`): a stage is registered by its line in PIPELINE."""
    if stage.kind not in KINDS:
        raise ValueError(f"unknown stage {stage.name!r} (known kinds: {KINDS})")
    return importlib.import_module(f"qpo_ray.run.stages.{stage.kind}")


def log_stage(tracker: Tracker, cfg: Config, run: RunDir, name: str) -> None:
    """Record a finished stage's outputs (read back from the run directory) in MLflow."""
    stage = Stage.parse(name)
    _module(stage).log(RunContext(cfg, run, tracker), stage, run.outputs(name))


def check_before_work(cfg: Config) -> None:
    """Everything a run needs from its config, checked before Step 0 spends anything."""
    _check_before_work(RunContext(cfg))


def _check_before_work(ctx: RunContext) -> None:
    """Each error names its setting: the task's files and splits, the target (model,
    backend) and the policy backbone (and its layer counts), the label words as the
    target tokenizes them; then what each stage's `check_before_work` asks (the test
    stage: its methods' inputs, the manual prompt)."""
    from qpo_ray.backends import check_continuations, check_model, validate_backend_config
    from qpo_ray.testphase.methods import check_methods
    from qpo_ray.common.models import cut_config

    cfg = ctx.cfg
    check_methods(cfg.test.methods)  # a typo fails before any file is read
    task = ctx.task
    validate_backend_config(cfg.target, task.mode)  # an endpoint: asked once
    backbone = check_model(cfg.policy.backbone, "policy.backbone")
    # The policy's layer cut and its query summary's depth, against the backbone's layers.
    cut_config(backbone, cfg.policy.backbone_num_layers, "policy.backbone_num_layers")
    cut_config(backbone, cfg.policy.query_summary.num_layers or None,
               "policy.query_summary.layers")
    if task.mode == "labels":
        where = (f"label_words of {cfg.task.spec_path}" if cfg.task.name == "byo" else
                 f"the label words of task {task.name!r}")
        check_continuations(cfg.target, task.continuations(), where)
    for kind in KINDS:  # and what each stage checks of its own (the test stage's inputs)
        check = getattr(_module(Stage(kind)), "check_before_work", None)
        if check is not None:
            check(ctx)


def _say_precisions(cfg: Config) -> None:
    """The target's dtype and the policy training's precision, as "auto" resolved them on
    this machine: results differ slightly between dtypes."""
    from qpo_ray.common.device import dtype_note  # torch loads when a run starts, not with `qpo`

    if cfg.target.backend != "openai":
        log.info(f"target {cfg.target.model} on {cfg.target.backend} in "
                 f"{dtype_note(cfg.target.dtype, cfg.evaluation.engines_on_gpu)}")
    tcfg = cfg.training
    float32 = tcfg.mixed_precision == "no" or (tcfg.strategy == "deepspeed" and not tcfg.use_gpu)
    log.info("policy training in " + ("float32" if float32 else
                                      dtype_note(tcfg.mixed_precision, tcfg.use_gpu)))


def run_qpo(cfg: Optional[Config], resume_dir: Optional[str] = None,
            overrides: Optional[list[str]] = None) -> Path:
    """Run (or continue) QPO end to end; returns the run directory. On resume,
    `overrides` ("key=value") change the saved config (qpo_ray.run.resume says which).
    Holds the run directory's lock throughout (RunDirBusy at once if another process
    writes there)."""
    if resume_dir is None and cfg is None:
        raise ValueError("run_qpo needs a config or a resume_dir")
    with lock_run_dir(resume_dir if resume_dir is not None else cfg.workdir):
        return _run_qpo(cfg, resume_dir, overrides)


def _run_qpo(cfg: Optional[Config], resume_dir: Optional[str],
             overrides: Optional[list[str]]) -> Path:
    from qpo_ray.run.resume import apply_resume_overrides

    changes: list[str] = []
    if resume_dir is not None:
        run, cfg = RunDir.load(resume_dir)
        log.info(f"resuming {run.path}: done {list(run.stages())}")
        cfg, changes = apply_resume_overrides(run, cfg, overrides or [])
        for change in changes:
            log.info(f"resume: {change}")
        if overrides and not changes:
            log.info("resume: --set changed nothing (the saved config has these values)")
        ctx = RunContext(cfg, run)
        _check_before_work(ctx)
    else:
        cfg = fit_to_data(cfg)  # before the run directory saves the config
        ctx = RunContext(cfg)
        _check_before_work(ctx)
        ctx.run = run = RunDir.create(cfg)
        ctx.cfg = cfg = cfg.with_changes({"workdir": str(run.path)})
    log_file = send_library_logs_to(run.path)
    log.info(f"run directory {run.path}; Ray's and MLflow's logs: {log_file}")
    if (nodes := check_shared_run_dir(run.path, cfg.ray_address)) > 1:
        log.info(f"all {nodes} Ray nodes see the run directory")
    _say_precisions(cfg)
    ctx.tracker = tracker = Tracker(cfg, run.path)
    parent = tracker.parent_run_id()
    if changes:
        # MLflow params are write-once: the changes and the config now in use are
        # recorded as artifacts of the parent run instead.
        tracker.client.log_dict(parent, cfg.to_dict(), "config.yaml")
        tracker.log_text(None, "\n".join(changes) + "\n",
                         f"resume_overrides/{time.strftime('%Y%m%dT%H%M%S')}.txt")
    logged = tracker.logged_stages()
    try:
        for stage in plan(cfg.loop.num_loops):
            module, name = _module(stage), stage.name
            faults.enter_stage(name)  # QPO_FAULT_AT (the resume test) only; else no-op
            if not run.is_done(name):
                log.info(f"stage {name} ...")
                start = time.perf_counter()
                try:
                    outputs = module.run(ctx, stage).to_dict()
                finally:
                    # Training comes next (or the run ends): it needs the CPUs/GPUs the
                    # target engines hold. A stage's own calls shared them.
                    if calls := ctx.release_engines():
                        log.info(f"{name}: target engines stopped (started once, "
                                 f"{calls} scoring call{'s' if calls > 1 else ''})")
                outputs["wall_s"] = round(time.perf_counter() - start, 1)
                run.mark_done(name, outputs)
                log.info(f"stage {name} done in {outputs['wall_s']:.0f} s")
                faults.at("done")
            if name not in logged:
                module.log(ctx, stage, run.outputs(name))
                faults.at("logged")
                logged.add(name)
                tracker.mark_logged(name)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    out = Path(run.outputs("test")["report"]).parent  # the test stage says where it wrote
    print((out / "report.md").read_text())
    print(f"run directory: {run.path}\nMLflow: {tracker.uri} (experiment "
          f"{cfg.tracking.experiment!r}, parent run {tracker.state['parent_run_id']})\n"
          f"report: {out / 'report.md'}, {out / 'results.csv'}")
    return run.path


# -- one stage's work alone (qpo dataset build / augment / evaluate, jobs/) ---------------
# Each holds the lock of the run directory it writes into (rundir.lock_outputs).

@contextlib.contextmanager
def _one_stage(cfg: Config, run: Optional[RunDir] = None) -> Iterator[RunContext]:
    """A context for one stage's work whose target engines stop when it is done (on the
    config with its sizes fitted to the data, as `qpo run` fits them)."""
    ctx = RunContext(fit_to_data(cfg), run)
    try:
        yield ctx
    finally:
        ctx.release_engines()


def build_initial_dataset(cfg: Config, out_path: Optional[str | Path] = None) -> Path:
    """Step 0 into `out_path` (default <workdir>/dataset_loop0.parquet)."""
    with lock_outputs(out_path, workdir=None if out_path else cfg.workdir), \
            _one_stage(cfg) as ctx:
        return step0.build_initial_dataset(ctx, out_path)


def filter_initial(cfg: Config, step0_path: Path, out_path: Path) -> dict[str, Any]:
    """D_0 = the expert part of Step 0."""
    return filter_stage.filter_initial(RunContext(cfg), step0_path, out_path).to_dict()


def augment_round(cfg: Config, policy_dir: str | Path, dataset_path: str | Path,
                  round_index: int, out_path: str | Path,
                  seed: Optional[int] = None) -> Path:
    """One augmentation round (qpo_ray.run.stages.augment.augment_round)."""
    with lock_outputs(out_path), _one_stage(cfg) as ctx:
        return augment.augment_round(ctx, policy_dir, dataset_path, round_index, out_path,
                                     seed=seed)


def evaluate(cfg: Config, run_dir: Optional[str] = None,
             policy_dir: Optional[str] = None) -> str:
    """The test phase of a run directory, or of the policy in `policy_dir`."""
    with lock_run_dir(run_dir or cfg.workdir), \
            _one_stage(cfg, RunDir(run_dir) if run_dir else None) as ctx:
        return test.evaluate(ctx, policy_dir=policy_dir)


def evaluate_tracked(cfg: Config, run_dir: Optional[str] = None,
                     policy_dir: Optional[str] = None, add: bool = False) -> tuple[str, str]:
    """`qpo evaluate`: the test phase (with `add`, only `test.methods`, added to the
    earlier report), logged to MLflow as a run nested under the evaluated run's parent
    run (a new run when there is none). (report, where logged)."""
    base = Path(run_dir) if run_dir else Path(cfg.workdir)
    with lock_run_dir(base):  # before the logs go there: a busy directory stays as it was
        send_library_logs_to(base)
        faults.enter_stage("evaluate")  # QPO_FAULT_AT=evaluate:write (the report test)
        run = RunDir(run_dir) if run_dir else None
        out_dir = test.report_dir(cfg, run)
        with _one_stage(cfg, run) as ctx:
            report = test.evaluate(ctx, policy_dir=policy_dir, add=add, out_dir=out_dir)
        return report, test.log_evaluation(Tracker(cfg, base), out_dir)
