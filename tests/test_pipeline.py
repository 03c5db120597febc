"""The train pipeline of one CPU process (TrainPipelineBase) trains exactly as the overlapping one
(TrainPipelineSparseDist) does, in fp32 and under the bf16 autocast forward, for every shipped
spec's model, and takes a new iterator (a new epoch) after one ends. Running SparseDist here also
keeps every arch under its symbolic trace, which multi-process training needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_interaction_training import tiny_variant
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist

from recsys.data.schema import DatasetManifest
from recsys.datasets import make_loader
from recsys.spec import Spec, validate_spec
from recsys.train.distributed import init_distributed, seed_everything, shutdown
from recsys.train.pipeline import make_pipeline, restart
from recsys.train.sharded import build_sharded_model

STEPS = 12
SPECS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "specs").glob("*.toml"))


def _losses(pipeline: Any, batches: list[Any]) -> list[float]:
    out, it = [], iter(batches)
    while True:
        try:
            out.append(float(pipeline.progress(it)[0]))
        except StopIteration:
            return out


@pytest.mark.parametrize("bf16", [False, True])
def test_one_process_pipelines_train_alike(tiny_spec: Spec, tiny_dataset: DatasetManifest,
                                           bf16: bool) -> None:
    batches = list(make_loader(tiny_spec, tiny_dataset, "train").epoch(0))[:STEPS]
    ctx = init_distributed("cpu")
    try:
        assert isinstance(make_pipeline(torch.nn.Identity(), None, ctx.device, 1),  # type: ignore[arg-type]
                          TrainPipelineBase)
        losses: dict[bool, list[float]] = {}
        for overlap in (True, False):
            seed_everything(tiny_spec.train.seed, 0)
            built = build_sharded_model(tiny_spec, ctx.device, 1, total_steps=10 * STEPS)
            model = built.dmp

            def autocast(batch: Any, model: torch.nn.Module = model) -> Any:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(batch)

            pipeline = make_pipeline(model, built.optimizer, ctx.device, 1,
                                     autocast if bf16 else None, overlap=overlap)
            assert isinstance(pipeline, TrainPipelineSparseDist if overlap else TrainPipelineBase)
            losses[overlap] = _losses(pipeline, batches)
            # a second epoch: the same pipeline takes the next iterator once restarted
            restart(pipeline)
            assert len(_losses(pipeline, batches[:3])) == 3
        assert len(losses[True]) == STEPS
        assert losses[False] == pytest.approx(losses[True], rel=0, abs=1e-6)
        assert losses[True][-1] != losses[True][0]  # it trained
    finally:
        shutdown()


@pytest.mark.parametrize("spec_file", SPECS)
def test_every_shipped_model_trains_alike_on_both_pipelines(spec_file: str,
                                                             tiny_dataset: DatasetManifest) -> None:
    raw = tiny_variant(spec_file, tiny_dataset.root)
    if raw["model"].get("esmm"):  # ESMM's two towers need both labels
        raw["model"]["tasks"] = raw["data"]["labels"] = ["click", "conversion"]
    spec = validate_spec(raw)
    batches = list(make_loader(spec, tiny_dataset, "train").epoch(0))[:4]
    ctx = init_distributed("cpu")
    try:
        losses = []
        for overlap in (True, False):
            seed_everything(spec.train.seed, 0)
            built = build_sharded_model(spec, ctx.device, 1, total_steps=40)
            pipeline = make_pipeline(built.dmp, built.optimizer, ctx.device, 1, overlap=overlap)
            losses.append(_losses(pipeline, batches))
        assert len(losses[0]) == len(batches)
        assert losses[1] == pytest.approx(losses[0], rel=0, abs=1e-6), spec.model.arch
    finally:
        shutdown()
