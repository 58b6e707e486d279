"""The logit store: per-conversation teacher distributions of one model, on disk as `datasets` Arrow files.

Layout of a store folder:

    manifest.json          fingerprint (model, tokenizer, template, data, settings), shard count,
                           on-disk dtypes, and once complete the summed statistics
    shards/00000.arrow     one Arrow stream file per `shard_size` conversations of the corpus
    shards/00000.json      that shard's statistics (written before the .arrow, so an .arrow implies it)

A shard is written under a temporary name and renamed when complete, so a killed run leaves
either a whole shard or none; a rerun skips the shards that exist. Rows are conversations (in
corpus order); per scored token they hold the gold token id, its [start, end) character span in
`text`, the top-k ids and log-probs and the gold token's log-prob.

Integer columns use the narrowest type that holds every value of the store (uint16 ids for
vocabularies up to 65,536 tokens, uint16 spans for texts up to 65,535 characters, else int32);
the dtypes are fixed per store from the tokenizer and corpus, and the reader always returns int32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from core.atomic import write_bytes, write_with
from core.errors import PivotfuseError
from core.files import is_int, is_number, need, read_json

FORMAT = "pivotfuse-logit-store"
VERSION = 1
MANIFEST = "manifest.json"
STAT_KEYS = ("rows", "stored", "skipped_no_assistant", "skipped_template_error", "skipped_no_scored_tokens",
             "truncated", "scored_tokens", "scored_chars", "scored_bytes", "nll")


@dataclass
class TeacherRecord:
    """One conversation's teacher distributions (n = scored tokens, k = top-k)."""

    index: int  # row of the corpus
    id: str
    domain: str | None
    text: str  # the conversation rendered with this model's own chat template
    assistant_spans: np.ndarray  # (m, 2) int32 [start, end) of each assistant reply incl. its end-of-turn token
    token_ids: np.ndarray  # (n,) int32 gold tokens (the assistant tokens being predicted)
    spans: np.ndarray  # (n, 2) int32 [start, end) of each gold token in `text`
    topk_ids: np.ndarray  # (n, k) int32 most likely next tokens, best first
    topk_logprobs: np.ndarray  # (n, k) float16 their log-probs (float32 log_softmax, then rounded)
    gold_logprobs: np.ndarray  # (n,) float16 log-prob of each gold token
    ce: float  # mean −log p(gold) over the scored tokens, nats (from float32 log-probs)
    n_chars: int  # characters of the assistant replies (without end-of-turn tokens) that scored tokens cover:
                  # the same for every tokenizer, so nll / n_chars compares models
    n_bytes: int  # the same in UTF-8 bytes
    seq_len: int  # tokens fed to the model (after truncation)
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def int_type(max_value: int) -> str:
    """Narrowest stored integer type for values in [0, max_value]."""
    return "uint16" if max_value <= np.iinfo(np.uint16).max else "int32"


def schema(k: int, id_type: str, span_type: str) -> pa.Schema:
    ids, spans = pa.from_numpy_dtype(np.dtype(id_type)), pa.from_numpy_dtype(np.dtype(span_type))
    return pa.schema([
        ("index", pa.int64()), ("id", pa.string()), ("domain", pa.string()), ("text", pa.string()),
        ("assistant_spans", pa.list_(pa.list_(pa.int32(), 2))),
        ("token_ids", pa.list_(ids)), ("spans", pa.list_(pa.list_(spans, 2))),
        ("topk_ids", pa.list_(pa.list_(ids, k))), ("topk_logprobs", pa.list_(pa.list_(pa.float16(), k))),
        ("gold_logprobs", pa.list_(pa.float16())),
        ("ce", pa.float64()), ("n_chars", pa.int32()), ("n_bytes", pa.int32()),
        ("seq_len", pa.int32()), ("truncated", pa.bool_()),
    ])


