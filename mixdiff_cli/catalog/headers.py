"""Safetensors files read from their headers: the JSON header and its checks, a few scalars, file hashes;
pickles refused. A ``.safetensors`` file is 8 bytes of little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``) and the raw data
(https://github.com/huggingface/safetensors#format)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from mixdiff_cli.core.errors import MixdiffError

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library refuses headers above 100 MB too


class NotSafetensors(MixdiffError):
    pass



class CorruptSafetensors(MixdiffError):
    pass



class PickleRefused(MixdiffError):
    pass




# ---------------------------------------------------------------------------------------------
# hashing


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def known_sha256(path: str | Path) -> str:
    """`sha256_file`, remembered per user by (real path, size, mtime) as A1111's cache.json does, so that
    checking a file before each use costs one stat once its hash is known."""
    import json
    import os

    from mixdiff_cli.catalog.discovery import user_data_dir
    from mixdiff_cli.core.fsutil import atomic_write

    real, stat = os.path.realpath(path), os.stat(path)
    key = f"{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = user_data_dir() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(real)
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == key:
        return str(entry[1])
    digest = sha256_file(path)
    cache[real] = [key, digest]
    try:
        atomic_write(cache_file, json.dumps(cache))
    except (OSError, MixdiffError):
        pass  # a read-only home or a full disk: hash again next time
    return digest


def autov2(sha: str) -> str:
    """A1111/Civitai "AutoV2" short hash: the first 10 hex digits of the file's sha256."""
    return sha[:10]


# ---------------------------------------------------------------------------------------------
# safetensors header


_PICKLE_HINT = (
    "convert it once where you trust the file: python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('x.ckpt', map_location='cpu', weights_only=True); "
    "st.save_file(sd.get('state_dict', sd), 'x.safetensors')\""
)


def _looks_pickled(head: bytes) -> bool:
    # torch.save zip archives start with "PK\x03\x04"; pickles of protocol 2+ with "\x80" and the protocol
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def read_header(file: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensors, metadata) of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}``."""
    file = Path(file)
    if file.exists() and not file.is_file():  # a FIFO or device named x.safetensors would block the read
        raise NotSafetensors(f"{file} is not a regular file", "point at a .safetensors file")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        plausible = len(head) == 9 and head[8:9] == b"{" and 2 <= n <= MAX_HEADER
        if not plausible:
            if _looks_pickled(head):
                raise PickleRefused(f"{file} is a pickled PyTorch checkpoint despite its name; mixdiff never unpickles", _PICKLE_HINT)
            raise NotSafetensors(
                f"{file} is not a safetensors file (no JSON header after the 8-byte length)",
                "point at a .safetensors weights file; export others with safetensors.torch.save_file",
            )
        if 8 + n > size:
            raise CorruptSafetensors(
                f"{file} is truncated: its header is {n} bytes but only {size - 8} follow the length",
                "the file is incomplete or damaged; download or copy it again",
            )
        raw = head[8:] + f.read(n - 1)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptSafetensors(f"{file} has a damaged header (not valid JSON)", "download or copy it again") from None
    if not isinstance(header, dict):
        raise CorruptSafetensors(f"{file} has a damaged header (not a JSON object)", "download or copy it again")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptSafetensors(f"{file} has a damaged header (__metadata__ is not a map of strings)", "download or copy it again")
    end = _check_tensors(file, header)
    if 8 + n + end > size:
        raise CorruptSafetensors(
            f"{file} is truncated: its header describes {end} bytes of tensor data but the file holds {size - 8 - n}",
            "the file is incomplete or damaged; download or copy it again",
        )
    if 8 + n + end < size:
        raise CorruptSafetensors(
            f"{file} has {size - 8 - n - end} bytes after the {end} bytes of tensor data its header describes",
            "the file is damaged or was written by a broken tool; export it again with safetensors",
        )
    return header, metadata


# Bits per element of every safetensors dtype (the safetensors 0.8 parser knows exactly these 22).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip


def _tensor_error(file: Path, name: str, problem: str) -> CorruptSafetensors:
    return CorruptSafetensors(f"{file} has a malformed header: tensor {name!r} {problem}", "the file is damaged or was written by a broken tool; export it again with safetensors")


def _check_tensors(file: Path, header: dict) -> int:
    """Validate every entry as strictly as the safetensors parser does; returns the data section's length.

    Each tensor names a known dtype, a shape of non-negative integers whose byte size fits 64 bits and
    equals its ``data_offsets`` span, and the spans tile the data section from 0 without gap or overlap.
    """
    spans = []
    for name, t in header.items():
        if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= set(t):
            raise _tensor_error(file, name, "lacks a dtype, shape or data_offsets")
        dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise _tensor_error(file, name, f"has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise _tensor_error(file, name, f"has a shape that is not a list of integers ({shape!r})")
        if any(d < 0 for d in shape):
            raise _tensor_error(file, name, f"has a negative shape {shape}")
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)
        if not ok or offsets[1] < offsets[0]:
            raise _tensor_error(file, name, f"has invalid data_offsets {offsets!r}")
        bits = DTYPE_BITS[dtype]
        for d in shape:
            bits *= d
        if bits >= 1 << 64:
            raise _tensor_error(file, name, f"has a shape {shape} whose size overflows")
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise _tensor_error(file, name, f"has shape {shape} ({bits / 8:g} bytes of {dtype}) but {offsets[1] - offsets[0]} bytes of data")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _tensor_error(file, name, f"starts at byte {begin} of the data, " + ("overlapping another tensor" if begin < position else f"leaving a gap after byte {position}"))
        position = end
    return position


_SCALAR = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def _read_scalars(file: Path, header: dict[str, dict], names: list[str]) -> list[float]:
    """The values of one-element tensors (kohya ``.alpha``), each read with a seek and a few bytes."""
    out = []
    with open(file, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name in names:
            t = header[name]
            if any(d != 1 for d in t["shape"]):  # kohya writes a scalar, shape [] (older files [1])
                raise _tensor_error(file, name, f"has shape {t['shape']}; an alpha is one number")
            begin, end = t["data_offsets"]
            f.seek(data_start + begin)
            raw = f.read(end - begin)
            if t["dtype"] == "BF16":  # bfloat16 is the top half of a float32
                out.append(struct.unpack("<f", b"\x00\x00" + raw[:2])[0])
            elif t["dtype"] in _SCALAR:
                out.append(float(struct.unpack_from(_SCALAR[t["dtype"]], raw)[0]))
    return out


