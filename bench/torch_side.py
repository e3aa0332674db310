"""The PyTorch side of `bench/head_to_head.py`: Hugging Face T5 with the paper's bottleneck
adapters, one expert at a time, as a researcher would otherwise run it.

Dev only: imports torch and transformers (the `bench` extra in pyproject.toml); nothing in
`elm_jax/` imports it. `head_to_head.py` runs it with the torch environment's python as a worker:

  TORCH_PYTHON bench/torch_side.py serve

reads one JSON request per line on stdin and answers one JSON line on stdout (everything else
it prints goes to stderr). Requests name files that `head_to_head.py` wrote (the Hugging Face
checkpoint, expert trees as .npz, examples as .json, training batches as .npz); each file is
read once and kept, so a timed request measures only the work (see `_handle`).

The functions can also be used on their own:

- `build_model(hf_dir)`: T5ForConditionalGeneration in float32, with an `Adapter` after the
  self-attention output of every block (encoder and decoder) and after every feed-forward
  output, none on cross-attention: `x + dropout(Adapter(SelfAttn(LN(x))))` and
  `x + dropout(Adapter(FFN(LN(x))))`, the paper's placement;
- `load_expert(model, expert)`: copies one elm_jax expert tree (adapter kernels and biases,
  every layer-norm scale; numpy) into the model;
- `score_paper_way` / `score_careful`: rank-classification scores [E, N, C], one expert at a
  time, the paper's way (one row per (input, choice) pair) or encoding each input once;
- `train_sequential`: E experts trained one after another with the paper's recipe.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerFF, T5LayerSelfAttention

# The development machine has 2 cores. Denormal floats made PyTorch training 2.6x slower on
# this CPU; flushing them to zero is what a tuned setup would do.
torch.set_num_threads(2)
torch.set_flush_denormal(True)

PAD_ID = 0
IGNORE = -100  # the label Hugging Face's loss skips
DEVICE = torch.device("cpu")  # where the model and every batch live: the `setup` request's device


def _synchronize() -> None:
  """Waits for the device's queued work (CUDA runs asynchronously), so the clock sees it."""
  if DEVICE.type == "cuda":
    torch.cuda.synchronize()


class Adapter(nn.Module):
  """Bottleneck adapter `z + up(gelu_tanh(down(z)))`, as elm_jax's BottleneckAdapter."""

  def __init__(self, d_model: int, bottleneck: int):
    super().__init__()
    self.down = nn.Linear(d_model, bottleneck)
    self.up = nn.Linear(bottleneck, d_model)

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    return z + self.up(F.gelu(self.down(z), approximate="tanh"))


