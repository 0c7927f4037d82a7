"""The peer's side of `benchmarks/e2e_peer.py`; runs in the peer's own virtual environment.

It imports only torch, transformers, tokenizers, datasets and trl (never gmpo_jax), so the two
stacks share nothing but the files `e2e_peer.py` writes:

    python e2e_peer_trl.py build --workdir W     # W/corpus.txt -> W/model (HF Llama + BPE)
    python e2e_peer_trl.py train --workdir W --objective token_clip --out W/trl_0.json

`build` trains a 256-token byte-level BPE tokenizer on the task's text (its characters and merges) and saves a randomly
initialised Llama (hidden 256, 4 layers, 8 heads / 4 KV heads) with it, once; both sides start
from these weights. `train` runs TRL's `GRPOTrainer` (or `trl.experimental.gmpo.GMPOTrainer`)
on the same work as `benchmarks/e2e_peer_config.py` and writes its timings as JSON.
"""

import argparse
import json
import os
import pathlib
import resource
import time

MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    tie_word_embeddings=False,
    max_position_embeddings=512,
)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


def build(workdir: pathlib.Path) -> None:
  import tokenizers
  import torch
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  corpus = (workdir / "corpus.txt").read_text().splitlines()
  bpe = tokenizers.Tokenizer(models.BPE())
  # Byte-level over the whole text (no regex split), so merges may span "+" and "=".
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(
      corpus, trainers.BpeTrainer(vocab_size=256, special_tokens=list(SPECIAL_TOKENS))
  )
  out = workdir / "model"
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
  )
  tokenizer.save_pretrained(out)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=bpe.get_vocab_size(),
      pad_token_id=bpe.token_to_id("<pad>"),
      bos_token_id=bpe.token_to_id("<bos>"),
      eos_token_id=bpe.token_to_id("<eos>"),
      **MODEL_SHAPE,
  )
  model = transformers.LlamaForCausalLM(config)
  # Random norm weights, so a loader that skipped them would not start from the same model.
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "norm" in name:
        parameter.uniform_(0.5, 1.5)
  model.save_pretrained(out)
  print(f"saved {sum(p.numel() for p in model.parameters())} parameters to {out}")


def reward_exact(completions, answer, **_):
  """1 when the completion's first line is the answer, else a small positive floor."""
  return [
      1.0 if c.strip().split("\n")[0].strip() == a else 0.01 for c, a in zip(completions, answer)
  ]


def train(args) -> None:
  import datasets
  import torch
  import transformers
  import trl

  torch.set_num_threads(args.threads)
  workdir = pathlib.Path(args.workdir)
  rows = [json.loads(line) for line in (workdir / "prompts.jsonl").read_text().splitlines()]
  dataset = datasets.Dataset.from_list(rows)
  model_dir = workdir / "model"
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  common = dict(
      output_dir=str(workdir / "trl_out"),
      max_steps=args.steps,
      per_device_train_batch_size=64,
      gradient_accumulation_steps=1,
      num_generations=8,
      max_completion_length=32,
      temperature=1.0,
      top_p=1.0,
      beta=0.0,
      num_iterations=1,
      learning_rate=1e-4,
      max_grad_norm=1.0,
      adam_beta2=0.99,
      lr_scheduler_type="constant",
      logging_steps=1,
      report_to=[],
      save_strategy="no",
      use_cpu=True,
      bf16=False,
      seed=0,
      dataloader_num_workers=0,
      disable_tqdm=True,
  )
  if args.objective == "geometric":
    from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

    config, trainer_cls = GMPOConfig(epsilon=0.4, **common), GMPOTrainer
  else:
    config = trl.GRPOConfig(epsilon=0.2, loss_type="dapo", **common)  # dapo: token-mean
    trainer_cls = trl.GRPOTrainer
  trainer = trainer_cls(
      model=model,
      reward_funcs=reward_exact,
      args=config,
      train_dataset=dataset,
      processing_class=tokenizer,
  )

  steps, rollouts, completion_tokens = [], [], []
  generate = trainer._generate_and_score_completions  # pylint: disable=protected-access

  def timed_generate(*a, **k):
    start = time.perf_counter()
    out = generate(*a, **k)
    rollouts.append(time.perf_counter() - start)
    completion_tokens.append(int(out["completion_mask"].sum()))
    return out

  trainer._generate_and_score_completions = timed_generate  # pylint: disable=protected-access

  class StepTimer(transformers.TrainerCallback):

    def on_step_begin(self, *_, **__):
      self.start = time.perf_counter()

    def on_step_end(self, *_, **__):
      steps.append(time.perf_counter() - self.start)

  trainer.add_callback(StepTimer())
  trainer.train()
  result = {
      "side": "trl",
      "objective": args.objective,
      "threads": args.threads,
      "step_s": steps,
      "rollout_s": rollouts,
      "completion_tokens": completion_tokens,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "versions": {
          "trl": trl.__version__,
          "transformers": transformers.__version__,
          "torch": torch.__version__,
      },
  }
  pathlib.Path(args.out).write_text(json.dumps(result))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("command", choices=("build", "train"))
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--objective", choices=("token_clip", "geometric"), default="token_clip")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--out")
  args = parser.parse_args()
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  if args.command == "build":
    build(pathlib.Path(args.workdir))
  else:
    train(args)


if __name__ == "__main__":
  main()
