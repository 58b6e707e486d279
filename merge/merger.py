"""The streaming merger: check every input's headers (names, shapes, tied heads) before any
work, then run the read → merge → write pipeline (`merge.stream`) into a hidden
`.NAME.partial` folder next to `out`. Its planned shard layout and progress log let an
interrupted merge resume where it stopped; it is renamed to `out` only when complete, with the
base's config/tokenizer files and a model card. `merge_models` is the entry point.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.atomic import publish_folder, write_text
from core.errors import PivotfuseError
from core.fingerprint import file_stamp, json_sha
from core.files import is_number_list, need, read_json, read_jsonl_resumable
from core.loading import refuse_file_as_folder
from merge import card, methods
from merge.config import MergeConfig, parse_size
from merge.io import SafetensorsReader, ShardedWriter, copy_aux_files
from merge.parallel import compute_threads
from merge.stream import Item, stream

# Output heads that `tie_word_embeddings` models omit: a model without one uses its input embedding.
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings)\.weight$")
_STATE, _LOG = ".pivotfuse-merge.json", ".progress.jsonl"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tied_source(name: str, reader: SafetensorsReader, shape: tuple[int, ...]) -> str | None:
    """For a head the model ties to its input embedding (so did not save), that embedding's name."""
    if not _HEAD.search(name):
        return None
    for other, info in reader.infos.items():
        if _EMBED.search(other) and info.shape == shape:
            return other
    return None


def _kind(dtype: torch.dtype) -> str:
    """'float', 'bool' or 'integer': dtypes of one kind convert into each other without change of meaning."""
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "integer"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_merge(base: SafetensorsReader, models: list[SafetensorsReader], dtype: str | None) -> list[Item]:
    """Check every model has the base's tensors with the base's shapes; return the work list."""
    k = len(models)
    items = []
    for name, info in base.infos.items():
        sources = []
        for r in models:
            src = name if name in r.infos else _tied_source(name, r, info.shape)
            if src is None:
                raise PivotfuseError(f"model {r.label}: tensor {name} is missing (base {base.label} has it)")
            if r.infos[src].shape != info.shape:
                raise PivotfuseError(f"model {r.label}: tensor {name} has shape {list(r.infos[src].shape)}, "
                                     f"base {base.label} has {list(info.shape)}")
            if _kind(r.infos[src].dtype) != _kind(info.dtype):
                # an integer tensor would be read as floats and merged (or a float one dropped
                # for the base's buffer): the two checkpoints do not hold the same thing
                raise PivotfuseError(f"model {r.label}: tensor {name} is {_dtype_name(r.infos[src].dtype)}, "
                                     f"base {base.label} has {_dtype_name(info.dtype)} "
                                     f"({_kind(r.infos[src].dtype)} vs {_kind(info.dtype)})")
            sources.append(src)
        merge = info.dtype.is_floating_point
        out_dtype = _DTYPES[dtype] if (dtype and merge) else info.dtype
        same = all(r.infos[src].dtype == info.dtype for r, src in zip(models, sources))
        buf_dtype = info.dtype if (merge and same) else torch.float32
        n, size = info.numel, buf_dtype.itemsize
        nbytes = (k + 1) * n * size + (n * out_dtype.itemsize if out_dtype != buf_dtype else 0) + n
        items.append(Item(name, info.shape, sources, out_dtype, merge, buf_dtype,
                           nbytes if merge else 2 * info.nbytes))
    for r in models:
        for name in r.infos:
            if name not in base.infos:
                hint = " (the base ties it to its input embedding)" if _HEAD.search(name) else ""
                raise PivotfuseError(f"model {r.label}: tensor {name} is not in base {base.label}{hint}")
    return items


def _fingerprint(base: SafetensorsReader, models: list[SafetensorsReader], config: MergeConfig) -> str:
    """Same inputs (paths, sizes, mtimes) and options -> same partial output, safe to resume."""
    files = [file_stamp(f, str(f.resolve())) for r in [base, *models] for f in sorted({i.file for i in r.infos.values()})]
    return json_sha({"v": 1, "config": dataclasses.asdict(config), "files": files})


def _check_paths(base: Path, models: list[Path], out: Path, overwrite: bool) -> None:
    for p in [base, *models]:
        if out == p or out in p.parents or p in out.parents:
            raise PivotfuseError(f"out: {out} overlaps input model folder {p}; inputs are never modified")
    if out.exists() and not out.is_dir():
        raise PivotfuseError(f"out: {out} is a file, not a folder")
    if out.exists() and not overwrite:
        raise PivotfuseError(f"out: {out} already exists (pass --overwrite to replace it)")


