"""``recsys tune``: an Optuna study over a spec's search space.

TPE samples each trial's values, which are applied to the spec; the trial trains it in its own
run directory (``STUDY_DIR/trials/NNNN``) and reports every periodic validation
(``train.eval_every_steps``) to the study, whose median pruner may stop it; its value is its final
valid metric. A trial that cannot give a value (a sampled spec that is invalid, a crash, a NaN
metric) is recorded as FAIL with its error, and the study goes on.

The study lives in ``STUDY_DIR/study.db`` (SQLite) unless another Optuna storage URL is given
(``postgresql://...``: several machines share one study). Running the same command again
resumes it: the study gains ``trials`` more trials; a study started from another spec (another
hash) is refused.

Example:
    >>> result = run_study("specs/quickstart.toml", TuneOptions(trials=20, jobs=2))
    >>> result.best_value, result.study_dir
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import optuna
from optuna.trial import BaseTrial, FrozenTrial, TrialState

from recsys.errors import RecsysError, RunError, SpecError, UsageError
from recsys.fsutil import atomic_write_text, writing
from recsys.spec import (
    HEADLINE_METRICS,
    PrunerSpec,
    Spec,
    apply_override,
    check_paths,
    read_raw_spec,
    spec_hash,
    validate_spec,
)
from recsys.tune.report import (
    IMPORTANCES_JSON,
    importances,
    trial_rows,
    write_best,
    write_trials,
)
from recsys.tune.space import Param, apply_params, resolve_space
from recsys.tune.spaces import fitting_defaults
from recsys.tune.trial import (
    Pruned,
    ReportFn,
    TrialFailed,
    train_in_process,
    train_in_worker,
)

log = logging.getLogger("recsys.tune")

__all__ = ["StudyResult", "TuneOptions", "TunePlan", "open_study", "plan_study", "run_study"]

DB_NAME = "study.db"
TRIALS_DIR = "trials"
# a RUNNING trial whose process has not beaten for this long is failed when a study (re)starts
HEARTBEAT_S = 30
GRACE_S = 120
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class TuneOptions:
    """How to run a study (the command line's options)."""

    trials: int
    jobs: int = 1
    study: str | None = None  # default: the spec's name
    storage: str | None = None  # default: sqlite:///STUDY_DIR/study.db
    study_dir: Path = Path("studies")  # the study's directory is study_dir / study
    overrides: Sequence[str] = ()  # --set KEY=VALUE on the base spec
    in_process: bool = False  # train trials in this process (jobs must be 1; tests, debugging)
    pruner: optuna.pruners.BasePruner | None = None  # instead of [tune.pruner]

    def check(self) -> None:
        if self.trials < 1:
            raise UsageError(f"--trials must be >= 1, got {self.trials}")
        if self.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {self.jobs}")
        if self.in_process and self.jobs != 1:
            raise UsageError("trials run in this process one at a time: --jobs must be 1")
        if self.study is not None and not STUDY_NAME.match(self.study):
            raise UsageError(f"--study '{self.study}': use letters, digits, '.', '_' and '-' "
                             "(it names a directory)")


@dataclass
class TunePlan:
    """A study's fixed inputs: the base spec (raw, for trials to change), the space, the metric."""

    spec: Spec  # the spec as given (with its [tune] section)
    base_raw: dict[str, Any]  # what each trial's values are applied to (no [tune] section)
    params: list[Param]
    metric: str
    file: str

    @property
    def direction(self) -> str:
        return "maximize" if HEADLINE_METRICS[self.metric] else "minimize"


@dataclass
class StudyResult:
    """What a study holds after this command: its directory, the counts by state, the best."""

    study_dir: Path
    storage: str
    states: dict[str, int] = field(default_factory=dict)
    best_number: int | None = None
    best_value: float | None = None
    best_spec: Path | None = None


def plan_study(spec_path: str | Path, overrides: Sequence[str] = ()) -> TunePlan:
    """Load the spec, and check its search space (the ``[tune]`` section's, or the defaults of
    its arch and methods) against it; a SpecError names any bad entry by key."""
    file = str(spec_path)
    raw = read_raw_spec(spec_path)
    for item in overrides:
        apply_override(raw, item, file)
    spec = validate_spec(raw, file)
    check_paths(spec, file)
    tune = spec.tune
    metric = (tune.metric if tune is not None else None) or spec.train.headline_metric
    base_raw = copy.deepcopy(raw)
    base_raw.pop("tune", None)  # trials train the spec without it (and hash without it)
    # early stopping and pruning follow the metric the study optimizes
    base_raw.setdefault("train", {})["headline_metric"] = metric
    if tune is not None and tune.space:
        params = resolve_space(spec, base_raw, file)
    else:
        params = resolve_space(spec, base_raw, file, fitting_defaults(spec, base_raw, file))
    if not params:
        raise SpecError(file, ["tune.space: nothing to search (the section lists no key and "
                               "no default fits this spec)"])
    return TunePlan(spec, base_raw, params, metric, file)


def open_study(plan: TunePlan, name: str, storage_url: str, pruner: optuna.pruners.BasePruner
               ) -> optuna.Study:
    """Create the study, or load it when it exists (it must have been started from the same
    spec: its hash is stored with it)."""
    tune = plan.spec.tune
    storage = _storage(storage_url)
    existing = _existing_trials(storage, name)
    # a seed of its own for each session, so that a resumed study samples new values
    sampler = optuna.samplers.TPESampler(
        seed=(tune.sampler_seed if tune else 0) + existing,
        n_startup_trials=tune.startup_trials if tune else 10)
    study = optuna.create_study(storage=storage, study_name=name, direction=plan.direction,
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    started_from = study.user_attrs.get("spec_hash")
    this = spec_hash(plan.spec)
    if started_from is None:
        study.set_user_attr("spec_hash", this)
        study.set_user_attr("metric", plan.metric)
        study.set_user_attr("space", json.dumps([p.entry.model_dump(mode="json")
                                                 for p in plan.params]))
    elif started_from != this:
        raise RunError(f"{storage_url} (study '{name}')",
                       f"was started from spec hash {started_from}, this spec (with its --set "
                       f"and [tune] section) is {this}; resume with the same spec, or start a "
                       "new study with --study")
    return study


def _storage(url: str) -> optuna.storages.RDBStorage:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # several trial threads write: wait for the lock, not fail
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        with warnings.catch_warnings():  # (heartbeats are "experimental" since Optuna 2.9)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S, **kwargs)
    except (ImportError, ValueError) as e:
        raise UsageError(f"--storage {url}: {e}") from None
    except Exception as e:  # sqlalchemy's errors: a bad URL, an unreachable server
        raise RunError(url, f"cannot open the study storage: {e}") from None


def _existing_trials(storage: optuna.storages.BaseStorage, name: str) -> int:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def make_pruner(plan: TunePlan) -> optuna.pruners.BasePruner:
    """``[tune.pruner]``: the median rule, or none."""
    spec = plan.spec.tune.pruner if plan.spec.tune is not None else PrunerSpec()
    if spec.kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials,
                                       n_warmup_steps=spec.warmup_steps)


class Objective:
    """Sample a trial's values, apply them to the base spec, check it, train it; the value is
    the final valid metric. Failures raise :class:`TrialFailed` (recorded as FAIL, with the
    message in the trial's ``error`` attribute); pruning raises ``optuna.TrialPruned``."""

    def __init__(self, plan: TunePlan, study_dir: Path, in_process: bool,
                 threads: int | None = None) -> None:
        self.plan, self.study_dir = plan, study_dir
        self.in_process, self.threads = in_process, threads

    def __call__(self, trial: BaseTrial) -> float:
        values = {p.name: p.decode(_suggest(trial, p)) for p in self.plan.params}
        run_dir = self.study_dir / TRIALS_DIR / f"{trial.number:04d}"
        trial.set_user_attr("spec_values", values)
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            spec = validate_spec(apply_params(self.plan.base_raw, values),
                                 f"{self.plan.file} (trial {trial.number})")
        except SpecError as e:
            self._fail(trial, "invalid spec: " + "; ".join(e.problems))

        def report(step: int, value: float) -> bool:
            trial.report(value, step)
            return bool(trial.should_prune())  # (a numpy bool from some pruners)

        try:
            value = self._train(spec, run_dir, report)
        except Pruned as e:
            raise optuna.TrialPruned(str(e)) from None
        except TrialFailed as e:
            self._fail(trial, str(e))
        except Exception as e:  # an in-process trial's error or crash: never stops the study
            self._fail(trial, self._crash(run_dir, e))
        return value

    def _train(self, spec: Spec, run_dir: Path, report: ReportFn) -> float:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.in_process:
            return train_in_process(spec, run_dir, self.plan.metric, report)
        return train_in_worker(spec, run_dir, self.plan.metric, report,
                               run_dir.with_suffix(".log"), self.threads)

    @staticmethod
    def _crash(run_dir: Path, e: Exception) -> str:
        """The one-line error of an in-process trial; a bug's traceback goes to its log."""
        if isinstance(e, RecsysError):
            return str(e)
        log_path = run_dir.with_suffix(".log")
        log_path.write_text(traceback.format_exc())
        return f"{type(e).__name__}: {e} (traceback in {log_path})"

    @staticmethod
    def _fail(trial: BaseTrial, message: str) -> NoReturn:
        trial.set_user_attr("error", message)
        raise TrialFailed(message)


def _suggest(trial: BaseTrial, p: Param) -> Any:
    d = p.distribution
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(p.name, list(d.choices))
    if isinstance(d, optuna.distributions.IntDistribution):
        return trial.suggest_int(p.name, d.low, d.high, step=d.step, log=d.log)
    assert isinstance(d, optuna.distributions.FloatDistribution)
    return trial.suggest_float(p.name, d.low, d.high, step=d.step, log=d.log)


class _Progress:
    """One line per finished trial with the best so far; the outputs rewritten after each."""

    def __init__(self, plan: TunePlan, study_dir: Path, total: int) -> None:
        self.plan, self.study_dir, self.total = plan, study_dir, total
        self.done = 0
        self.lock = threading.Lock()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with self.lock:  # (trials of several jobs finish on their own threads)
            self.done += 1
            log.info("[%d/%d] trial %d %s%s%s", self.done, self.total, trial.number,
                     trial.state.name, self._outcome(trial), self._best(study))
            write_trials(self.study_dir, trial_rows(study), self.plan.metric,
                         self.plan.direction)

    def _outcome(self, trial: FrozenTrial) -> str:
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        if trial.state == TrialState.COMPLETE:
            what = f": valid {self.plan.metric} {trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            what = f" at step {trial.last_step}"
        else:
            what = f": {trial.user_attrs.get('error') or trial.system_attrs.get('fail_reason')}"
        return f"{what} in {seconds:.1f} s"

    def _best(self, study: optuna.Study) -> str:
        try:
            best = study.best_trial
        except ValueError:
            return "; no complete trial yet"
        return f"; best {best.value:.4f} (trial {best.number})"


def run_study(spec_path: str | Path, options: TuneOptions) -> StudyResult:
    """Run ``options.trials`` more trials of the spec's study and write its outputs.

    Example:
        >>> run_study("specs/quickstart.toml", TuneOptions(trials=20)).best_spec
        PosixPath('studies/quickstart/best.toml')
    """
    options.check()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UsageError("recsys tune runs its trials itself (one process each); start it "
                         "without torchrun")
    with _tune_logging():
        plan = plan_study(spec_path, options.overrides)
        name = options.study or plan.spec.name
        if not STUDY_NAME.match(name):
            raise UsageError(f"the study name '{name}' (the spec's name) cannot name a "
                             "directory; pass --study NAME")
        study_dir = options.study_dir / name
        with writing(study_dir):
            study_dir.mkdir(parents=True, exist_ok=True)
        storage_url = options.storage or f"sqlite:///{(study_dir / DB_NAME).resolve()}"
        study = open_study(plan, name, storage_url, options.pruner or make_pruner(plan))
        _prepare_data(plan)
        log.info("study '%s' in %s: %d trial(s) so far; %d more, %d at a time (%s)", name,
                 storage_url, len(study.trials), options.trials, options.jobs, plan.direction)
        log.info("searching %s on valid %s", ", ".join(p.name for p in plan.params),
                 plan.metric)
        if plan.spec.train.eval_every_steps is None:
            log.info("train.eval_every_steps is not set: trials validate only at their end, so "
                     "none is pruned")
        threads = max(1, (os.cpu_count() or 1) // options.jobs)
        objective = Objective(plan, study_dir, options.in_process, threads)
        study.optimize(objective, n_trials=options.trials, n_jobs=options.jobs,
                       timeout=plan.spec.tune.timeout_s if plan.spec.tune else None,
                       catch=(TrialFailed,),
                       callbacks=[_Progress(plan, study_dir, options.trials)])
        return _finish(study, plan, study_dir, storage_url)


def _prepare_data(plan: TunePlan) -> None:
    """Make or check the dataset once, before trials that would otherwise race to make it."""
    from recsys.datasets import ensure_dataset

    ensure_dataset(plan.spec, progress=True)


def _finish(study: optuna.Study, plan: TunePlan, study_dir: Path, storage_url: str
            ) -> StudyResult:
    """Write the outputs and log the summary."""
    rows = trial_rows(study)
    importance = importances(study)
    write_trials(study_dir, rows, plan.metric, plan.direction, importance)
    if isinstance(importance, dict):
        with writing(study_dir):
            atomic_write_text(study_dir / IMPORTANCES_JSON,
                              json.dumps(importance, indent=2) + "\n")
    best = write_best(study_dir, study, plan.base_raw, plan.metric)
    states = dict(Counter(r["state"] for r in rows))
    result = StudyResult(study_dir, storage_url, states, best_spec=best)
    if best is not None:
        result.best_number, result.best_value = study.best_trial.number, study.best_value
    log.info("study '%s': %s", study.study_name,
             ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())))
    if best is None:
        log.info("no trial completed, so there is no best spec")
    else:
        log.info("best: trial %d, valid %s %.4f; its spec: %s", result.best_number,
                 plan.metric, result.best_value, best)
    if isinstance(importance, str):
        log.info("%s", importance)
    log.info("wrote %s", study_dir)
    return result


class _tune_logging:  # noqa: N801 (a context manager used like a function)
    """INFO lines of ``recsys.tune`` on stderr while a study runs (trials in this process rewire
    the ``recsys`` logger, so this one does not propagate to it); Optuna's own per-trial lines,
    which ours replace, are silenced."""

    def __enter__(self) -> None:
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(asctime)s tune %(message)s", "%H:%M:%S"))
        self.saved = (log.level, log.propagate, optuna.logging.get_verbosity())
        log.addHandler(self.handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        optuna.logging.set_verbosity(optuna.logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self.handler)
        log.setLevel(self.saved[0])
        log.propagate = self.saved[1]
        optuna.logging.set_verbosity(self.saved[2])

