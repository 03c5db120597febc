"""Hyper-parameter search on Optuna (``recsys tune``): the search space (:mod:`.space`, defaults
per arch in :mod:`.spaces`), one trial's training (:mod:`.trial`), the study (:mod:`.study`) and
its outputs (:mod:`.report`). docs/tuning.md describes the ``[tune]`` section and the outputs.

Example:
    >>> from recsys.tune import TuneOptions, run_study
    >>> run_study("specs/quickstart.toml", TuneOptions(trials=20, jobs=2)).best_spec
    PosixPath('studies/quickstart/best.toml')
"""

from recsys.tune.study import StudyResult, TuneOptions, plan_study, run_study

__all__ = ["StudyResult", "TuneOptions", "plan_study", "run_study"]
