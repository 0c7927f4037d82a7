"""The command line: every usage error (a bad flag, config or workdir, a workdir another run
holds) is one line and exit status 2, no traceback, nothing created."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from gmpo_jax import main
from gmpo_jax.infra import workdir_lock

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SMOKE = str(_REPO / "configs" / "smoke.py")


def test_a_missing_workdir_is_created(tmp_path):
  workdir = tmp_path / "a" / "b"
  assert main.check_workdir(workdir) == workdir and workdir.is_dir()


def test_a_workdir_below_a_file_cannot_be_created(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(
      main.WorkdirError, match=r"cannot create the workdir .*file/run: Not a directory"
  ):
    main.check_workdir(tmp_path / "file" / "run")


def _run_main(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
  """`gmpo_jax.main` in this process up to its first error: (exit status, stderr lines).

  A test that gets past the checks would train: each test here must fail before that.
  """
  argv = ["main", *args]
  # ml_collections reads `--config.` overrides from sys.argv.
  monkeypatch.setattr(sys, "argv", argv)
  try:
    with pytest.raises(SystemExit) as exit_info:
      main.main(main.parse_flags(argv))
  finally:
    flags.FLAGS.unparse_flags()
  return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("read_only", [".", "checkpoints/3"])
def test_a_read_only_workdir_is_a_one_line_error(read_only, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "workdir"
  (workdir / "checkpoints" / "3").mkdir(parents=True)
  denied = workdir / read_only
  os.chmod(denied, 0o555)
  if os.geteuid() == 0:
    # File modes do not bind root, so no directory is read-only for it: what a process they
    # bind would see is os.access refusing the write, and that is what the check asks.
    real_access = os.access
    monkeypatch.setattr(
        main.os,
        "access",
        lambda path, mode: (pathlib.Path(path) != denied and real_access(path, mode)),
    )
  try:
    code, lines = _run_main(monkeypatch, capsys, f"--config={_SMOKE}", f"--workdir={workdir}")
  finally:
    os.chmod(denied, 0o755)
  assert code == 2
  assert lines == [
      f"error: the workdir {workdir} is not writable by this process: "
      f"{denied if read_only != '.' else workdir} is read-only for it"
  ]


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ("--config={missing}", "--workdir={workdir}"),
            "error: the config file '{missing}' does not exist",
        ),
        (
            ("--config={missing}", "--config.num_steps=3", "--workdir={workdir}"),
            "error: the config file '{missing}' does not exist",
        ),
        (
            (_SMOKE, "--workdir={workdir}"),
            f"error: unexpected argument(s) {_SMOKE}; pass the config file as --config=PATH",
        ),
        (("--workdir={workdir}",), "error: --config is required, e.g. --config=configs/default.py"),
        ((f"--config={_SMOKE}",), "error: --workdir is required, e.g. --workdir=workdirs/default"),
        (
            (f"--config={_SMOKE}", "--workdir="),
            "error: --workdir is empty; name the run's directory, e.g. --workdir=workdirs/run",
        ),
        (
            (f"--config={_SMOKE}", "--workdir={workdir}", "--config.num_steps=0"),
            "error: config: num_steps=0 must be >= 1",
        ),
    ],
    ids=[
        "missing config",
        "missing config with an override",
        "positional config",
        "no --config",
        "no --workdir",
        "empty workdir",
        "zero steps",
    ],
)
def test_a_bad_command_line_is_one_line_and_creates_nothing(
    args, line, tmp_path, monkeypatch, capsys
):
  monkeypatch.chdir(tmp_path)
  names = {"missing": str(tmp_path / "missing.py"), "workdir": str(tmp_path / "run")}
  code, lines = _run_main(monkeypatch, capsys, *(arg.format(**names) for arg in args))
  assert (code, lines) == (2, [line.format(**names)])
  assert not list(tmp_path.iterdir())


def test_a_workdir_under_home_is_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  assert main.check_workdir("~/run") == tmp_path / "home" / "run"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_a_workdir_another_run_holds_is_refused_at_once_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = workdir_lock.WorkdirLock(workdir)
  lock.acquire()
  try:
    holder = workdir_lock.Holder(**json.loads((workdir / "run.lock").read_text()))
    result = subprocess.run(
        [sys.executable, "-m", "gmpo_jax.main", f"--config={_SMOKE}", f"--workdir={workdir}"],
        capture_output=True,
        text=True,
        cwd=_REPO,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(_REPO)),
    )
  finally:
    lock.release()
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: the workdir {workdir} is in use by {holder.describe()}; stop that run or use "
      f"another workdir (lock file {workdir / 'run.lock'})"
  )
  assert [p.name for p in workdir.iterdir()] == ["run.lock"]


_FULL_DISK_RUN = """
import errno, logging, os, sys
from absl import app
from gmpo_jax import main
from gmpo_jax.infra import disk_full
from gmpo_jax.runner import loop

def full_disk(config, workdir):
  # What an Orbax writer thread logs as the disk fills: the error below says it once.
  logging.getLogger("absl").error("Failed writing: No space left on device [os_error_code='28']")
  if sys.argv[-1] == "--save":
    raise disk_full.DiskFullError(step=3, path=workdir / "checkpoints" / "3", last_complete=2)
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(workdir / "data" / "x"))

loop.train_and_evaluate = full_disk
app.run(main.main, argv=sys.argv[:-1], flags_parser=main.parse_flags)
"""


@pytest.mark.parametrize("where", ["--save", "--elsewhere"])
def test_a_full_disk_is_one_line_and_exit_status_1(tmp_path, where):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-c", _FULL_DISK_RUN, f"--config={_SMOKE}", f"--workdir={workdir}", where],
      capture_output=True,
      text=True,
      cwd=_REPO,
      timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(_REPO)),
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
      f"error: No space left on device while saving step 3 to {workdir}/checkpoints/3; the last "
      "complete step is 2"
      if where == "--save"
      else f"error: No space left on device in the workdir {workdir}: [Errno 28] No space left on "
      f"device: '{workdir}/data/x'"
  ]
