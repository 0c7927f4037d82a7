"""Integrity manifests of checkpoint steps: the size and SHA-256 of every file and the shape and
dtype of every array, written before Orbax commits a step and verified before a restore.

See `gmpo_jax.infra.checkpointing.manager` for when each is written and checked.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

MANIFEST_FILE = "gmpo_manifest.json"


_MANIFEST_FORMAT = "gmpo_jax.checkpoint_manifest.v1"


_MANIFEST_TMP_PREFIX = f".{MANIFEST_FILE}.tmp"


# Written by Orbax after the manifest, at commit: its step metadata (the commit
# timestamp is added) and its commit marker. Hashed into the manifest by `_seal`.
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


_COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE


AFTER_COMMIT_FILES = (_STEP_METADATA_FILE, _COMMIT_FILE)


_HASH_CHUNK = 8 << 20


class CorruptCheckpointError(Exception):
  """A step's files do not match its integrity manifest (or it has none)."""


def _canonical(obj: Any) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_file(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as file:
    while chunk := file.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _sha256_files(paths: Sequence[epath.Path]) -> list[str]:
  """hashlib releases the GIL on large buffers: a few threads hash files in parallel."""
  if len(paths) <= 1:
    return [sha256_file(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(paths))) as pool:
    return list(pool.map(sha256_file, paths))


def _relative_files(root: epath.Path) -> list[str]:
  """Every file under `root` as a '/'-separated relative path, sorted; directories are walked."""
  found = []
  pending = [(root, "")]
  while pending:
    directory, prefix = pending.pop()
    for child in directory.iterdir():
      name = prefix + child.name
      if child.is_dir():
        pending.append((child, name + "/"))
      else:
        found.append(name)
  return sorted(found)


def _covered_files(step_dir: epath.Path) -> list[str]:
  """The files a manifest lists: all but the manifest, Orbax's step metadata and commit marker."""
  return [
      name
      for name in _relative_files(step_dir)
      if name not in (MANIFEST_FILE, _STEP_METADATA_FILE, _COMMIT_FILE)
      and not name.startswith(_MANIFEST_TMP_PREFIX)
  ]


def tree_record(tree: Any) -> dict[str, dict[str, Any]]:
  return {
      jax.tree_util.keystr(path): {"shape": [int(d) for d in leaf.shape], "dtype": str(leaf.dtype)}
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def with_self_digest(manifest: dict[str, Any]) -> dict[str, Any]:
  body = {k: v for k, v in manifest.items() if k != "self_sha256"}
  return {**body, "self_sha256": hashlib.sha256(_canonical(body)).hexdigest()}


def write_atomically(path: epath.Path, data: bytes) -> None:
  """Temporary file + `os.replace` (+ fsync) locally, the temporary file removed if that fails; a
  single object write on object stores."""
  local = "://" not in os.fspath(path)
  if not local:
    path.write_bytes(data)
    return
  temporary = os.fspath(path.parent / f"{_MANIFEST_TMP_PREFIX}-{os.getpid()}-{time.time_ns()}")
  try:
    with open(temporary, "wb") as file:
      file.write(data)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, os.fspath(path))
  except BaseException:
    # A full disk leaves no half-written temporary file behind.
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def build_manifest(
    step_dir: epath.Path, step: int, tree: dict[str, Any], arrays: dict[str, Any] | None
) -> dict[str, Any]:
  names = _covered_files(step_dir)
  paths = [step_dir / name for name in names]
  digests = _sha256_files(paths)
  files = {
      name: {"size": p.stat().length, "sha256": d} for name, p, d in zip(names, paths, digests)
  }
  return with_self_digest(
      {
          "format": _MANIFEST_FORMAT,
          "step": step,
          "created_ns": time.time_ns(),
          "files": files,
          "after_commit": None,
          "tree": tree,
          "arrays": arrays,
      }
  )


def read_manifest(step_dir: epath.Path) -> dict[str, Any]:
  """Parses and checks the manifest. OSErrors other than a missing file propagate."""
  path = step_dir / MANIFEST_FILE
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise CorruptCheckpointError(
        f"{path} is missing (a save killed before its commit, a step written by an older "
        "gmpo_jax, or a deleted manifest)"
    ) from None
  try:
    manifest = json.loads(data)
    valid = (
        isinstance(manifest, dict)
        and manifest.get("format") == _MANIFEST_FORMAT
        and with_self_digest(manifest)["self_sha256"] == manifest.get("self_sha256")
        and isinstance(manifest.get("files"), dict)
        and isinstance(manifest.get("tree"), dict)
    )
  except (ValueError, TypeError, UnicodeDecodeError) as error:
    raise CorruptCheckpointError(f"{path} is not valid JSON ({error})") from None
  if not valid:
    raise CorruptCheckpointError(f"{path} is damaged (format or self-digest check failed)")
  return manifest


def verify_step_dir(step_dir: epath.Path) -> dict[str, Any]:
  """Checks every file of a step against its manifest and returns the manifest.

  Raises:
    CorruptCheckpointError: a missing or damaged manifest, a missing, extra,
      resized or changed file.
    OSError: a file that cannot be read (PermissionError ...), as raised.
  """
  manifest = read_manifest(step_dir)
  expected = manifest["files"]
  present = set(_covered_files(step_dir))
  missing = sorted(set(expected) - present)
  if missing:
    raise CorruptCheckpointError(
        f"{step_dir / missing[0]} is missing ({len(missing)} file(s) missing)"
    )
  extra = sorted(present - set(expected))
  if extra:
    raise CorruptCheckpointError(
        f"{step_dir / extra[0]} is not in the manifest ({len(extra)} unexpected file(s))"
    )
  names = sorted(expected)
  paths = [step_dir / name for name in names]
  for name, path in zip(names, paths):
    size = path.stat().length
    if size != expected[name]["size"]:
      raise CorruptCheckpointError(
          f"{path} is {size} bytes, the manifest says {expected[name]['size']} (truncated or extended)"
      )
  for name, path, digest in zip(names, paths, _sha256_files(paths)):
    if digest != expected[name]["sha256"]:
      raise CorruptCheckpointError(
          f"{path} does not match its SHA-256 in the manifest (changed bytes)"
      )
  _check_after_commit_files(step_dir, manifest)
  return manifest


def _check_after_commit_files(step_dir: epath.Path, manifest: Mapping[str, Any]) -> None:
  """Orbax's step metadata and commit marker: hashed once sealed, else structure checks."""
  data = {}
  for name in AFTER_COMMIT_FILES:
    try:
      data[name] = (step_dir / name).read_bytes()
    except FileNotFoundError:
      raise CorruptCheckpointError(f"{step_dir / name} is missing") from None
  sealed = manifest.get("after_commit")
  if sealed is not None:
    for name in AFTER_COMMIT_FILES:
      if hashlib.sha256(data[name]).hexdigest() != sealed.get(name):
        raise CorruptCheckpointError(
            f"{step_dir / name} does not match its SHA-256 in the manifest (changed bytes)"
        )
    return
  try:
    valid = isinstance(json.loads(data[_STEP_METADATA_FILE]), dict)
  except (ValueError, UnicodeDecodeError):
    valid = False
  if not valid:
    raise CorruptCheckpointError(f"{step_dir / _STEP_METADATA_FILE} is not a JSON object")