def build_model(hf_dir: str, reduction_factor: int = 32) -> T5ForConditionalGeneration:
  """The checkpoint in float32 with an adapter in every self-attention and feed-forward sub-layer.

  Each adapter is a submodule of its sub-layer (`...layer.0.adapter`), applied by a forward hook
  on the sub-layer's inner module (SelfAttention, DenseReluDense), so the sub-layer's own
  residual and dropout wrap it: x + dropout(Adapter(inner(LN(x)))). Cross-attention has none.
  """
  model = T5ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
  d_model = model.config.d_model
  bottleneck = max(1, d_model // reduction_factor)
  sublayers = [m for m in model.modules() if isinstance(m, (T5LayerSelfAttention, T5LayerFF))]
  for sublayer in sublayers:
    sublayer.adapter = Adapter(d_model, bottleneck)
    if isinstance(sublayer, T5LayerSelfAttention):
      # T5Attention returns a tuple: (output, position bias, ...); adapt the output only.
      sublayer.SelfAttention.register_forward_hook(
          lambda module, args, out, adapter=sublayer.adapter: (adapter(out[0]),) + tuple(out[1:]))
    else:
      sublayer.DenseReluDense.register_forward_hook(
          lambda module, args, out, adapter=sublayer.adapter: adapter(out))
  model.eval()
  return model


# ------------------------------------------------------------------ elm_jax tree -> torch names
# Sub-layer index inside a Hugging Face block for each elm_jax module of a layer.
_SUBLAYER = {
    "encoder": {"pre_attention_layer_norm": 0, "attention_adapter": 0,
                "pre_mlp_layer_norm": 1, "mlp_adapter": 1},
    "decoder": {"pre_self_attention_layer_norm": 0, "self_attention_adapter": 0,
                "pre_cross_attention_layer_norm": 1, "pre_mlp_layer_norm": 2, "mlp_adapter": 2},
}
_FINAL_NORMS = {"encoder/encoder_norm/scale": "encoder.final_layer_norm.weight",
                "decoder/decoder_norm/scale": "decoder.final_layer_norm.weight"}
# Adapter leaf -> (torch parameter, stored transposed). Our kernels are [in, out] (z @ kernel);
# torch Linear weights are [out, in].
_ADAPTER_LEAVES = {"down_kernel": ("down.weight", True), "down_bias": ("down.bias", False),
                   "up_kernel": ("up.weight", True), "up_bias": ("up.bias", False)}
_LAYER_PATH = re.compile(r"(encoder|decoder)/layers_(\d+)/(\w+)/(\w+)")


def torch_name(path: str) -> tuple[str, bool]:
  """elm_jax expert path ('decoder/layers_3/mlp_adapter/up_kernel') -> (torch parameter name,
  whether to transpose)."""
  if path in _FINAL_NORMS:
    return _FINAL_NORMS[path], False
  match = _LAYER_PATH.fullmatch(path)
  if match is None or match[3] not in _SUBLAYER[match[1]]:
    raise KeyError(f"expert parameter {path!r} has no place in the torch model")
  stack, layer, module, leaf = match.groups()
  prefix = f"{stack}.block.{layer}.layer.{_SUBLAYER[stack][module]}"
  if module.endswith("_layer_norm"):
    if leaf != "scale":
      raise KeyError(f"expert parameter {path!r}: a layer norm has only a scale")
    return f"{prefix}.layer_norm.weight", False
  if leaf not in _ADAPTER_LEAVES:
    raise KeyError(f"expert parameter {path!r}: unknown adapter leaf {leaf!r}")
  name, transpose = _ADAPTER_LEAVES[leaf]
  return f"{prefix}.adapter.{name}", transpose


def expert_parameter_names(model: nn.Module) -> set[str]:
  """The torch parameters an expert owns: every adapter's and every layer-norm weight."""
  return {n for n, _ in model.named_parameters()
          if ".adapter." in n or n.endswith("layer_norm.weight")}


def _flat(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dict (or an already flat {'a/b/c': array}) -> {'a/b/c': array}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flat(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = np.asarray(value)
  return flat


def load_expert(model: nn.Module, expert: Mapping) -> None:
  """Copies one elm_jax expert tree (numpy leaves) into the model's adapters and layer norms.
  Every expert leaf must land on a parameter of the right shape, and every parameter an expert
  owns must be set."""
  params = dict(model.named_parameters())
  written = set()
  with torch.no_grad():
    for path, value in _flat(expert).items():
      name, transpose = torch_name(path)
      value = np.ascontiguousarray(value.T if transpose else value, np.float32)
      target = params[name]
      if tuple(target.shape) != value.shape:
        raise ValueError(f"{path} -> {name}: shape {value.shape}, the model has {tuple(target.shape)}")
      target.copy_(torch.from_numpy(value))
      written.add(name)
  unset = expert_parameter_names(model) - written
  if unset:
    raise ValueError(f"the expert sets no value for {len(unset)} parameter(s), e.g. {sorted(unset)[0]}")


# ------------------------------------------------------------------------------ scoring
def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
  """Token rows -> int64 [rows, longest], padded with `value`."""
  out = np.full((len(rows), max(len(r) for r in rows)), value, np.int64)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return torch.from_numpy(out).to(DEVICE)


def _num_choices(examples) -> int:
  return max(len(choices) for _, choices in examples)


@torch.inference_mode()
def score_paper_way(model, experts: Sequence[Mapping], examples, batch_size: int) -> np.ndarray:
  """The paper's `verbalizer_compute_loss`: every (input, choice) pair is its own row, the input
  repeated for each choice; `batch_size` rows per forward pass, inputs padded to the batch's
  longest, labels (choice + EOS) padded with -100. A choice's score is the sum of the
  log-softmax of its label tokens, EOS included.

  examples: [(input ids with EOS, [choice ids with EOS, ...]), ...]. Returns [E, N, C] float32
  (-inf where an example has fewer than C choices)."""
  model.eval()
  rows = [(n, c, inputs, choice) for n, (inputs, choices) in enumerate(examples)
          for c, choice in enumerate(choices)]
  scores = np.full((len(experts), len(examples), _num_choices(examples)), -np.inf, np.float32)
  for e, expert in enumerate(experts):
    load_expert(model, expert)
    for start in range(0, len(rows), batch_size):
      batch = rows[start:start + batch_size]
      input_ids = _pad([r[2] for r in batch], PAD_ID)
      labels = _pad([r[3] for r in batch], IGNORE)
      logits = model(input_ids=input_ids, attention_mask=input_ids != PAD_ID, labels=labels).logits
      log_probs = torch.log_softmax(logits, dim=-1)
      mask = labels != IGNORE
      token = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
      row_scores = torch.where(mask, token, 0.0).sum(-1).cpu().numpy()
      for (n, c, _, _), score in zip(batch, row_scores):
        scores[e, n, c] = score
  return scores


@torch.inference_mode()
def score_careful(model, experts: Sequence[Mapping], examples, batch_size: int) -> np.ndarray:
  """The same scores, computed with care: per batch of `batch_size` inputs the encoder runs
  once, its output is repeated for each input's choices, and the decoder runs once on all the
  batch's choices padded to the longest of them (no KV cache, no loss computation)."""
  model.eval()
  scores = np.full((len(experts), len(examples), _num_choices(examples)), -np.inf, np.float32)
  encoder = model.get_encoder()
  for e, expert in enumerate(experts):
    load_expert(model, expert)
    for start in range(0, len(examples), batch_size):
      batch = examples[start:start + batch_size]
      input_ids = _pad([inputs for inputs, _ in batch], PAD_ID)
      mask = input_ids != PAD_ID
      hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
      counts = torch.tensor([len(choices) for _, choices in batch], device=DEVICE)
      targets = _pad([choice for _, choices in batch for choice in choices], PAD_ID)
      decoder_inputs = torch.cat([torch.full_like(targets[:, :1], model.config.decoder_start_token_id),
                                  targets[:, :-1]], dim=1)
      logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(counts, 0)),
                     attention_mask=mask.repeat_interleave(counts, 0), decoder_input_ids=decoder_inputs,
                     use_cache=False).logits
      token = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
      row_scores = torch.where(targets != PAD_ID, token, 0.0).sum(-1).cpu().numpy()
      row = 0
      for n, (_, choices) in enumerate(batch, start=start):
        scores[e, n, :len(choices)] = row_scores[row:row + len(choices)]
        row += len(choices)
  return scores


# ----------------------------------------------------------------------------- training
def set_dropout(model: nn.Module, rate: float) -> None:
  """Every dropout of the model (sub-layer outputs, embeddings, feed-forward, and the attention
  probabilities, which T5Attention keeps as a float) to `rate`."""
  for module in model.modules():
    if isinstance(module, nn.Dropout):
      module.p = rate
    elif isinstance(module, T5Attention):
      module.dropout = rate


def train_sequential(model, expert_inits: Sequence[Mapping], batches: Mapping[str, np.ndarray],
                     steps: int, *, dropout_rate: float = 0.1, learning_rate: float = 1e-4,
                     seed: int = 0) -> np.ndarray:
  """Trains the experts one after another, each from its initial tree on its own batches.

  The paper's recipe, as elm_jax's default optimizer: only the adapters and layer-norm scales
  train; AdamW (0.9, 0.999, eps 1e-8, no weight decay), gradient norm clipped to 1.0, learning
  rate decayed linearly from `learning_rate` to 0 over `steps`; dropout `dropout_rate` in train
  mode. The loss is Hugging Face's: token-mean cross-entropy over non-padding targets (padding
  0 becomes label -100), as elm_jax's `expert_loss`.

  batches: `encoder_input_tokens` [E, steps, B, Li] and `decoder_target_tokens` [E, steps, B,
  Lt], 0 = padding. Returns the loss of every step [E, steps] (last column: the final loss).
  """
  torch.manual_seed(seed)
  set_dropout(model, dropout_rate)
  owned = expert_parameter_names(model)
  trainable = []
  for name, param in model.named_parameters():
    param.requires_grad_(name in owned)
    if name in owned:
      trainable.append(param)
  losses = np.zeros((len(expert_inits), steps), np.float32)
  model.train()
  try:
    for e, init in enumerate(expert_inits):
      load_expert(model, init)
      optimizer = torch.optim.AdamW(trainable, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=0.0)
      schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / steps))
      for step in range(steps):
        inputs = torch.from_numpy(batches["encoder_input_tokens"][e, step]).long().to(DEVICE)
        targets = torch.from_numpy(batches["decoder_target_tokens"][e, step]).long().to(DEVICE)
        loss = model(input_ids=inputs, attention_mask=inputs != PAD_ID,
                     labels=targets.masked_fill(targets == PAD_ID, IGNORE)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses[e, step] = loss.item()
  finally:
    model.eval()
  return losses


# ------------------------------------------------------------------------------- worker
def _experts_from_npz(path: str) -> list[dict[str, np.ndarray]]:
  """A stacked expert file ({'a/b/c': [E, ...]}) -> E flat expert trees."""
  with np.load(path) as data:
    stacked = {key: data[key] for key in data.files}
  count = next(iter(stacked.values())).shape[0]
  return [{key: value[e] for key, value in stacked.items()} for e in range(count)]


def _examples_from_json(path: str):
  with open(path) as f:
    raw = json.load(f)
  return [(list(ex["inputs"]), [list(c) for c in ex["choices"]]) for ex in raw]


def _batches_from_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {key: data[key] for key in data.files}


class _Worker:
  """Holds the model and every file read so far; answers requests (see `_handle`)."""

  def __init__(self):
    self.model = None
    self.files: dict[str, object] = {}

  def _read(self, path: str, reader):
    if path not in self.files:
      self.files[path] = reader(path)
    return self.files[path]

  def handle(self, request: dict) -> dict:
    """Requests: {op: 'setup', hf_dir, device?} loads the model (on 'cpu' or 'cuda'); {op: 'score', way: 'paper'|'careful',
    experts, num_experts, examples, num_examples?, batch_size, float64?, save?} scores the
    (first `num_examples`) examples with the first `num_experts` experts of a stacked .npz, in
    float64 if asked; {op: 'train', experts, num_experts, batches, steps, dropout_rate, float64?}
    trains the first `num_experts` experts (from their initial trees) and returns their losses.
    `seconds` in the reply times the scoring or training call only (files are read before it);
    `save` writes the scores (.npy)."""
    op = request["op"]
    if op == "setup":
      global DEVICE
      DEVICE = torch.device(request.get("device", "cpu"))
      if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but this PyTorch sees no CUDA device")
      self.model = build_model(request["hf_dir"]).to(DEVICE)
      return {"torch": torch.__version__, "transformers": transformers.__version__,
              "numpy": np.__version__, "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"}
    experts = self._read(request["experts"], _experts_from_npz)[:request["num_experts"]]
    if op == "score":
      examples = self._read(request["examples"], _examples_from_json)[:request.get("num_examples")]
      fn = {"paper": score_paper_way, "careful": score_careful}[request["way"]]
      if request.get("float64"):  # a reference for float32 rounding, never timed
        self.model.double()
      try:
        start = time.perf_counter()
        scores = fn(self.model, experts, examples, request["batch_size"])
        _synchronize()
        seconds = time.perf_counter() - start
      finally:
        self.model.float()  # exact: every weight came from float32
      if request.get("save"):
        np.save(request["save"], scores)
      return {"seconds": seconds}
    if op == "train":
      batches = self._read(request["batches"], _batches_from_npz)
      if request.get("float64"):
        self.model.double()
      try:
        start = time.perf_counter()
        losses = train_sequential(self.model, experts, batches, request["steps"],
                                  dropout_rate=request["dropout_rate"])
        _synchronize()
        seconds = time.perf_counter() - start
      finally:
        self.model.float()
      return {"seconds": seconds, "losses": losses.tolist()}
    raise ValueError(f"unknown op {op!r}")


def serve() -> None:
  """Answers JSON requests, one per line, until stdin closes. Replies go to the original
  stdout; anything else printed (library warnings) is sent to stderr."""
  replies = open(os.dup(sys.stdout.fileno()), "w", buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  worker = _Worker()
  for line in sys.stdin:
    if not line.strip():
      continue
    try:
      reply = dict(worker.handle(json.loads(line)), ok=True)
    except Exception:  # reported to the caller, which stops the benchmark
      reply = {"ok": False, "error": traceback.format_exc()}
    replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
  if sys.argv[1:] != ["serve"]:
    sys.exit(f"usage: {sys.argv[0]} serve   (a worker for bench/head_to_head.py)")
  serve()
