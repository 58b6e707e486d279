"""Training rows as Arrow: the schema, record batches assembled from numpy arrays, the rows file.

A batch of rows is built column by column from each conversation's arrays (offsets + flat values),
never through Python lists of numbers or `datasets.Dataset.from_list`. The schema is the one
`datasets` gives the rows' features (its metadata included), so `datasets.Dataset.from_file` reads
the file back with the same features as a saved dataset, memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

ROWS_FILE = "rows.arrow"


def features() -> Any:
    """The `datasets.Features` of a rows dataset."""
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"), "domain": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
        "target_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "target_logprobs": datasets.Sequence(datasets.Sequence(datasets.Value("float16")))})


def schema() -> pa.Schema:
    return features().arrow_schema


def _offsets(lengths: Sequence[int] | np.ndarray) -> pa.Array:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    if out[-1] > np.iinfo(np.int32).max:
        raise ValueError("a batch of rows over 2^31 values: use smaller shards")
    return pa.array(out.astype(np.int32))


def _flat(arrays: Sequence[np.ndarray], dtype: Any) -> pa.Array:
    values = np.concatenate([np.asarray(a).reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    return pa.array(values.astype(dtype, copy=False))


def _lists(arrays: Sequence[np.ndarray], dtype: Any) -> pa.Array:
    """(n_i,) arrays → list<dtype>."""
    return pa.ListArray.from_arrays(_offsets([len(a) for a in arrays]), _flat(arrays, dtype))


def _nested(arrays: Sequence[np.ndarray], dtype: Any) -> pa.Array:
    """(n_i, k_i) arrays → list<list<dtype>> (row i holds n_i lists of k_i values)."""
    widths = [np.full(len(a), a.shape[1], dtype=np.int64) for a in arrays]
    inner_offsets = _offsets(np.concatenate(widths) if widths else np.zeros(0, dtype=np.int64))
    values = pa.ListArray.from_arrays(inner_offsets, _flat(arrays, dtype))
    return pa.ListArray.from_arrays(_offsets([len(a) for a in arrays]), values)


def rows_batch(ids: Sequence[str], domains: Sequence[str], input_ids: Sequence[np.ndarray],
               labels: Sequence[np.ndarray], target_ids: Sequence[np.ndarray],
               target_logprobs: Sequence[np.ndarray]) -> pa.RecordBatch:
    """One record batch of rows; per row: input ids and labels (L,), targets (n, k)."""
    cols = [pa.array(list(ids), pa.string()), pa.array(list(domains), pa.string()),
            _lists(input_ids, np.int32), _lists(labels, np.int32),
            _nested(target_ids, np.int32), _nested(target_logprobs, np.float16)]
    sch = schema()
    return pa.RecordBatch.from_arrays([c.cast(f.type) for c, f in zip(cols, sch)], schema=sch)


def batch_bytes(batch: pa.RecordBatch) -> bytes:
    """The batch as an Arrow IPC stream message (how a worker hands it to the writer)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def read_batches(data: bytes) -> list[pa.RecordBatch]:
    return list(pa.ipc.open_stream(pa.py_buffer(data)))


class RowsWriter:
    """Appends record batches to one Arrow stream file (`path`), or to memory when `path` is None."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._sink = pa.OSFile(str(path), "wb") if path is not None else pa.BufferOutputStream()
        self._writer = pa.ipc.new_stream(self._sink, schema())
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> Any:
        """Finish the stream; the rows as a `datasets.Dataset` (memory-mapped from the file)."""
        import datasets

        self._writer.close()
        if self.path is None:
            return datasets.Dataset.from_buffer(self._sink.getvalue())
        self._sink.close()
        return datasets.Dataset.from_file(str(self.path))


def load_rows(folder: Path) -> Any:
    """A rows folder as a dataset: our Arrow file, or a dataset saved with `save_to_disk` (older caches)."""
    import datasets

    if (folder / ROWS_FILE).is_file():
        return datasets.Dataset.from_file(str(folder / ROWS_FILE))
    return datasets.load_from_disk(str(folder))


def _hash_array(h: Any, arr: pa.Array) -> None:
    """Values and list structure of `arr`, independent of chunking and slicing."""
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        offsets = np.asarray(arr.offsets, dtype=np.int64)
        h.update((offsets - offsets[0]).tobytes())
        _hash_array(h, arr.flatten())
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        h.update(json.dumps(arr.to_pylist(), ensure_ascii=False).encode())
    else:
        h.update(str(arr.type).encode() + arr.to_numpy(zero_copy_only=False).tobytes())


def rows_digest(dataset: Any) -> str:
    """sha256 of a rows dataset's content (column names, types, values): equal for equal rows however
    they were written (one file or `save_to_disk`, any chunking)."""
    table = dataset.data.table if hasattr(dataset, "data") else dataset
    h = hashlib.sha256()
    for name in table.column_names:
        col = table.column(name)
        h.update(name.encode() + str(col.type).encode())
        _hash_array(h, pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], col.type))
    return h.hexdigest()
