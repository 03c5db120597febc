"""Bad input gets an error that names the file and the key or column (and the row where it helps).

This file holds the Parquet cases; the others live beside it (spec cases in test_spec.py). The index below lists every
bad-input and fault case the stack handles and the test that shows it (``FILE::TEST``); the last test
of this file checks that each one named exists, so the list cannot drift from the suite.

INDEX
Specs
  unknown key, wrong type, impossible value   test_spec.py::test_unknown_key_lists_the_valid_keys
                                              test_spec.py::test_wrong_type
                                              test_spec.py::test_impossible_value
  missing spec, not TOML, bad --set           test_spec.py::test_missing_spec_file
                                              test_spec.py::test_not_toml
                                              test_bad_input_cli.py::test_bad_override_is_one_problem
  spec that is a directory, binary, UTF-16    test_bad_input_cli.py::test_spec_path_that_is_a_directory
                                              test_bad_input_cli.py::test_binary_spec_file
                                              test_bad_input_cli.py::test_utf16_spec_file
                                              test_bad_input_cli.py::test_latin1_spec_file_names_the_byte
                                              test_bad_input_cli.py::test_empty_spec_file
  global batch that does not split over ranks test_source.py::test_training_and_evaluation_loaders_follow_the_spec
Raw files and datasets
  binary label outside {0, 1}; graded labels  test_bad_input_data.py::test_binary_label_outside_0_1_names_file_column_and_row
                                              test_bad_input_data.py::test_graded_label_may_hold_grades_but_not_nan
  MovieLens rating nan / inf                  test_bad_input_data.py::test_movielens_non_finite_rating_names_file_and_line
  empty libFM / Criteo file                   test_bad_input_data.py::test_empty_raw_file_is_refused
  last line cut short, no final newline       test_bad_input_data.py::test_cut_short_last_line_names_file_and_line
                                              test_bad_input_data.py::test_movielens_cut_short_last_line
  raw file in UTF-16 / not UTF-8              test_bad_input_data.py::test_raw_file_not_in_utf8_says_so
  synth over a folder with the user's files   test_bad_input_data.py::test_synth_keeps_a_dataset_that_holds_foreign_files
  two writers of one dataset                  test_bad_input_data.py::test_second_synth_writer_gets_a_run_error_at_once
                                              test_bad_input_data.py::test_second_prepare_writer_gets_a_run_error
                                              test_bad_input_data.py::test_a_writer_in_another_process_blocks_synth
  failed prepare / synth leave no OUT.partial test_bad_input_data.py::test_failed_prepare_removes_partial_and_keeps_the_old_dataset
                                              test_bad_input_data.py::test_failed_synth_removes_partial_and_keeps_the_old_dataset
  corrupt validation shard, before training   test_bad_input_data.py::test_truncated_eval_shard_stops_ensure_dataset
  Parquet: missing column, wrong type, bad id test_bad_input.py::test_missing_column
                                              test_bad_input.py::test_wrong_column_type
                                              test_bad_input.py::test_id_beyond_its_table_with_oov_error
  Parquet: nulls, non-finite, truncated       test_bad_input.py::test_null_label
                                              test_bad_input.py::test_non_finite_dense_value
                                              test_bad_input.py::test_truncated_file
  bad id met by a loader worker process       test_bad_input_cli.py::test_bad_id_read_by_loader_workers_is_one_line
Runs and checkpoints
  train into a finished run (no --resume)     test_run_safety.py::test_training_into_a_finished_run_stops_and_keeps_it
  --overwrite that then fails on bad data     test_run_safety.py::test_overwrite_with_bad_data_keeps_the_old_run
  two writers of one run directory            test_run_safety.py::test_a_second_writer_of_a_run_directory_gets_a_clear_error
  --resume without spec.toml                  test_run_safety.py::test_resume_without_spec_refuses
  truncated latest checkpoint                 test_run_safety.py::test_truncated_latest_checkpoint_falls_back_and_says_so
  corrupt checkpoints                         test_run_safety.py::test_corrupt_checkpoint_is_skipped_and_all_corrupt_is_one_line
  full disk while checkpointing               test_run_safety.py::test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint
  kill -9, then --resume (curve kept)         test_resume.py::test_killed_and_resumed_run_ends_like_an_uninterrupted_one
  checkpoint that does not fit the model      test_world_size.py::test_a_checkpoint_that_does_not_fit_is_one_line_on_every_rank
  another number of processes (2->1, 1->2)    test_world_size.py::test_checkpoints_resume_and_evaluate_on_another_number_of_processes
  trained on 2, scored on 1 / export / predict test_world_size.py::test_model_trained_on_two_processes_scores_the_same_everywhere
Exports and predict
  failed export over an earlier one           test_run_safety.py::test_a_failed_export_leaves_the_earlier_one_whole
  export over a folder of other files         test_run_safety.py::test_export_refuses_a_folder_of_other_files
  oov policy carried to predict               test_run_safety.py::test_export_carries_the_oov_policy_and_predict_applies_it
  bad Parquet / bad flat inputs to predict    test_predict.py::test_bad_parquet_is_named
                                              test_predict.py::test_flat_inputs_are_checked
Outputs and errors
  full disk, read-only output                 test_bad_input_cli.py::test_synth_into_a_full_disk
                                              test_bad_input_cli.py::test_synth_into_a_read_only_file_system
                                              test_bad_input_cli.py::test_stdout_on_a_full_disk
  non-spec errors not under "invalid spec"    test_bad_input_cli.py::test_not_a_run_directory_is_a_run_error
                                              test_bad_input_cli.py::test_rvq_encode_output_exists
  no stray tracebacks                         test_bad_input_cli.py::test_progress_bar_is_finished_before_the_error
                                              test_bad_input_cli.py::test_closed_pipe_is_silent
                                              test_bad_input_cli.py::test_a_rank_whose_peer_failed_prints_one_line
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.loader import ParquetLoader
from recsys.data.parquet import ParquetSplit
from recsys.data.schema import BatchSchema, SparseColumn
from recsys.errors import DataError
from recsys.spec import OOVPolicy

# ==================================================================================================
# data

SCHEMA = BatchSchema(
    dense=["price"],
    sparse=[SparseColumn("user", "uid", 10, OOVPolicy.ERROR, multi=False),
            SparseColumn("tags", "tags", 8, OOVPolicy.ERROR, multi=True)],
    labels=["click"],
    groups={"request": "request_id"},
)


def good_columns(n: int = 12) -> dict[str, pa.Array]:
    r = np.arange(n)
    return {
        "request_id": pa.array(r // 3, type=pa.int64()),
        "uid": pa.array(r % 10, type=pa.int64()),
        "tags": pa.array([[int(i) % 8] * (int(i) % 3) for i in r], type=pa.list_(pa.int64())),
        "price": pa.array(r * 0.25, type=pa.float32()),
        "click": pa.array(r % 2, type=pa.int8()),
    }


def write(tmp_path: Path, name: str, columns: dict[str, pa.Array]) -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path, row_group_size=4)
    return path


def with_value(column: str, row: int, value: object, n: int = 12) -> dict[str, pa.Array]:
    cols = good_columns(n)
    values = cols[column].to_pylist()
    values[row] = value
    cols[column] = pa.array(values, type=cols[column].type)
    return cols


def open_error(files: list[Path]) -> str:
    with pytest.raises(DataError) as info:
        ParquetSplit(files, SCHEMA)
    return str(info.value)


def iterate_error(files: list[Path], schema: BatchSchema = SCHEMA) -> str:
    """Opening succeeds (the schema is fine); the bad value stops the epoch."""
    loader = ParquetLoader(ParquetSplit(files, schema), 5, seed=1, window_batches=2,
                           drop_last=False)
    with pytest.raises(DataError) as info:
        for _ in loader.epoch(0):
            pass
    return str(info.value)


def test_good_files_load(tmp_path):
    files = [write(tmp_path, "a.parquet", good_columns()), write(tmp_path, "b.parquet",
                                                                 good_columns())]
    loader = ParquetLoader(ParquetSplit(files, SCHEMA), 5, drop_last=False)
    assert sum(b.batch_size for b in loader.epoch(0)) == 24


def test_missing_data_file(tmp_path):
    good = write(tmp_path, "a.parquet", good_columns())
    missing = tmp_path / "b.parquet"
    message = open_error([good, missing])
    assert str(missing) in message and "not found" in message


def test_split_without_files():
    with pytest.raises(DataError, match="no Parquet files"):
        ParquetSplit([], SCHEMA)


@pytest.mark.parametrize("column", ["price", "uid", "tags", "click", "request_id"])
def test_missing_column(tmp_path, column):
    cols = good_columns()
    del cols[column]
    path = write(tmp_path, "a.parquet", cols)
    message = open_error([write(tmp_path, "ok.parquet", good_columns()), path])
    assert str(path) in message
    assert f"missing column '{column}'" in message


@pytest.mark.parametrize("column,values,expected", [
    ("uid", pa.array([str(i) for i in range(12)]), "integer ids"),
    ("tags", pa.array(np.arange(12) * 0.5), "a list of integer ids"),
    ("tags", pa.array([["a"]] * 12), "a list of integer ids"),
    ("price", pa.array(["1.5"] * 12), "a number"),
    ("click", pa.array(["yes"] * 12), "labels"),
    ("request_id", pa.array(np.arange(12) * 1.0), "integer group ids"),
])
def test_wrong_column_type(tmp_path, column, values, expected):
    cols = good_columns()
    cols[column] = values
    path = write(tmp_path, "a.parquet", cols)
    message = open_error([path])
    assert str(path) in message
    assert f"column '{column}'" in message
    assert expected in message
    # the type found, as the file stores it (Parquet may rename a list's item field)
    is_list = pa.types.is_list(values.type)
    assert ("has type list<" in message) == is_list
    assert str(values.type.value_type if is_list else values.type) in message


def test_negative_id_with_oov_error(tmp_path):
    path = write(tmp_path, "b.parquet", with_value("uid", 5, -3))
    message = iterate_error([write(tmp_path, "a.parquet", good_columns()), path])
    assert str(path) in message
    assert "'uid'" in message and "negative id (-3)" in message and "row 5" in message
    assert "oov = 'hash'" in message  # the fix


def test_id_beyond_its_table_with_oov_error(tmp_path):
    path = write(tmp_path, "b.parquet", with_value("uid", 10, 10))
    message = iterate_error([write(tmp_path, "a.parquet", good_columns()), path])
    assert str(path) in message
    assert "'uid'" in message and "beyond its table (10)" in message and "row 10" in message
    assert "10 rows" in message


def test_bad_id_inside_a_list(tmp_path):
    # rows 0..11 have (i % 3) tags; row 8 holds two, the second one bad
    path = write(tmp_path, "a.parquet", with_value("tags", 8, [0, 8]))
    message = iterate_error([path])
    assert str(path) in message
    assert "'tags'" in message and "(8)" in message and "row 8" in message


def test_hash_policy_accepts_the_same_ids(tmp_path):
    path = write(tmp_path, "a.parquet", with_value("uid", 5, -3))
    hashed = BatchSchema(dense=SCHEMA.dense, labels=SCHEMA.labels, groups=SCHEMA.groups,
                         sparse=[SparseColumn("user", "uid", 10, OOVPolicy.HASH, False),
                                 SCHEMA.sparse[1]])
    loader = ParquetLoader(ParquetSplit([path], hashed), 12, shuffle=False, drop_last=False)
    (batch,) = list(loader.epoch(0))
    assert batch.sparse.to_dict()["user"].values().tolist()[5] == 7  # -3 mod 10


@pytest.mark.parametrize("value,shown", [(float("nan"), "nan"), (float("inf"), "inf"),
                                         (float("-inf"), "-inf")])
def test_non_finite_dense_value(tmp_path, value, shown):
    path = write(tmp_path, "b.parquet", with_value("price", 7, value))
    message = iterate_error([write(tmp_path, "a.parquet", good_columns()), path])
    assert str(path) in message
    assert "'price'" in message and "row 7" in message and f"holds {shown}" in message


def test_null_dense_value(tmp_path):
    path = write(tmp_path, "a.parquet", with_value("price", 9, None))
    message = iterate_error([path])
    assert str(path) in message and "'price'" in message and "row 9" in message


def test_null_label(tmp_path):
    path = write(tmp_path, "a.parquet", with_value("click", 2, None))
    message = iterate_error([path])
    assert str(path) in message and "'click'" in message and "row 2" in message


@pytest.mark.parametrize("column", ["request_id", "stage"])
def test_null_group_id_or_stage(tmp_path, column):
    """A null request id (or stage) cannot be made up: an error, not a garbage integer."""
    cols = good_columns()
    cols["stage"] = pa.array(np.arange(12) % 6, type=pa.int8())
    values = cols[column].to_pylist()
    values[6] = None
    cols[column] = pa.array(values, type=cols[column].type)
    path = write(tmp_path, "a.parquet", cols)
    schema = BatchSchema(dense=SCHEMA.dense, sparse=SCHEMA.sparse, labels=SCHEMA.labels,
                         groups=SCHEMA.groups, stage="stage")
    message = iterate_error([path], schema)
    assert str(path) in message and f"'{column}'" in message and "row 6" in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    message = open_error([write(tmp_path, "a.parquet", good_columns()), path])
    assert str(path) in message and "empty (0 bytes)" in message


def test_truncated_file(tmp_path):
    path = write(tmp_path, "cut.parquet", good_columns(200))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = open_error([path])
    assert str(path) in message and "not a readable Parquet file" in message


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("request_id,uid\n1,2\n")
    message = open_error([path])
    assert str(path) in message


def test_split_with_zero_rows(tmp_path):
    empty = {k: v.slice(0, 0) for k, v in good_columns().items()}
    (tmp_path / "split").mkdir()
    files = [write(tmp_path / "split", f"part-{i}.parquet", empty) for i in range(2)]
    message = open_error(files)
    assert str(tmp_path / "split") in message and "no rows" in message


def test_the_index_names_only_tests_that_exist() -> None:
    """Every ``FILE::TEST`` in this module's index is a test function in that file."""
    here = Path(__file__).parent
    named = re.findall(r"(test_\w+\.py)::(test_\w+)", __doc__ or "")
    assert len(named) > 40
    missing = [f"{f}::{t}" for f, t in named
               if not re.search(rf"^def {t}\(", (here / f).read_text(), re.MULTILINE)]
    assert not missing, missing
