"""Reading and writing safetensors files one tensor at a time, with bounded memory.

The ``safetensors`` library maps a whole file into memory and writes a file from a complete
dict of tensors. Both are wrong for a 13.5 GB checkpoint on a 24 GB machine: pages of a
mapped file that were read count as the process's resident memory until the file is closed,
and the dict of a whole output shard is gigabytes. The format is simple (an 8-byte header
length, a JSON header of names, dtypes, shapes and byte offsets, then the raw bytes), so here
tensors are read with plain positioned reads and shards are written from a layout fixed in
advance, tensor by tensor. The files are ordinary safetensors files; the tests read them back
with the ``safetensors`` library.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from monarchify.errors import ModelLoadError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
"""The safetensors library's own limit on the JSON header."""
INDEX_FILE = "model.safetensors.index.json"
T = TypeVar("T")
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of its data in the file."""
    nbytes: int


def read_header(file: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors of a safetensors file (in the order of their data) and its metadata;
    a damaged header is reported by file name."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(MAX_HEADER, size - 8):
                raise ValueError("header length out of range")
            header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            if 8 + length + end > size or end - begin != _numel(shape) * _itemsize(dtype):
                raise ValueError(f"tensor '{name}' lies outside the file or has the wrong size")
            tensors[name] = StoredTensor(file, name, dtype, shape, 8 + length + begin, end - begin)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelLoadError(f"'{file}' is not a valid safetensors file (corrupt or truncated): {exc}") from None
    return dict(sorted(tensors.items(), key=lambda item: item[1].start)), metadata


def checkpoint_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of a model folder: the files its index names, or its single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"'{index}' is not a valid safetensors index: {exc}") from None
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ModelLoadError(f"'{folder}' has no {SINGLE_FILE} and no {INDEX_FILE}")
    tensors: dict[str, StoredTensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ModelLoadError(f"'{index}' names the weight file '{name}', which is missing")
        tensors.update(read_header(path)[0])
    return tensors


def read_tensor(stored: StoredTensor) -> torch.Tensor:
    """One tensor, read into fresh memory (no mapping of the file)."""
    out = torch.empty(stored.shape, dtype=stored.dtype)
    if stored.nbytes:
        with open(stored.file, "rb") as handle:
            handle.seek(stored.start)
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            if handle.readinto(view) != stored.nbytes:
                raise ModelLoadError(f"'{stored.file}' is truncated (tensor '{stored.name}')")
    return out


@dataclass(frozen=True)
class Planned:
    """A tensor a shard will hold, known before it is computed."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)


class ShardWriter:
    """Writes one safetensors file whose tensors are fixed in advance, one :meth:`write` at a
    time, in the planned order, into ``<file>.tmp``; :meth:`close` renames it into place only
    when every tensor was written, so a finished name always means a finished file."""

    def __init__(self, file: Path, tensors: Iterable[Planned], metadata: dict[str, str] | None = None) -> None:
        self.file = file
        self.plan = list(tensors)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for t in self.plan:
            header[t.name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
        self.tmp = file.with_name(file.name + ".tmp")
        self.handle = open(self.tmp, "wb")
        self.handle.write(struct.pack("<Q", len(text)) + text)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.plan[self.next]
        if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(f"shard writer expected {expected}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if expected.nbytes:
            data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
            self.handle.write(memoryview(data.numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.plan):
            raise RuntimeError(f"shard {self.file.name} closed after {self.next} of {len(self.plan)} tensors")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.tmp.replace(self.file)

    def abort(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def pack_shards(items: Iterable[T], nbytes: Callable[[T], int], max_bytes: int) -> list[list[T]]:
    """``items`` in order, cut into shards of at most ``max_bytes`` (an item larger than that
    fills a shard alone): how both the streaming conversion and densify lay out their output."""
    shards: list[list[T]] = [[]]
    size = 0
    for item in items:
        n = nbytes(item)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, ``model-0000k-of-0000n.safetensors`` for more, as
    ``save_pretrained`` names them."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def parse_size(size: int | str) -> int:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"20KB"`` (powers of ten, as transformers reads them) or an int."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