def _lists(arrays: list[np.ndarray], dtype: pa.DataType, width: int | None) -> pa.Array:
    """Ragged per-row arrays (n_i,) or (n_i, width) → list<value> / list<fixed_size_list<value>>."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    values = pa.array(flat.astype(dtype.to_pandas_dtype(), copy=False), type=dtype)
    if width is not None:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def records_to_table(records: list[TeacherRecord], sch: pa.Schema) -> pa.Table:
    def inner(name: str) -> pa.DataType:
        t = sch.field(name).type.value_type
        return t.value_type if pa.types.is_fixed_size_list(t) else t

    k = sch.field("topk_ids").type.value_type.list_size
    cols: dict[str, Any] = {
        "index": pa.array([r.index for r in records], pa.int64()),
        "id": pa.array([r.id for r in records], pa.string()),
        "domain": pa.array([r.domain for r in records], pa.string()),
        "text": pa.array([r.text for r in records], pa.string()),
        "assistant_spans": _lists([r.assistant_spans for r in records], pa.int32(), 2),
        "token_ids": _lists([r.token_ids for r in records], inner("token_ids"), None),
        "spans": _lists([r.spans for r in records], inner("spans"), 2),
        "topk_ids": _lists([r.topk_ids for r in records], inner("topk_ids"), k),
        "topk_logprobs": _lists([r.topk_logprobs for r in records], pa.float16(), k),
        "gold_logprobs": _lists([r.gold_logprobs for r in records], pa.float16(), None),
        "ce": pa.array([r.ce for r in records], pa.float64()),
        "n_chars": pa.array([r.n_chars for r in records], pa.int32()),
        "n_bytes": pa.array([r.n_bytes for r in records], pa.int32()),
        "seq_len": pa.array([r.seq_len for r in records], pa.int32()),
        "truncated": pa.array([r.truncated for r in records], pa.bool_()),
    }
    return pa.table(cols, schema=sch)


def _write_json(path: Path, data: dict) -> None:
    """Manifests and shard statistics are trusted once they exist: fsynced before the rename."""
    write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), fsync=True)


def _nonneg(value: Any) -> bool:
    return is_int(value) and value >= 0


def _positive(value: Any) -> bool:
    return is_int(value) and value > 0


def _stats(data: dict, where: str, prefix: str = "") -> dict:
    """A shard's (or the store's) statistics: a number for every one of `STAT_KEYS`."""
    for key in STAT_KEYS:
        need(data, key, is_number, "a number", where, prefix + key)
    return data


def read_manifest(path: Path) -> dict | None:
    """The manifest of the store at `path` (None when there is none), every field the writer
    and the reader use checked, so a damaged manifest is one line naming the file and the field."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    manifest = read_json(file, "a store manifest (JSON object)")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise PivotfuseError(f"{path}: not a {FORMAT} v{VERSION} store")
    where = str(file)
    need(manifest, "fingerprint", lambda v: isinstance(v, dict), "a mapping", where)
    need(manifest, "top_k", _positive, "a positive integer", where)
    for key in ("n_rows", "n_shards"):
        need(manifest, key, _nonneg, "a non-negative integer", where)
    need(manifest, "shard_size", _positive, "a positive integer", where)
    dtypes = need(manifest, "dtypes", lambda v: isinstance(v, dict), "a mapping", where)
    for key in ("ids", "spans"):
        need(dtypes, key, lambda v: v in ("uint16", "int32"), "'uint16' or 'int32'", where, f"dtypes.{key}")
    if need(manifest, "complete", lambda v: isinstance(v, bool), "true or false", where):
        _stats(need(manifest, "stats", lambda v: isinstance(v, dict), "a mapping", where), where, "stats.")
    return manifest


