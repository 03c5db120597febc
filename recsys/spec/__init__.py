"""Experiment specs: one TOML file per experiment, validated into typed pydantic models.

:mod:`recsys.spec.schema` holds the models and :mod:`recsys.spec.io` reads, overrides, hashes and
writes them; both are re-exported here.

Example:
    >>> spec = load_spec("specs/quickstart.toml", overrides=["train.batch_size=4096"])
    >>> spec.model.arch, spec.train.batch_size
    ('dcn', 4096)
"""

from recsys.spec.io import (
    apply_override,
    check_paths,
    dump_toml,
    load_run_spec,
    load_spec,
    only_arch_sections,
    read_raw_spec,
    read_spec_text,
    spec_hash,
    spec_to_dict,
    validate_spec,
)
from recsys.spec.schema import *  # noqa: F403
from recsys.spec.schema import __all__ as _schema_names

__all__ = ["apply_override", "check_paths", "dump_toml", "load_run_spec", "load_spec", "only_arch_sections",
           "only_arch_sections",
           "read_raw_spec", "read_spec_text", "spec_hash", "spec_to_dict", "validate_spec",
           *_schema_names]
