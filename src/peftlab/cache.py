"""Compute once, reuse: tensors that are a pure function of (model state, data, settings), cached in one file.

`cached_tensors(path, fingerprint, compute)` returns the tensors stored at `path` when they were computed for the
same fingerprint, else calls `compute()` and stores what it returns there. The fingerprint is a JSON-able
description of every input the tensors depend on: a digest of the model's weights (`state_digest`, or
`file_digest` of its checkpoint files), of the data, and the settings. Its sha256 (`fingerprint_digest`) decides
whether an entry is current; the fingerprint itself is stored too, so a user can see what an entry was computed
for (`stored_fingerprint`).

Design choices, and why:
- the fingerprint lives in the safetensors file's own metadata, so tensors and fingerprint are written by one
  atomic rename (`fileio.atomic_write_file`) and can never disagree, whenever the process is killed;
- one entry per path: a changed input recomputes and replaces it. Callers give inputs they switch between their
  own paths (distillation: one file per split); keeping every fingerprint would grow a run directory by one
  entry per retrained teacher, and a stale entry is never needed again;
- a file that cannot be read (truncated, overwritten, disk error) is an error naming it and the fix, not a silent
  recompute: recomputing over it would hide the damage and cost a full teacher pass without saying why;
- a readable safetensors file without a fingerprint (a cache written by peftlab before this module) is stale and
  is recomputed: caches are disposable;
- loading goes through safetensors only, so nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from peftlab.errors import PeftlabError
from peftlab.fileio import atomic_write_file

FORMAT = "peftlab-tensor-cache/1"
Tensors = dict[str, torch.Tensor]


def canonical_json(fingerprint: Mapping) -> str:
    """The one text of a fingerprint: sorted keys, tuples as lists, so equal inputs give equal digests."""
    return json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))


def fingerprint_digest(fingerprint: Mapping) -> str:
    """sha256 (hex) of the fingerprint's canonical JSON."""
    return hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in blocks (checkpoints and data files may be large)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def state_digest(module: torch.nn.Module) -> str:
    """sha256 (hex) of a module's state: the name, dtype, shape and bytes of every entry of its state_dict.

    What a cache of the module's outputs depends on (reference log-probabilities, demonstration prefixes): two
    modules with the same digest compute the same outputs from the same inputs. Adapter weights are part of the
    state, so a trained adapter and a fresh one differ.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{values.dtype}|{tuple(values.shape)}|".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bfloat16 included)
    return digest.hexdigest()


def cached_tensors(path: Path, fingerprint: Mapping, compute: Callable[[], Tensors]) -> Tensors:
    """The tensors at `path` if they were computed for `fingerprint`, else `compute()`'s, stored at `path` first.

    `fingerprint` must be JSON-able. Stored tensors come back on the CPU; a fresh result is returned as computed.
    A damaged file at `path` is a PeftlabError naming it (delete it to recompute).
    """
    path = Path(path)
    digest = fingerprint_digest(fingerprint)
    if path.exists() and _metadata(path).get("fingerprint_sha256") == digest:
        with _opened(path) as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    tensors = compute()
    metadata = {"format": FORMAT, "fingerprint": canonical_json(fingerprint), "fingerprint_sha256": digest}
    contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}  # safetensors needs it
    atomic_write_file(path, lambda temporary: save_file(contiguous, temporary, metadata=metadata))
    return tensors


def stored_fingerprint(path: Path) -> dict | None:
    """The fingerprint the entry at `path` was computed for; None when there is no entry or it has none."""
    path = Path(path)
    if not path.exists():
        return None
    metadata = _metadata(path)
    return json.loads(metadata["fingerprint"]) if "fingerprint" in metadata else None


@contextmanager
def _opened(path: Path) -> Iterator:
    """A safetensors handle on `path`; any failure to read it is a PeftlabError naming the file and the fix."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except (OSError, SafetensorError) as error:
        raise PeftlabError(f"cannot read the cache {path}: {error}. Fix: delete {path}; it is recomputed on the "
                           "next run") from None


def _metadata(path: Path) -> dict[str, str]:
    """A cache file's metadata, checked against its own checksum; {} for a safetensors file that is not ours."""
    with _opened(path) as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        return {}
    stored = metadata.get("fingerprint", "").encode()  # canonical JSON, as `fingerprint_digest` hashes it
    if hashlib.sha256(stored).hexdigest() != metadata.get("fingerprint_sha256"):
        raise PeftlabError(f"the cache {path} is damaged: its fingerprint does not match its checksum. Fix: delete "
                           f"{path}; it is recomputed on the next run")
    return metadata
