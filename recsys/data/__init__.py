"""The data layer: schema, synthetic simulator, raw-format adapters, Parquet store and loader.

It knows nothing of models; everything downstream reads :class:`Batch`.
"""

from recsys.data.batch import Batch, BatchBuilder
from recsys.data.loader import ParquetLoader
from recsys.data.parquet import DatasetWriter, ParquetSplit, ShardWriter
from recsys.data.schema import BatchSchema, ColumnInfo, ColumnRole, DatasetManifest, Stage

__all__ = [
    "Batch", "BatchBuilder", "BatchSchema", "ColumnInfo", "ColumnRole", "DatasetManifest",
    "DatasetWriter", "ParquetLoader", "ParquetSplit", "ShardWriter", "Stage",
]
