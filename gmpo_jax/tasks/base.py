"""The `Task` interface and what all tasks share: TFDS loading and integer parsing.

One concept: the contract every task implements, with the data plumbing (a verified TFDS cache,
one declaration per data parameter) that contract relies on, hence its length.

A task is a frozen dataclass of hyperparameters. Its data is a TFDS dataset
(`tfds.core.GeneratorBasedBuilder`, `array_record` format) built locally on first use and
cached under `data_dir/<builder name>/<config name>/<version>`; `load` reads a split back
through `builder.as_data_source` (random access, no TensorFlow needed) and decodes each
record into plain Python values (str, int, tuple of int).

The cache is verified before it is read: once built, its directory gets a manifest
(`gmpo_manifest.json`: the size and SHA-256 of every file), and a cache whose files differ from
it, or that has none (built by an older gmpo_jax, or cut short), is deleted and built again, with
a warning naming the file. TFDS itself would notice a damaged file only when a record of it is
read, many steps later, in words that name no file.

A generated task declares each data parameter once, as a `data_field` of a `DataParams`
dataclass that both its builder and the task itself use:

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class CountingData(base.DataParams):
      num_train: int = base.data_field(100, key="train")

    class CountingBuilder(base.GeneratedBuilder):
      params_cls = CountingData
      BUILDER_CONFIGS = [base.ParamsConfig(params=CountingData())]

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class CountingTask(CountingData, base.GeneratedTask):
      builder_cls = CountingBuilder
      min_reward: float = 0.01  # a reward setting: not part of the data

The task's builder config then carries `CountingData(num_train=task.num_train)`, named
'train100', so every data setting has its own cache directory.
"""

import abc
import dataclasses
import hashlib
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

# A decimal integer as a task expects it: ASCII digits only (`\d` would also accept
# other scripts' digits, and int() would accept '1_000' and surrounding whitespace).
INTEGER_RE = re.compile(r"-?[0-9]+")
# Integers the synthetic tasks convert to int have at most this many digits. Longer
# strings count as malformed, which also keeps int() away from its 4300-digit limit.
MAX_INTEGER_DIGITS = 18
_BOUNDED_INTEGER_RE = re.compile(rf"-?[0-9]{{1,{MAX_INTEGER_DIGITS}}}")

logger = logging.getLogger(__name__)


def parse_integer(text: str) -> int | None:
  """`text` as an int if it is exactly `-?[0-9]{1,18}`, else None (never raises)."""
  return int(text) if _BOUNDED_INTEGER_RE.fullmatch(text) else None


def check_nonnegative(name: str, value: float) -> None:
  """Raises ValueError unless `value` is a finite number >= 0."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name} must be a number, got {value!r}")
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def check_int(name: str, value: int, *, minimum: int, maximum: int | None = None) -> None:
  """Raises ValueError unless `value` is an int in [minimum, maximum]."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if value < minimum or (maximum is not None and value > maximum):
    bound = f"[{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
    raise ValueError(f"{name} must be in {bound}, got {value}")


