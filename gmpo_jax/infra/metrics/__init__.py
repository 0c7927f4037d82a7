"""Per-step metrics of the experiment runner: JSON lines, TensorBoard, progress, summary, plots.

Files under `workdir` (written by process 0 only):

    metrics.jsonl          one JSON object per `write`: {"step": int, "<name>": value, ...};
                           non-finite values are `null`
    tensorboard/           TensorBoard event files, one scalar per metric (finite values only)
    summary.json           written by `close()`: final and best values, non-finite counts
    learning_curves.png    written by `plot_learning_curves`

The runner logs through `MetricsWriter`, which hands each record to one writer per concern, all
behind clu's `MetricWriter` interface (`writers`, without clu itself: it needs TensorFlow):

    writers.py         the interface, `MultiWriter`, `to_python_scalar`
    jsonl.py           metrics.jsonl and the copy of it a checkpoint holds: what a resume keeps,
                       restores and moves aside
    tensorboard.py     event files, numbered so that a resumed run's purge marker is read last
    summary.py         final and best values, non-finite counts, summary.json
    progress.py        the tqdm bar, or status lines off a terminal
    files.py           appends that are whole or not at all, atomic replacement, errors that
                       name the file
    plots.py           `plot_learning_curves`, `ema`

The runner computes the metrics; nothing here knows what they mean. This module only re-exports
the API.
"""

from gmpo_jax.infra.metrics.jsonl import METRICS_FILE, JsonLinesWriter, read_metrics
from gmpo_jax.infra.metrics.metrics_writer import MetricsWriter
from gmpo_jax.infra.metrics.plots import PLOT_FILE, ema, plot_learning_curves
from gmpo_jax.infra.metrics.progress import ProgressWriter
from gmpo_jax.infra.metrics.summary import SUMMARY_FILE, RunSummary
from gmpo_jax.infra.metrics.tensorboard import TENSORBOARD_DIR, TensorBoardWriter, tensorboard_name
from gmpo_jax.infra.metrics.writers import MetricWriter, MultiWriter, to_python_scalar

__all__ = [
    "METRICS_FILE",
    "PLOT_FILE",
    "SUMMARY_FILE",
    "TENSORBOARD_DIR",
    "JsonLinesWriter",
    "MetricWriter",
    "MetricsWriter",
    "MultiWriter",
    "ProgressWriter",
    "RunSummary",
    "TensorBoardWriter",
    "ema",
    "plot_learning_curves",
    "read_metrics",
    "tensorboard_name",
    "to_python_scalar",
]