def merge_models(base: str, models: list[str], config: MergeConfig, out: str, overwrite: bool = False, *,
                 progress: bool = True, threads: int | None = None, buffer_bytes: int | None = None) -> dict:
    """Merge `models` (task vectors relative to `base`) with `config`; write a HF folder at `out`.

    Returns a summary: output path, method, tensor/parameter counts, seconds spent reading,
    computing and writing (threads overlap, so they may add up to more than `total`), and the
    per-tensor weights. Raises `PivotfuseError` (one line, naming model and tensor) on bad input.
    """
    t_start = time.perf_counter()
    if not models:
        raise PivotfuseError("models: at least one model is required")
    if threads is not None and threads < 1:  # 0 or less would silently mean torch's default
        raise PivotfuseError(f"threads: must be at least 1, got {threads}")
    weights = list(config.weights) if config.weights is not None else [1.0] * len(models)
    if len(weights) != len(models):
        raise PivotfuseError(f"weights: {len(weights)} given for {len(models)} models")
    for label, folder in [("base", base), *(("models", m) for m in models)]:
        refuse_file_as_folder(folder, label)  # clearer than "folder not found"
    out_p = Path(out).resolve()
    _check_paths(Path(base).resolve(), [Path(m).resolve() for m in models], out_p, overwrite)
    base_r = SafetensorsReader(base)
    readers = [SafetensorsReader(m) for m in models]
    try:
        items = plan_merge(base_r, readers, config.dtype)
        return _run(base_r, readers, items, config, weights, out_p, progress, threads, buffer_bytes, t_start)
    finally:
        for r in [base_r, *readers]:
            r.close()


def _check_record(rec: dict, where: str) -> None:
    """A progress record: the tensor's name and, for merged tensors, per-model numbers."""
    need(rec, "name", lambda v: isinstance(v, str), "a string", where)
    for key in ("weights", "kept"):
        if rec.get(key) is not None:
            need(rec, key, is_number_list, "a list of numbers", where)


def _open_partial(tmp: Path, fingerprint: str) -> dict[str, dict]:
    """Reuse `tmp` when it holds an interrupted merge with the same fingerprint (returning the
    records of the tensors it wrote), else start it afresh. A damaged state or progress file is a
    one-line error: it would name tensors as written that may not be."""
    state, log = tmp / _STATE, tmp / _LOG
    done: dict[str, dict] = {}
    resume, torn = False, False
    if tmp.is_dir() and state.is_file():
        try:
            saved = need(read_json(state, "a merge state (JSON object)"), "fingerprint", lambda v: isinstance(v, str),
                         "a string", str(state))
            if saved == fingerprint:
                rows, torn = read_jsonl_resumable(log)  # a torn last line: redo from there
                for n, rec in rows:
                    _check_record(rec, f"{log}:{n}")
                    done[rec["name"]] = rec
                resume = True
        except PivotfuseError as e:
            raise PivotfuseError(f"{e}; delete {tmp} to start the merge over") from None
    if torn:  # drop the torn line, so that this run's records start on a line of their own
        write_text(log, "".join(json.dumps(rec) + "\n" for _, rec in rows))
    if not resume and tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    write_text(state, json.dumps({"fingerprint": fingerprint}))
    return done


def _publish(tmp: Path, out: Path) -> None:
    """Rename the complete `tmp` folder to `out` (swapping out an existing one for --overwrite)."""
    (tmp / _STATE).unlink()
    (tmp / _LOG).unlink()
    publish_folder(tmp, out)


def _run(base_r: SafetensorsReader, readers: list[SafetensorsReader], items: list[Item], config: MergeConfig,
         weights: list[float], out_p: Path, progress: bool, threads: int | None, buffer_bytes: int | None,
         t_start: float) -> dict:
    tmp = out_p.parent / f".{out_p.name}.partial"
    done = _open_partial(tmp, _fingerprint(base_r, readers, config))
    writer = ShardedWriter(tmp, [(it.name, it.out_dtype, it.shape) for it in items], parse_size(config.shard_size),
                           {"pivotfuse_merge": config.method}, resume=bool(done))
    todo = [it for it in items if it.name not in done]
    args = methods.MethodArgs(weights=tuple(weights), select_topk=config.select_topk, sce_mask=config.sce_mask,
                              density=config.density, normalize=config.resolved_normalize(),
                              rescale=config.rescale, scale=config.scale, seed=config.seed)
    # the reader may hold at most the working set of the largest tensor: the peak is that one
    # tensor, and small tensors are read ahead while others are merged
    limit = buffer_bytes or max([32 << 20] + [it.nbytes for it in items])
    bar = tqdm(total=len(items), initial=len(done), unit="tensor", desc=f"merge {config.method}",
               disable=not progress)
    try:
        with compute_threads(threads or torch.get_num_threads()):
            secs = stream(base_r, readers, todo, methods.METHODS[config.method], args, writer, tmp / _LOG,
                           done, limit, bar)
    except PivotfuseError:
        shutil.rmtree(tmp, ignore_errors=True)  # bad input: nothing worth resuming
        raise
    finally:
        bar.close()
        writer.close()
    if len(done) != len(items):
        raise PivotfuseError(f"merge stopped after {len(done)} of {len(items)} tensors (rerun to resume)")
    writer.write_index()
    summary = {
        "out": str(out_p), "method": config.method, "config": dataclasses.asdict(config),
        "base": str(base_r.folder.resolve()), "models": [str(r.folder.resolve()) for r in readers],
        "tensors": len(items), "params": sum(int(torch.Size(it.shape).numel()) for it in items),
        "resumed": len(items) - len(todo), "copied": copy_aux_files(base_r.folder, tmp, config.dtype),
        "seconds": {**{key: round(v, 3) for key, v in secs.items()},
                    "total": round(time.perf_counter() - t_start, 3)},
        "per_tensor": {name: {"weights": rec.get("weights"), "kept": rec.get("kept")}
                       for name, rec in done.items() if "weights" in rec},
    }
    card.write_card(tmp, summary)
    _publish(tmp, out_p)
    summary["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
    return summary