# Integer operations of the synthetic tasks: symbol -> (name used in config names, fn).
# `//` and `%` are Python's floor division and remainder (sign of the divisor).
BINARY_OPERATIONS = {
    "+": ("add", lambda a, b: a + b),
    "-": ("sub", lambda a, b: a - b),
    "*": ("mul", lambda a, b: a * b),
    "//": ("floordiv", lambda a, b: a // b),
    "%": ("mod", lambda a, b: a % b),
}


def spell_operations(operations: Sequence[str]) -> str:
  """The operations' config-name spelling: ('+', '//') -> 'add.floordiv'."""
  return ".".join(BINARY_OPERATIONS[op][0] for op in operations)


def check_operations(operations: Sequence[str], *, allowed: Sequence[str]) -> tuple[str, ...]:
  """`operations` as a tuple; ValueError unless they are distinct symbols in `allowed`."""
  if isinstance(operations, str) or not operations:
    raise ValueError(f"operations must be a non-empty tuple of symbols, got {operations!r}")
  operations = tuple(operations)
  if any(op not in allowed for op in operations) or len(set(operations)) != len(operations):
    raise ValueError(f"operations must be distinct symbols among {list(allowed)}, got {operations}")
  return operations


_CONFIG_NAME_RE = re.compile(r"[A-Za-z0-9_.]+")


def config_name(**params: Any) -> str:
  """A readable, filesystem-safe builder-config name that encodes every parameter.

  Different parameters give different names, hence different cache directories; a
  negative int is written with a leading 'm' (x_min=-20 -> 'x_minm20').

  Raises:
    ValueError: a value whose text is not made of [A-Za-z0-9_.].
  """
  parts = []
  for key, value in params.items():
    text = f"m{-value}" if isinstance(value, int) and value < 0 else str(value)
    if _CONFIG_NAME_RE.fullmatch(text) is None:
      raise ValueError(f"cannot encode {key}={value!r} in a builder-config name")
    parts.append(f"{key}{text}")
  return "_".join(parts)


def _to_python(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return tuple(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    return {key: _to_python(item) for key, item in value.items()}
  return value


class DecodedSource(Sequence):
  """Random-access view of a TFDS data source that yields plain Python dicts.

  TFDS returns Text features as bytes and numbers as NumPy values; tasks and their
  callers work with str, int and tuples of int.
  """

  def __init__(self, source: Sequence[Mapping[str, Any]]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = index.__index__()
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return _to_python(self._source[index % len(self)])

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]


CACHE_MANIFEST = "gmpo_manifest.json"
_CACHE_FORMAT = "gmpo_jax.dataset_manifest.v1"


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as file:
    while chunk := file.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _cache_problem(directory: epath.Path) -> str | None:
  """What is wrong with the dataset cache in `directory`, naming the file; None when it verifies
  against its manifest or does not exist."""
  if not directory.exists():
    return None
  path = directory / CACHE_MANIFEST
  try:
    manifest = json.loads(path.read_text())
    files = manifest["files"] if manifest.get("format") == _CACHE_FORMAT else None
    entries = [(directory / name, entry["size"], entry["sha256"]) for name, entry in files.items()]
  except FileNotFoundError:
    return f"{path} is missing"
  except (ValueError, KeyError, TypeError, AttributeError) as error:
    return f"{path} is not a manifest ({type(error).__name__}: {error})"
  for file, size, digest in entries:
    if not file.exists():
      return f"{file} is missing"
    if (found := file.stat().length) != size:
      return f"{file} is {found} bytes, the manifest says {size}"
    if _sha256(file) != digest:
      return f"{file} does not match its SHA-256 in the manifest"
  return None


def _write_cache_manifest(directory: epath.Path) -> None:
  """Records the size and SHA-256 of every file of a freshly built cache (written last, whole:
  a cache without it counts as damaged)."""
  files = {
      file.name: {"size": file.stat().length, "sha256": _sha256(file)}
      for file in sorted(directory.iterdir())
      if file.name != CACHE_MANIFEST
  }
  temporary = directory / f".{CACHE_MANIFEST}.tmp"
  temporary.write_text(json.dumps({"format": _CACHE_FORMAT, "files": files}, indent=1))
  temporary.rename(directory / CACHE_MANIFEST)


_CONFIG_KEY = "gmpo_config_key"
_ENCODE = "gmpo_encode"


def data_field(default: Any, *, key: str, encode: Callable[[Any], Any] | None = None) -> Any:
  """Declares a data parameter of a `DataParams` dataclass.

  Args:
    default: the parameter's default value.
    key: how the builder-config name spells it ('digits' for num_digits=2: 'digits2').
    encode: value -> what the name writes after the key; None writes the value itself.
  """
  return dataclasses.field(default=default, metadata={_CONFIG_KEY: key, _ENCODE: encode})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataParams:
  """The parameters that fix a generated dataset, each declared with `data_field`.

  Subclasses validate their fields in `__post_init__`. A task inherits its data-parameter
  class (see the module docstring), so these methods see only the data fields, never the
  task's reward settings.
  """

  def data_params(self) -> dict[str, Any]:
    """{field name: value} of the data parameters, in declaration order."""
    return {
        field.name: getattr(self, field.name)
        for field in dataclasses.fields(self)
        if _CONFIG_KEY in field.metadata
    }

  def config_name(self) -> str:
    """The builder-config name that spells every data parameter (see `config_name`)."""
    spelled = {}
    for field in dataclasses.fields(self):
      if _CONFIG_KEY in field.metadata:
        value, encode = getattr(self, field.name), field.metadata[_ENCODE]
        spelled[field.metadata[_CONFIG_KEY]] = value if encode is None else encode(value)
    return config_name(**spelled)


@dataclasses.dataclass(kw_only=True)
class ParamsConfig(tfds.core.BuilderConfig):
  """A builder config carrying a `DataParams`; its name, hence its cache directory, is
  derived from the parameters."""

  name: str = dataclasses.field(init=False, default="")
  params: DataParams

  def __post_init__(self):
    self.name = self.params.config_name()


class GeneratedBuilder(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder whose splits a seeded generator makes locally (nothing is downloaded).

  Abstract, so TFDS does not register it; subclasses set `params_cls` and
  `BUILDER_CONFIGS = [ParamsConfig(params=params_cls())]`, and implement `_info` and
  `_generated_splits`.
  """

  params_cls: ClassVar[type[DataParams]]

  @property
  def params(self) -> DataParams:
    """The data parameters of `self.builder_config`."""
    return self.builder_config.params

  @abc.abstractmethod
  def _generated_splits(self) -> Mapping[str, Sequence[Mapping[str, Any]]]:
    """{split name: examples} for `self.params`."""

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated locally.
    return {
        split: self._generate_examples(examples)
        for split, examples in self._generated_splits().items()
    }

  def _generate_examples(self, examples):
    yield from enumerate(examples)


class ManualJsonlBuilder(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder of splits read from JSONL files placed in the manual directory.

  Split `s` is read from `manual_dir / SPLIT_FILES[s]`, one JSON object per line; blank
  lines are skipped. Abstract, so TFDS does not register it; subclasses set
  `MANUAL_DOWNLOAD_INSTRUCTIONS`, `TEXT_FEATURES`, `HOMEPAGE` and `CITATION`, and implement
  `_example`.
  """

  SPLIT_FILES: ClassVar[Mapping[str, str]] = {"train": "train.jsonl", "test": "test.jsonl"}
  TEXT_FEATURES: ClassVar[tuple[str, ...]]  # The str fields of an example, as `_example` makes.
  HOMEPAGE: ClassVar[str]
  CITATION: ClassVar[str]

  @abc.abstractmethod
  def _example(self, record: Mapping[str, Any]) -> dict[str, Any]:
    """The example of one JSON object; ValueError (saying what is wrong) if it is invalid."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=sys.modules[type(self).__module__].__doc__,
        features=tfds.features.FeaturesDict(
            {name: tfds.features.Text() for name in self.TEXT_FEATURES}
        ),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = {split: dl_manager.manual_dir / name for split, name in self.SPLIT_FILES.items()}
    for path in paths.values():
      if not path.exists():
        raise FileNotFoundError(f"{path} not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {split: self._generate_examples(path) for split, path in paths.items()}

  def _generate_examples(self, path: epath.Path):
    """Yields (line number, example); a bad line is a ValueError naming 'file:line'."""
    with path.open() as lines:
      for line_number, line in enumerate(lines, start=1):
        if not line.strip():
          continue
        where = f"{path}:{line_number}"
        try:
          record = json.loads(line)
        except json.JSONDecodeError as error:
          raise ValueError(f"{where}: not JSON ({error})") from None
        try:
          if not isinstance(record, dict):
            raise ValueError("expected a JSON object")
          example = self._example(record)
        except ValueError as error:
          raise ValueError(f"{where}: {error}") from None
        yield line_number, example


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightedReward:
  """R = min_reward + format_reward·[well formed] + correct_reward·[correct], all >= 0.

  A mixin of the tasks whose reward has this form (a subclass may redeclare a weight to
  change its default); what "well formed" and "correct" mean is the task's.
  """

  correct_reward: float = 1.0
  format_reward: float = 0.0
  min_reward: float = 0.0

  def check_weights(self) -> None:
    """Raises ValueError unless every weight is a finite number >= 0."""
    for weight in ("correct_reward", "format_reward", "min_reward"):
      check_nonnegative(weight, getattr(self, weight))

  @property
  def reward_range(self) -> tuple[float, float]:
    return (self.min_reward, self.min_reward + self.format_reward + self.correct_reward)

  def weighted_reward(self, *, well_formed: bool, correct: bool) -> float:
    return float(self.min_reward + self.format_reward * well_formed + self.correct_reward * correct)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task(abc.ABC):
  """A prompt distribution (a TFDS dataset) with a reward function on completions.

  Subclasses set `name` and `builder_cls`, and implement `builder_config`, `prompt`,
  `reward`, `solution` and `reward_range`. `reward` never raises on any str and always returns a
  finite float within `reward_range`.
  """

  name: ClassVar[str]
  builder_cls: ClassVar[type[tfds.core.GeneratorBasedBuilder]]

  @abc.abstractmethod
  def builder_config(self) -> tfds.core.BuilderConfig | None:
    """The config that fixes this task's data (the reward settings are not part of it).

    None for a builder without configurations.
    """

  @property
  @abc.abstractmethod
  def reward_range(self) -> tuple[float, float]:
    """(smallest, largest) reward the task can give."""

  @abc.abstractmethod
  def prompt(self, example: Mapping[str, Any]) -> str:
    """The text the policy continues."""

  @abc.abstractmethod
  def reward(self, completion: str, example: Mapping[str, Any]) -> float:
    """Scores a completion (the generated text after the prompt)."""

  @abc.abstractmethod
  def solution(self, example: Mapping[str, Any]) -> str:
    """A reference completion (for supervised warm starts); it earns `reward_range[1]`."""

  def demonstration(self, example: Mapping[str, Any]) -> str:
    """The completion a supervised warm start imitates: `solution` unless the task models an
    imperfect teacher (whose demonstrations may be wrong; the reward still checks the truth)."""
    return self.solution(example)

  def extract_answer(self, completion: str) -> str:
    """The final answer a completion states, for majority voting (maj@k).

    Two completions with the same extracted answer count as one vote. The default is the
    stripped completion; tasks with reasoning before the answer override it.
    """
    return completion.strip()

  def download_config(self) -> tfds.download.DownloadConfig:
    """Settings for `download_and_prepare` (the manual directory, for GSM8K)."""
    return tfds.download.DownloadConfig()

  def builder(self, *, data_dir: str) -> tfds.core.DatasetBuilder:
    """The TFDS builder of this task's data under `data_dir` (nothing is built yet)."""
    config = self.builder_config()
    if config is not None:
      # TFDS refuses a new config object that reuses the name of a predefined one.
      config = self.builder_cls.builder_configs.get(config.name, config)
    return self.builder_cls(data_dir=data_dir, config=config)

  def cache_dir(self, *, data_dir: str) -> epath.Path:
    """Where the dataset is built under `data_dir` (TFDS's `builder.data_dir`), known before
    the builder reads anything there."""
    config = self.builder_config()
    return (
        epath.Path(data_dir)
        / self.builder_cls.name
        / ("" if config is None else config.name)
        / str(self.builder_cls.VERSION)
    )

  def load(self, split: str, *, data_dir: str) -> DecodedSource:
    """The examples of `split` ('train', 'test', or a TFDS slice such as 'train[:10]').

    Builds the dataset under `data_dir` on first use (array_record files), and reuses it
    afterwards once it verifies against its manifest (module docstring); a damaged cache is
    built again.
    """
    directory = self.cache_dir(data_dir=data_dir)
    problem = _cache_problem(directory)
    if problem is not None:
      # Before the builder is made: TFDS reads the cache's dataset_info.json as it starts.
      logger.warning("The dataset cache %s is damaged (%s); building it again.", directory, problem)
      directory.rmtree()
    builder = self.builder(data_dir=data_dir)
    try:
      builder.download_and_prepare(
          file_format="array_record", download_config=self.download_config()
      )
    except OSError as error:
      # Raised with only a message (a missing manual file) or naming its file: as it is.
      if error.errno is None or error.filename is not None:
        raise
      # A failed write (a full disk) names no file: name the cache being built.
      raise OSError(error.errno, error.strerror, str(directory)) from error
    if problem is not None or not (directory / CACHE_MANIFEST).exists():
      _write_cache_manifest(directory)
    return DecodedSource(builder.as_data_source(split))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeneratedTask(DataParams, Task):
  """A task whose data a `GeneratedBuilder` makes from the task's own data parameters.

  A subclass also inherits its builder's `params_cls` (module docstring), so each data
  parameter is declared once, there, and is a hyperparameter of the task.
  """

  builder_cls: ClassVar[type[GeneratedBuilder]]

  def builder_config(self) -> ParamsConfig:
    return ParamsConfig(params=self.builder_cls.params_cls(**self.data_params()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ManualJsonlTask(Task):
  """A task whose data a `ManualJsonlBuilder` reads from the JSONL files in `manual_dir`.

  Attributes:
    manual_dir: directory holding the builder's files (None or '': TFDS's default,
      `<data_dir>/downloads/manual`; '' lets a locked config leave it unset).
  """

  builder_cls: ClassVar[type[ManualJsonlBuilder]]

  manual_dir: str | None = None

  def builder_config(self) -> None:
    """A single configuration: the cache does not depend on `manual_dir`."""
    return None

  def download_config(self) -> tfds.download.DownloadConfig:
    return tfds.download.DownloadConfig(manual_dir=self.manual_dir or None)