class StoreWriter:
    """Creates or resumes a store. Every process of a data-parallel run opens the same store and
    writes the shards it is given; the main process alone writes the manifest."""

    def __init__(self, path: str | Path, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        topk = manifest["dtypes"]
        self.schema = schema(manifest["top_k"], topk["ids"], topk["spans"])

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict, *, top_k: int, n_rows: int, shard_size: int,
             dtypes: dict[str, str], info: dict, is_main: bool) -> "StoreWriter":
        """Create the store, or check that an existing one was made by the same fingerprint (one
        with no finished shard yet is replaced instead: there is nothing in it to keep)."""
        path = Path(path)
        old = read_manifest(path)
        shards = path / "shards"
        if old is not None:
            diff = [key for key in sorted(set(fingerprint) | set(old["fingerprint"]))
                    if fingerprint.get(key) != old["fingerprint"].get(key)]
            if not diff:
                return cls(path, old)
            # A run that stopped before its first shard holds no work: a corrected rerun replaces it
            # (its manifest and any shard stats or half-written shard), rather than being refused.
            unstarted = not old.get("complete") and not (shards.is_dir() and any(shards.glob("*.arrow")))
            if not (unstarted and is_main):
                raise PivotfuseError(
                    f"{path}: store was written for a different {', '.join(diff)} (fingerprint mismatch); "
                    "use another --out or delete the folder")
            for stale in shards.iterdir() if shards.is_dir() else ():
                if stale.is_file() and stale.name[:5].isdigit():
                    stale.unlink()
        elif path.exists() and (not path.is_dir() or any(path.iterdir())) and is_main:
            raise PivotfuseError(f"{path}: exists and is not a logit store; use another --out")
        manifest = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "top_k": top_k,
                    "n_rows": n_rows, "shard_size": shard_size, "n_shards": -(-n_rows // shard_size),
                    "dtypes": dtypes, "complete": False, **info}
        if is_main:
            shards.mkdir(parents=True, exist_ok=True)
            _write_json(path / MANIFEST, manifest)
        return cls(path, manifest)

    def shard_path(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:05d}.arrow"

    def shard_rows(self, shard: int) -> range:
        size = self.manifest["shard_size"]
        return range(shard * size, min(self.manifest["n_rows"], (shard + 1) * size))

    def pending(self) -> list[int]:
        return [s for s in range(self.manifest["n_shards"]) if not self.shard_path(s).is_file()]

    def write_shard(self, shard: int, records: list[TeacherRecord], stats: dict) -> None:
        table = records_to_table(sorted(records, key=lambda r: r.index), self.schema)
        out = self.shard_path(shard)
        _write_json(out.with_suffix(".json"), {k: stats.get(k, 0) for k in STAT_KEYS})

        def write(fh: Any) -> None:
            with pa.ipc.new_stream(fh, self.schema) as writer:
                writer.write_table(table)
        write_with(out, write, fsync=True)

    def finalize(self) -> dict:
        """Sum the shards' statistics into the manifest and mark the store complete (main process)."""
        missing = self.pending()
        if missing:
            raise PivotfuseError(f"{self.path}: shards {missing[:5]} were not written; rerun to resume")
        total = dict.fromkeys(STAT_KEYS, 0)
        for s in range(self.manifest["n_shards"]):
            file = self.shard_path(s).with_suffix(".json")
            stats = _stats(read_json(file, "a mapping of shard statistics"), str(file))
            for key in STAT_KEYS:
                total[key] += stats[key]
        self.manifest.update(complete=True, stats=total)
        _write_json(self.path / MANIFEST, self.manifest)
        return total


class LogitStore:
    """Read a complete store: `store[i]` / iteration give `TeacherRecord`s in corpus order.

    Shards are memory-mapped (`datasets.Dataset.from_file`), so opening costs no reading and
    a record copies only its own rows; `dataset()` gives the whole store as one `datasets.Dataset`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise PivotfuseError(f"{self.path}: not a logit store (no {MANIFEST}); run `pivotfuse extract` first")
        if not manifest.get("complete"):
            raise PivotfuseError(f"{self.path}: store is incomplete; rerun the same extract command to finish it")
        import datasets

        self.manifest = manifest
        self.k: int = manifest["top_k"]
        self.stats: dict = manifest["stats"]
        self._shards = [datasets.Dataset.from_file(str(self.path / "shards" / f"{s:05d}.arrow"))
                        for s in range(manifest["n_shards"])]
        self._starts = np.cumsum([0] + [len(d) for d in self._shards])
        self._by_id: dict[str, int] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __iter__(self) -> Iterator[TeacherRecord]:
        return (self[i] for i in range(len(self)))

    def dataset(self):  # -> datasets.Dataset
        import datasets

        return datasets.concatenate_datasets(self._shards)

    def nbytes(self) -> int:
        """Bytes on disk of the shard files."""
        return sum((self.path / "shards" / f"{s:05d}.arrow").stat().st_size for s in range(len(self._shards)))

    def index_of(self, conv_id: str) -> int:
        if self._by_id is None:
            self._by_id = {str(c): i for i, c in enumerate(self.dataset().data.column("id").to_pylist())}
        if conv_id not in self._by_id:
            raise KeyError(conv_id)
        return self._by_id[conv_id]

    def __getitem__(self, i: int) -> TeacherRecord:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        row = self._shards[s].data.table.slice(i - int(self._starts[s]), 1)

        def col(name: str, width: int | None = None, dtype: Any = np.int32) -> np.ndarray:
            arr = row.column(name).combine_chunks().flatten()  # the row's list values
            if width is not None:
                arr = arr.flatten()
            out = arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
            return out.reshape(-1, width) if width is not None else out

        scalar = {name: row.column(name)[0].as_py() for name in
                  ("index", "id", "domain", "text", "ce", "n_chars", "n_bytes", "seq_len", "truncated")}
        return TeacherRecord(
            assistant_spans=col("assistant_spans", 2), token_ids=col("token_ids"), spans=col("spans", 2),
            topk_ids=col("topk_ids", self.k), topk_logprobs=col("topk_logprobs", self.k, np.float16),
            gold_logprobs=col("gold_logprobs", None, np.float16), **scalar)
