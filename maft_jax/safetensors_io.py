"""Reading and writing the safetensors format with numpy (bf16 via ml_dtypes).

The format is: 8-byte little-endian header length N, N bytes of JSON mapping
tensor names to {dtype, shape, data_offsets}, then the raw little-endian data.
We read through one memory map per file, so an 8B checkpoint is not copied
into host memory before it is needed, and every inconsistency (truncation,
bad header, wrong sizes) is reported with the file's path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from maft_jax import files

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
  pass


def read_header(path: str) -> tuple[dict, int]:
  """The JSON header and the byte offset where tensor data starts."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, "
                             "shorter than the 8-byte header length)")
    n = int.from_bytes(head, "little")
    if 8 + n > size:
      raise SafetensorsError(f"{path}: truncated safetensors file: header claims "
                             f"{n} bytes but the file has {size} bytes")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{path}: corrupt safetensors header: {e}") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
  return header, 8 + n


def read(path: str) -> dict[str, np.ndarray]:
  """All tensors of one file as read-only numpy views of a memory map."""
  header, data_start = read_header(path)
  size = os.path.getsize(path)
  buf = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = _DTYPES[info["dtype"]]
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from None
    if data_start + end > size:
      raise SafetensorsError(
          f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to "
          f"{data_start + end}, the file has {size}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != nbytes:
      raise SafetensorsError(f"{path}: tensor {name!r} has {end - begin} bytes for shape "
                             f"{shape} of {info['dtype']} ({nbytes} expected)")
    out[name] = buf[data_start + begin:data_start + end].view(dtype).reshape(shape)
  return out


def write(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
  """Write tensors (any order) to one safetensors file, atomically."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {a.dtype}")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
  with files.atomic(path) as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for a in arrays:
      f.write(a.reshape(-1).view(np.uint8).data)
