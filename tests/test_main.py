"""The command line: a workdir it cannot write to is a one-line error (exit 2), no traceback."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from gmpo_jax import main

_REPO = pathlib.Path(__file__).resolve().parents[1]
_NOBODY = 65534


def test_a_missing_workdir_is_created(tmp_path):
  workdir = tmp_path / "a" / "b"
  assert main.check_workdir(workdir) == workdir and workdir.is_dir()


def test_a_workdir_below_a_file_cannot_be_created(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(main.WorkdirError, match=r"cannot create the workdir .*file/run: Not a directory"):
    main.check_workdir(tmp_path / "file" / "run")


def _as_other_user(home: pathlib.Path) -> list[str]:
  """A command prefix for a user that file modes bind: none, or `nobody` (owning `home`) as root."""
  if os.geteuid() != 0:
    return []
  if shutil.which("setpriv") is None:
    pytest.skip("root without setpriv: a read-only directory cannot be simulated")
  subprocess.run(["chown", "-R", f"{_NOBODY}:{_NOBODY}", str(home)], check=True)
  return ["setpriv", f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups"]


@pytest.mark.parametrize("read_only", [".", "checkpoints/3"])
def test_a_read_only_workdir_is_a_one_line_error(read_only):
  # Not tmp_path: pytest's directories are private to their owner, and as root the run is `nobody`.
  home = pathlib.Path(tempfile.mkdtemp(prefix="read_only_workdir-"))
  os.chmod(home, 0o755)
  workdir = home / "workdir"
  (workdir / "checkpoints" / "3").mkdir(parents=True)
  prefix = _as_other_user(home)
  os.chmod(workdir / read_only, 0o555)
  try:
    result = subprocess.run(
        prefix + [sys.executable, "-m", "gmpo_jax.main", "--config=configs/smoke.py",
                  f"--workdir={workdir}"],
        capture_output=True, text=True, cwd=_REPO, timeout=300,
        env=dict(os.environ, HOME=str(home), JAX_PLATFORMS="cpu", PYTHONPATH=str(_REPO)))
  finally:
    os.chmod(workdir / read_only, 0o755)
    shutil.rmtree(home, ignore_errors=True)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  expected = f"error: the workdir {workdir} is not writable by this process: "
  assert result.stderr.strip().splitlines()[-1] == (
      expected + f"{(workdir / read_only) if read_only != '.' else workdir} is read-only for it")
