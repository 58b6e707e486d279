"""All file IO of the merger: a lazy reader of single/sharded safetensors checkpoints, an
atomic-friendly sharded writer (headers planned up front, so tensors can land in any order
and an interrupted merge can resume), and copying of the non-weight files of a model folder.

Tensors are read with `preadv` into caller-owned buffers rather than through mmap: mapped
pages of every input would otherwise count towards the process's resident memory, which
is what a merger of 7B–70B models must keep small. The format is parsed here (8-byte
little-endian header length, JSON header, raw little-endian data) so every malformed file
gets a one-line error naming the model, file and tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from core.errors import PivotfuseError
from core.files import read_json

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024
_MAX_IO = 1 << 30  # bytes per preadv/pwrite call (Linux caps one call at ~2 GiB)
_BLOCK = 1 << 20  # elements per block when converting dtypes on the way in or out
# Files copied from the base next to the merged weights: config, tokenizer, chat template, custom code.
AUX_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json",
             "merges.txt", "preprocessor_config.json", "processor_config.json")
AUX_PATTERNS = ("tokenizer*", "vocab.*", "chat_template*", "*.jinja", "*.tiktoken", "*.model",
                "configuration_*.py", "modeling_*.py", "tokenization_*.py")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, absolute byte offset and size, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _read_header(path: Path, label: str) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and check one safetensors header; raise a one-line error on any inconsistency."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PivotfuseError(f"model {label}: file {path.name} is not a valid safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise PivotfuseError(f"model {label}: file {path.name} is corrupt (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            info = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
            if not 0 <= begin <= end <= data_len or end - begin != info.numel * dtype.itemsize:
                raise ValueError(f"data offsets {entry['data_offsets']} do not match shape {list(shape)} "
                                 f"{entry['dtype']} in a {data_len}-byte data section")
        except (KeyError, TypeError, ValueError) as e:
            raise PivotfuseError(f"model {label}: file {path.name} is corrupt at tensor {name} ({e})") from None
        out[name] = info
    return out, meta


class SafetensorsReader:
    """Lazy reader of a Hugging Face folder's safetensors weights (one file or an index + shards).

    Only headers are read on open; `read` fetches one tensor. Safe to use from several threads.
    """

    def __init__(self, folder: str | Path, label: str | None = None) -> None:
        self.folder = Path(folder)
        self.label = label or str(folder)
        if not self.folder.is_dir():
            raise PivotfuseError(f"model {self.label}: folder not found")
        index = self.folder / INDEX_NAME
        infos: dict[str, TensorInfo] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (ValueError, KeyError, AssertionError, TypeError):
                raise PivotfuseError(f"model {self.label}: {INDEX_NAME} is corrupt (no 'weight_map' mapping)") from None
            headers: dict[str, dict[str, TensorInfo]] = {}
            for name, shard in weight_map.items():
                self._check_shard_name(index, name, shard)
                if shard not in headers:
                    path = self.folder / shard
                    if not path.is_file():
                        raise PivotfuseError(f"model {self.label}: missing shard {shard} (holds tensor {name})")
                    headers[shard] = _read_header(path, self.label)[0]
                if name not in headers[shard]:
                    raise PivotfuseError(f"model {self.label}: tensor {name} is listed in {INDEX_NAME} "
                                         f"but missing from {shard}")
                infos[name] = headers[shard][name]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if len(files) != 1:
                what = "no *.safetensors file" if not files else f"{len(files)} safetensors files but no {INDEX_NAME}"
                raise PivotfuseError(f"model {self.label}: {what} in {self.folder}")
            infos = _read_header(files[0], self.label)[0]
        # Read in file order: sequential IO, and the order save_pretrained wrote the model in.
        self.infos = dict(sorted(infos.items(), key=lambda kv: (str(kv[1].file), kv[1].offset)))
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _check_shard_name(self, index: Path, name: str, shard: object) -> None:
        """A shard must be a file name inside the model folder: an index is input we do not trust,
        and `../other/model.safetensors` or an absolute path would read another model's weights.
        Checked on the name as written, not the resolved path, so symlinked shards (the Hub
        cache's snapshot folders link every file to ../../blobs) stay readable."""
        where = f"model {self.label}: {index} field 'weight_map.{name}'"
        parts = PurePosixPath(shard.replace("\\", "/")).parts if isinstance(shard, str) else ()
        if not parts:
            raise PivotfuseError(f"{where} must be a shard file name, got {shard!r}")
        if parts[0] == "/" or ".." in parts:
            raise PivotfuseError(f"{where} names shard {shard!r} outside the model folder")

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor `name` into contiguous `out` (same number of elements).

        Same dtype: the bytes land in `out` directly. Otherwise they are read and converted
        block by block, so no full-size temporary of the stored dtype is ever allocated.
        """
        info = self.infos[name]
        if out.numel() != info.numel:
            raise PivotfuseError(f"model {self.label}: tensor {name} has shape {list(info.shape)}, "
                                 f"expected {out.numel()} elements")
        flat = out.view(-1)
        if out.dtype == info.dtype or not info.numel:
            self._pread(info, flat.view(torch.uint8).numpy(), 0)
            return out
        block = min(info.numel, _BLOCK)
        raw = torch.empty(block, dtype=info.dtype)
        for start in range(0, info.numel, block):
            n = min(block, info.numel - start)
            self._pread(info, raw[:n].view(torch.uint8).numpy(), start * info.dtype.itemsize)
            flat[start:start + n].copy_(raw[:n])
        return out

    def _pread(self, info: TensorInfo, buf, skip: int) -> None:
        """Fill byte buffer `buf` from tensor `info`'s data, starting `skip` bytes in."""
        fd, done, size = self._fd(info.file), 0, buf.nbytes
        while done < size:
            n = os.preadv(fd, [buf[done:done + _MAX_IO]], info.offset + skip + done)
            if n <= 0:
                raise PivotfuseError(f"model {self.label}: file {info.file.name} is truncated "
                                     f"(tensor {info.name} ends past the end of the file)")
            done += n

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read tensor `name` (optionally converted to `dtype`) into a new tensor."""
        info = self.infos[name]
        out = torch.empty(info.shape, dtype=dtype or info.dtype)
        return self.read_into(name, out)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]], meta: dict) -> bytes:
    header = {"__metadata__": meta}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes a planned list of tensors into safetensors shards, in any order, from any thread.

    The plan (names, dtypes, shapes) fixes every shard's header and every tensor's byte offset
    before the first tensor is written, so `write` is a positioned write and a rerun over the
    same folder (`resume=True`) keeps what an interrupted run already wrote.
    """

    def __init__(self, folder: str | Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 shard_bytes: int, metadata: dict[str, str] | None = None, resume: bool = False) -> None:
        self.folder = Path(folder)
        meta = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in plan:
            n = dtype.itemsize
            for d in shape:
                n *= d
            if shards[-1] and used + n > shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, tuple(shape), n))
            used += n
        total = len(shards)
        self.files: list[Path] = []
        self.slots: dict[str, tuple[int, int, int, torch.dtype]] = {}  # name -> (shard, offset, nbytes, dtype)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._fds: list[int] = []
        for i, shard in enumerate(shards):
            fname = SINGLE_NAME if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            entries, pos = [], 0
            for name, dtype, shape, n in shard:
                entries.append((name, dtype, shape, pos, pos + n))
                pos += n
            head = _header_bytes(entries, meta)
            path = self.folder / fname
            fresh = True
            if resume and path.is_file() and path.stat().st_size == len(head) + pos:
                with path.open("rb") as fh:  # same plan -> same header: keep what was written
                    fresh = fh.read(len(head)) != head
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if fresh:
                os.ftruncate(fd, 0)
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, len(head) + pos)
            self._fds.append(fd)
            self.files.append(path)
            for name, dtype, _, begin, end in entries:
                self.slots[name] = (i, len(head) + begin, end - begin, dtype)
                self.weight_map[name] = fname
                self.total_size += end - begin

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` (planned size; converted block by block to the planned dtype) into its slot."""
        shard, offset, nbytes, dtype = self.slots[name]
        flat = tensor.contiguous().view(-1)
        if flat.numel() * dtype.itemsize != nbytes:
            raise ValueError(f"{name}: {flat.numel()} elements of {dtype} do not fill {nbytes} planned bytes")
        if flat.dtype == dtype or not nbytes:
            self._pwrite(shard, flat.view(torch.uint8).numpy(), offset)
            return
        block = min(flat.numel(), _BLOCK)
        scratch = torch.empty(block, dtype=dtype)
        for start in range(0, flat.numel(), block):
            n = min(block, flat.numel() - start)
            scratch[:n].copy_(flat[start:start + n])
            self._pwrite(shard, scratch[:n].view(torch.uint8).numpy(), offset + start * dtype.itemsize)

    def _pwrite(self, shard: int, data, offset: int) -> None:
        done = 0
        while done < data.nbytes:
            done += os.pwrite(self._fds[shard], data[done:done + _MAX_IO], offset + done)

    def close(self) -> None:
        """Close the shard files (idempotent)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def write_index(self) -> None:
        """Write model.safetensors.index.json (only when there are several shards)."""
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(src: str | Path, dst: str | Path, dtype: str | None = None) -> list[str]:
    """Copy config, generation config, tokenizer and chat-template files of `src` into `dst`.

    With `dtype` the copied config.json says so (the weights were cast). Returns the names copied.
    """
    src, dst = Path(src), Path(dst)
    names = {p.name for p in src.iterdir() if p.is_file() and (
        p.name in AUX_FILES or any(p.match(pat) for pat in AUX_PATTERNS))}
    names -= {INDEX_NAME}
    for name in sorted(names):
        shutil.copy2(src / name, dst / name)
    cfg = dst / "config.json"
    if dtype and cfg.is_file():
        data = read_json(src / "config.json", "a model config (JSON object)")  # the base's: errors name it
        keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
        for k in keys:
            data[k] = dtype
        cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return sorted(names)
