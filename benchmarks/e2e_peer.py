"""End to end against a PyTorch trainer: gmpo_jax vs Hugging Face TRL on the same RL work.

    python benchmarks/e2e_peer.py --rounds 3 --objectives token_clip geometric

Both sides start from the same randomly initialised 3.3M-parameter Llama (hidden 256, 4 layers,
8 heads / 4 KV heads, a 256-token BPE tokenizer trained on the task's text) saved once as a
Hugging Face checkpoint, and run 30 RL steps of 8 prompts x 8 completions of at most 32 tokens
at temperature 1, beta = 0, one AdamW step per RL step: the token-clip objective with token-mean
aggregation against `trl.GRPOTrainer` (loss_type 'dapo'), and GMPO against
`trl.experimental.gmpo.GMPOTrainer`. The runs alternate (TRL, gmpo_jax, gmpo_jax, TRL, ...) so
that a change in the machine's load hits both sides alike.

The peer lives in its own throw-away virtual environment (`--peer-venv`, built on first use:
torch==2.13.0 first, the CPU build; any other version pulls CUDA wheels; then transformers, trl
and datasets), and `benchmarks/e2e_peer_trl.py` runs there; nothing of the project's
dependencies enters it. gmpo_jax runs `python -m gmpo_jax.main` with
`benchmarks/e2e_peer_config.py`, compiling every program in every run; with `--jax-cache` the
runs share a compilation cache in the workdir (the first run of each objective compiles cold,
the later ones read the programs back, which on XLA:CPU makes them run slower).

Reported per side (medians over rounds): s/step (median of steps 5-30), rollout s/step,
completion tokens/s over steps 5-30, the first RL step, the whole process, peak RSS; and the
ratio gmpo_jax / TRL of completion tokens/s.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "benchmarks" / "e2e_peer_trl.py"
PEER_PACKAGES = (("torch==2.13.0",), ("transformers", "trl", "datasets"))
STEADY = slice(4, None)  # steps 5-30


def ensure_peer_venv(venv: pathlib.Path) -> pathlib.Path:
  python = venv / "bin" / "python"
  if not python.exists():
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    for group in PEER_PACKAGES:  # torch first, so nothing pulls another build
      subprocess.run([str(python), "-m", "pip", "install", "-q", *group], check=True)
  return python


def write_task_files(workdir: pathlib.Path) -> None:
  """The task's train prompts (for TRL) and text (for the tokenizer), from gmpo_jax's task."""
  sys.path.insert(0, str(ROOT))
  from benchmarks import e2e_peer_config  # pylint: disable=import-outside-toplevel
  from gmpo_jax import tasks  # pylint: disable=import-outside-toplevel

  config = e2e_peer_config.get_config()
  task = tasks.get_task(config.task.name, **dict(config.task.kwargs))
  examples = task.load("train", data_dir=str(workdir / "data"))
  with open(workdir / "prompts.jsonl", "w") as f:
    for e in examples:
      f.write(json.dumps({"prompt": task.prompt(e), "answer": task.solution(e)}) + "\n")
  (workdir / "corpus.txt").write_text(
      "\n".join(task.prompt(e) + task.demonstration(e) for e in examples)
  )


def run_measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
  """Runs a child to completion; (wall seconds, its own peak RSS in MiB) from wait4."""
  start = time.perf_counter()
  child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _, status, usage = os.wait4(child.pid, 0)
  wall = time.perf_counter() - start
  stderr = child.stderr.read().decode()
  child.stderr.close()
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{command[:4]} failed:\n{stderr[-3000:]}")
  return wall, usage.ru_maxrss / 1024


def run_trl(
    python: pathlib.Path, workdir: pathlib.Path, objective: str, index: int, threads: int
) -> dict:
  out = workdir / f"trl_{objective}_{index}.json"
  wall, rss = run_measured(
      [
          str(python),
          str(PEER_SCRIPT),
          "train",
          "--workdir",
          str(workdir),
          "--objective",
          objective,
          "--threads",
          str(threads),
          "--out",
          str(out),
      ]
  )
  result = json.loads(out.read_text())
  steps, tokens = np.array(result["step_s"]), np.array(result["completion_tokens"])
  return {
      "step_s": float(np.median(steps[STEADY])),
      "rollout_s": float(np.median(np.array(result["rollout_s"])[STEADY])),
      "tokens_per_s": float(tokens[STEADY].sum() / steps[STEADY].sum()),
      "first_step_s": float(steps[0]),
      "process_s": wall,
      "peak_rss_mib": rss,
      "versions": result["versions"],
  }


OBJECTIVE_OVERRIDES = {
    "token_clip": [],
    "geometric": [
        "--config.algorithm.objective=geometric",
        "--config.algorithm.objective_kwargs.epsilon_low=0.4",
        "--config.algorithm.objective_kwargs.epsilon_high=0.4",
        "--config.algorithm.loss_agg_mode=seq-mean-token-mean",
    ],
}


def run_jax(workdir: pathlib.Path, objective: str, index: int, cache: bool) -> dict:
  run_dir = workdir / f"jax_{objective}_{index}"
  shutil.rmtree(run_dir, ignore_errors=True)  # a finished workdir would resume, not rerun
  command = [
      sys.executable,
      "-m",
      "gmpo_jax.main",
      f"--config={ROOT / 'benchmarks' / 'e2e_peer_config.py'}:{workdir / 'model'}",
      f"--workdir={run_dir}",
      f"--config.task.data_dir={workdir / 'data'}",
      *([f"--config.compilation_cache_dir={workdir / 'jax_cache'}"] if cache else []),
      *OBJECTIVE_OVERRIDES[objective],
  ]
  wall, rss = run_measured(command, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  records = [r for r in records if "time/step" in r]
  steps = np.array([r["time/step"] for r in records])
  tokens = np.array([r["response_length/mean"] for r in records]) * 64
  return {
      "step_s": float(np.median(steps[STEADY])),
      "rollout_s": float(np.median([r["time/rollout"] for r in records][STEADY])),
      "update_s": float(np.median([r["time/update"] for r in records][STEADY])),
      "tokens_per_s": float(tokens[STEADY].sum() / steps[STEADY].sum()),
      "first_step_s": float(steps[0]),
      "first_step_compile_s": float(records[0].get("time/compile", float("nan"))),
      "process_s": wall,
      "peak_rss_mib": rss,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="/tmp/gmpo_jax_e2e_peer")
  parser.add_argument("--peer-venv", default=None, help="default: <workdir>/peer_venv")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
      "--objectives",
      nargs="+",
      default=["token_clip", "geometric"],
      choices=sorted(OBJECTIVE_OVERRIDES),
  )
  # torch's intra-op threads: on the quiet 2-core machine 2 threads ran TRL's step 1.5x faster
  # than 1 (0.75 vs 1.12 s); under load from other jobs 1 was the faster.
  parser.add_argument("--trl-threads", type=int, default=os.cpu_count())
  parser.add_argument(
      "--jax-cache",
      action="store_true",
      help="share a persistent compilation cache between the gmpo_jax runs",
  )
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  python = ensure_peer_venv(pathlib.Path(args.peer_venv or workdir / "peer_venv"))
  if not (workdir / "model" / "config.json").exists():
    write_task_files(workdir)
    subprocess.run([str(python), str(PEER_SCRIPT), "build", "--workdir", str(workdir)], check=True)

  results = {objective: {"trl": [], "jax": []} for objective in args.objectives}
  for index in range(args.rounds):
    for objective in args.objectives:
      # ABBA order: each side goes first in every other round.
      order = ("trl", "jax") if index % 2 == 0 else ("jax", "trl")
      for side in order:
        run = (
            run_trl(python, workdir, objective, index, args.trl_threads)
            if side == "trl"
            else run_jax(workdir, objective, index, args.jax_cache)
        )
        results[objective][side].append(run)
        print(
            f"round {index} {objective:10s} {side:4s} "
            + " ".join(f"{k}={v:.3f}" for k, v in run.items() if isinstance(v, float)),
            flush=True,
        )

  summary = {
      "date": datetime.datetime.now().isoformat(timespec="minutes"),
      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
      "load_average": os.getloadavg(),
      "rounds": args.rounds,
      "trl_threads": args.trl_threads,
      "results": results,
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
  for objective, sides in results.items():
    print(f"\n{objective} (medians over {args.rounds} rounds)")
    keys = [k for k in sides["jax"][0] if isinstance(sides["jax"][0][k], float)]
    for key in keys:
      jax_value = np.median([r[key] for r in sides["jax"]])
      trl_value = np.median([r[key] for r in sides["trl"]]) if key in sides["trl"][0] else None
      trl_text = "" if trl_value is None else f"  TRL {trl_value:9.3f}"
      print(f"  {key:22s} gmpo_jax {jax_value:9.3f}{trl_text}")
    ratios = [j["tokens_per_s"] / t["tokens_per_s"] for j, t in zip(sides["jax"], sides["trl"])]
    print(
        f"  completion tokens/s, gmpo_jax / TRL per round: {np.round(ratios, 2).tolist()}, "
        f"median {np.median(ratios):.2f}"
    )
    warm = [r["first_step_s"] for r in sides["jax"][1:]]
    print(
        f"  gmpo_jax first RL step: round 0 {sides['jax'][0]['first_step_s']:.2f} s, "
        f"later rounds {np.round(warm, 2).tolist()} s"
    )


if __name__ == "__main__":
  main()
