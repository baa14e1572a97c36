"""The MLX backend (`pip install "qwenforge[mlx]"`): mlx-lm models with the zone plan applied by us.

mlx-lm's own LoRA covers the last N layers uniformly, so each (layer, module) of the plan is
wrapped here with mlx-lm's LoRALinear at the zone's rank and scale alpha/r (PEFT's scaling).
SFT is a masked cross-entropy on the answer tokens; DPO uses `dpo_loss` below against reference
log-probabilities computed once from the SFT policy before DPO starts (no second model). Adapters
are written and read in PEFT's format (lora_A = lora_a^T, lora_B = lora_b^T), so an adapter
trained here loads in PEFT and the other way round. `quantization: nf4` maps to an MLX 4-bit
quantized base (mlx's own affine 4-bit, group size 64, on the decoder blocks' linears): QLoRA the
MLX way.
Every optimizer setting of the config is honoured as the PyTorch backend does (`_run`: the shared
learning-rate schedule, warmup, weight decay, accumulation, clipping, checkpointing, precision);
bitsandbytes optimizers and the robust DPO loss are refused in one line (`refusal`).
Resume restores the adapter and step from the last checkpoint; the optimizer restarts.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from pathlib import Path

from qwenforge.arch.spec import ATTENTION_PROJECTIONS
from qwenforge.errors import QwenforgeError
from qwenforge.train.config import DpoSettings, OptimizerSettings, SftSettings
from qwenforge.train.schedule import learning_rate_at
from qwenforge.train.zones import ZonePlan, lora_config

PEFT_PREFIX = "base_model.model.model.layers"


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float, loss_type: str = "sigmoid"):
    """Per-pair DPO loss and reward margin from summed answer log-probs (arrays of shape [batch])."""
    import mlx.core as mx

    logits = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        losses = mx.logaddexp(0.0, -beta * logits)  # -log sigmoid(beta * logits), stable
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = mx.maximum(0.0, 1 - beta * logits)
    else:
        raise QwenforgeError(f"dpo.loss_type {loss_type!r}: the mlx backend supports sigmoid, ipo and hinge")
    return losses, beta * logits


def refusal(settings, device: str = "mlx") -> str | None:
    """A setting this backend cannot honour, as `field: why` (one line); None when it honours them all."""
    if settings.optimizer != "adamw":
        return f"optimizer: {settings.optimizer} is a bitsandbytes optimizer (PyTorch); the mlx backend has adamw"
    if getattr(settings, "loss_type", "sigmoid") == "robust":
        return "loss_type: robust is not implemented by the mlx backend; use sigmoid, ipo or hinge"
    return None


def check_run(config) -> str | None:
    """Run-wide limits: the base weights are held in one dtype for the whole run."""
    if config.sft.mixed_precision != config.dpo.mixed_precision and config.dpo.enabled:
        return ("dpo.mixed_precision: the mlx backend holds the base weights in one dtype for the whole run; "
                f"set sft.mixed_precision and dpo.mixed_precision alike (sft has {config.sft.mixed_precision})")
    return None


@contextlib.contextmanager
def _checkpointed(block_type):
    """Gradient checkpointing for every decoder block while training (mlx-lm's recipe, undone after)."""
    import mlx.core as mx

    plain = block_type.__call__

    def call(block, *args, **kwargs):
        def inner(params, *args, **kwargs):
            block.update(params)
            return plain(block, *args, **kwargs)

        return mx.checkpoint(inner)(block.trainable_parameters(), *args, **kwargs)

    block_type.__call__ = call
    try:
        yield
    finally:
        block_type.__call__ = plain


def _block_linear(path: str, module) -> bool:
    import mlx.nn as nn

    return isinstance(module, nn.Linear) and ".layers." in f".{path}"


def _require_mlx():
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as error:
        raise QwenforgeError('backend mlx needs mlx and mlx-lm; `pip install "qwenforge[mlx]"` (on Linux: mlx[cpu])') from error


class MlxBackend:
    name = "mlx"

    def __init__(self):
        _require_mlx()
        self.model = None
        self.tokenizer = None  # the Hugging Face tokenizer (chat template)
        self.plan: ZonePlan | None = None
        self.wrapped: dict[tuple[int, str], object] = {}  # (layer, module) -> LoRALinear

    # -- model and adapter ---------------------------------------------------------------
    def load(self, model_path: Path, plan: ZonePlan, quantization: str = "none", seed: int = 0) -> None:
        import mlx.core as mx
        import mlx.nn as nn
        from mlx_lm import load

        mx.random.seed(seed)
        self.model, wrapper = load(str(model_path))
        self.tokenizer = wrapper._tokenizer
        if quantization == "nf4":
            # QLoRA laid out as the PyTorch backend (bitsandbytes) and `qwenforge plan` count it: the
            # decoder blocks' linears in 4 bits (MLX affine: groups of 64, a scale and bias each in the
            # checkpoint's dtype), embeddings, lm_head and norms as stored. mlx-lm's own conversion
            # also quantizes the embeddings.
            nn.quantize(self.model, group_size=64, bits=4, class_predicate=_block_linear)
        self.model.freeze()
        self.plan = plan

    def _module(self, layer: int, name: str):
        block = self.model.layers[layer]
        parent = block.self_attn if name in ATTENTION_PROJECTIONS else block.mlp
        return parent, getattr(parent, name)

    def has_adapter(self) -> bool:
        return bool(self.wrapped)

    def start_adapter(self) -> None:
        """Wrap exactly the plan's (layer, module) pairs; nothing else trains."""
        from mlx_lm.tuner.lora import LoRALinear

        if self.has_adapter():
            raise RuntimeError("an adapter is already attached; merge or continue it, never stack a second one")
        self.model.freeze()
        for row in self.plan.rows:
            for name in row.modules:
                parent, linear = self._module(row.layer, name)
                lora = LoRALinear.from_base(linear, r=row.r, dropout=row.dropout, scale=row.alpha / row.r)
                setattr(parent, name, lora)
                self.wrapped[(row.layer, name)] = lora
        self.model.eval()  # new modules start in training mode (dropout on); training turns it on itself

    def trainable_parameters(self) -> int:
        from mlx.utils import tree_flatten

        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    def _peft_key(self, layer: int, name: str, which: str) -> str:
        group = "self_attn" if name in ATTENTION_PROJECTIONS else "mlp"
        return f"{PEFT_PREFIX}.{layer}.{group}.{name}.lora_{which}.weight"

    def save_adapter(self, folder: Path) -> None:
        """PEFT's adapter folder: adapter_config.json from the same LoraConfig, torch-layout tensors."""
        import mlx.core as mx
        import numpy as np
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for (layer, name), lora in self.wrapped.items():
            tensors[self._peft_key(layer, name, "A")] = np.ascontiguousarray(np.array(lora.lora_a.astype(mx.float32)).T)
            tensors[self._peft_key(layer, name, "B")] = np.ascontiguousarray(np.array(lora.lora_b.astype(mx.float32)).T)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = lora_config(self.plan).to_dict()
        config["target_modules"] = lora_config(self.plan).target_modules
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")

    def load_adapter(self, folder: Path) -> None:
        import mlx.core as mx
        import numpy as np
        from safetensors.numpy import load_file

        self.start_adapter()
        tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
        for (layer, name), lora in self.wrapped.items():
            lora.lora_a = mx.array(np.ascontiguousarray(tensors[self._peft_key(layer, name, "A")].T))
            lora.lora_b = mx.array(np.ascontiguousarray(tensors[self._peft_key(layer, name, "B")].T))

    def merge_adapter(self) -> None:
        for (layer, name), lora in self.wrapped.items():
            parent, _ = self._module(layer, name)
            setattr(parent, name, lora.fuse())
        self.wrapped = {}
        self.model.freeze()

    # -- data ------------------------------------------------------------------------------
    def _chat_ids(self, conversation: list[dict], add_generation_prompt: bool = False) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode(self, prompt: list[dict], answer: list[dict], max_length: int) -> tuple[list[int], int]:
        """Token ids of prompt + answer, and where the answer starts (the loss is on the answer)."""
        start = len(self._chat_ids(prompt, add_generation_prompt=True))
        ids = self._chat_ids(prompt + answer)[:max_length]
        return ids, min(start, len(ids) - 1)

    def _answer_logps(self, batch: list[tuple[list[int], int]]):
        """Summed log-probabilities of each sequence's answer tokens, plus the token count."""
        import mlx.core as mx
        import mlx.nn as nn

        width = max(len(ids) for ids, _ in batch)
        tokens = mx.array([ids + [0] * (width - len(ids)) for ids, _ in batch])
        lengths = mx.array([[start, len(ids) - 1] for ids, start in batch])
        logits = self.model(tokens[:, :-1])
        positions = mx.arange(width - 1)[None, :]
        mask = (positions >= lengths[:, :1] - 1) & (positions < lengths[:, 1:])
        logps = -nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask
        return logps.sum(axis=1), mask.sum(axis=1)

    # -- training --------------------------------------------------------------------------
    def _set_precision(self, precision: str) -> None:
        """Mixed precision the MLX way: the frozen base computes in bf16/fp16, adapters and optimizer stay float32."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        dtype = {"none": None, "bf16": mx.bfloat16, "fp16": mx.float16}[precision]
        if dtype is None:
            return
        trainable = {k for k, _ in tree_flatten(self.model.trainable_parameters())}
        cast = [(k, v.astype(dtype)) for k, v in tree_flatten(self.model.parameters())
                if k not in trainable and mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype]
        if cast:
            self.model.load_weights(cast, strict=False)

    def _run(self, loss_fn, micro_batches, settings: OptimizerSettings, steps, work_dir, resume, stop, on_log, extra_logs, dropout=True):
        """The optimizer loop both stages share: `settings.grad_accumulation` micro-batches per step, each
        weighted by what its loss averages over; clipping at max_grad_norm; AdamW with bias correction and
        weight decay (torch's AdamW); the rate of `schedule.learning_rate_at` at every step."""
        import mlx.core as mx
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx.utils import tree_map

        work_dir = Path(work_dir)
        first = 0
        if resume and (work_dir / "last").exists():
            state = json.loads((work_dir / "last" / "state.json").read_text())
            self._restore(work_dir / "last")
            first = state["step"]
        self._set_precision(settings.mixed_precision)
        optimizer = optim.AdamW(learning_rate=settings.learning_rate, weight_decay=settings.weight_decay, bias_correction=True)
        step_fn = nn.value_and_grad(self.model, loss_fn)
        started = time.perf_counter()
        self.model.train(dropout)  # DPO runs without dropout, as its reference pass did (TRL does the same)
        step = first
        checkpointing = _checkpointed(type(self.model.layers[0])) if settings.gradient_checkpointing else contextlib.nullcontext()
        with checkpointing:
            for step in range(first + 1, steps + 1):
                rate = learning_rate_at(step - 1, settings, steps)
                optimizer.learning_rate = rate
                total, weight, grads, extras = 0.0, 0.0, None, []
                for batch in micro_batches(step - 1):
                    (loss, size, aux), micro = step_fn(*batch)
                    size = float(size)
                    micro = tree_map(lambda g: g * size, micro)
                    grads = micro if grads is None else tree_map(lambda a, b: a + b, grads, micro)
                    total, weight = total + float(loss) * size, weight + size
                    extras.append(aux)
                grads = tree_map(lambda g: g / weight, grads)
                grad_norm = None
                if settings.max_grad_norm > 0:
                    grads, grad_norm = optim.clip_grad_norm(grads, settings.max_grad_norm)
                optimizer.update(self.model, grads)
                mx.eval(self.model.trainable_parameters(), optimizer.state)
                record = {"step": step, "max_steps": steps, "loss": total / weight, "learning_rate": rate, **extra_logs(extras)}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if on_log:
                    on_log(record)
                if step % settings.save_steps == 0 or (stop is not None and stop.is_set()):
                    self._checkpoint(work_dir / "last", step)
                if stop is not None and stop.is_set():
                    break
        self.model.eval()
        return {"train_runtime": time.perf_counter() - started, "steps": step, "interrupted": bool(stop and stop.is_set())}

    def _checkpoint(self, folder: Path, step: int) -> None:
        self.save_adapter(folder)
        (folder / "state.json").write_text(json.dumps({"step": step}))

    def _restore(self, folder: Path) -> None:
        import mlx.core as mx
        import numpy as np
        from safetensors.numpy import load_file

        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for (layer, name), lora in self.wrapped.items():
            lora.lora_a = mx.array(np.ascontiguousarray(tensors[self._peft_key(layer, name, "A")].T))
            lora.lora_b = mx.array(np.ascontiguousarray(tensors[self._peft_key(layer, name, "B")].T))

    def sft(self, records: list[dict], settings: SftSettings, work_dir: Path, seed: int = 0,
            resume: bool = False, stop: threading.Event | None = None, on_log=None) -> dict:
        """Answer-only cross-entropy; an optimizer step averages over every answer token of its micro-batches."""
        import random

        encoded = [self._encode(r["prompt"], r["completion"], settings.max_seq_length) for r in records]
        micro_per_epoch = math.ceil(len(encoded) / settings.batch_size)
        per_epoch = math.ceil(micro_per_epoch / settings.grad_accumulation)  # the Trainer's count of updates
        steps = settings.max_steps if settings.max_steps > 0 else max(1, math.ceil(settings.epochs * per_epoch))
        order = list(range(len(encoded)))
        random.Random(seed).shuffle(order)

        def micro_batches(index):
            for micro in range(index * settings.grad_accumulation, (index + 1) * settings.grad_accumulation):
                start = (micro % micro_per_epoch) * settings.batch_size
                yield ([encoded[i] for i in (order * 2)[start:start + settings.batch_size]],)

        def loss_fn(batch):
            logps, counts = self._answer_logps(batch)
            return -logps.sum() / counts.sum(), counts.sum(), counts.sum()

        return self._run(loss_fn, micro_batches, settings, steps, work_dir, resume, stop, on_log,
                         lambda extras: {"num_tokens": int(sum(int(a) for a in extras))})

    def dpo(self, records: list[dict], settings: DpoSettings, work_dir: Path, seed: int = 0,
            resume: bool = False, stop: threading.Event | None = None, on_log=None) -> dict:
        import mlx.core as mx

        pairs = [
            (self._encode(r["prompt"], r["chosen"], settings.max_seq_length), self._encode(r["prompt"], r["rejected"], settings.max_seq_length))
            for r in records
        ]
        self.model.eval()
        reference = []  # the SFT policy's log-probs, computed before DPO changes it
        for chosen, rejected in pairs:
            logps, _ = self._answer_logps([chosen, rejected])
            mx.eval(logps)
            reference.append((logps[0], logps[1]))
        micro_per_epoch = math.ceil(len(pairs) / settings.batch_size)
        margins = []

        def micro_batches(index):
            for micro in range(index * settings.grad_accumulation, (index + 1) * settings.grad_accumulation):
                start = (micro % micro_per_epoch) * settings.batch_size
                yield ((list(range(len(pairs))) * 2)[start:start + settings.batch_size],)

        def loss_fn(picked):
            batch = [pairs[i][0] for i in picked] + [pairs[i][1] for i in picked]
            logps, _ = self._answer_logps(batch)
            n = len(picked)
            ref_chosen = mx.stack([reference[i][0] for i in picked])
            ref_rejected = mx.stack([reference[i][1] for i in picked])
            losses, margin = dpo_loss(logps[:n], logps[n:], ref_chosen, ref_rejected, settings.beta, settings.loss_type)
            return losses.mean(), n, margin.mean()

        def extra(extras):
            margin = sum(float(a) for a in extras) / len(extras)
            margins.append(margin)
            return {"rewards/margins": margin}

        result = self._run(loss_fn, micro_batches, settings, settings.steps, work_dir, resume, stop, on_log, extra, dropout=False)
        return {**result, "reward_margin_first": margins[0] if margins else None, "reward_margin_last": margins[-1] if margins else None}

    # -- inference -------------------------------------------------------------------------
    def generate(self, conversations: list[list[dict]], max_new_tokens: int = 96) -> list[str]:
        from mlx_lm import generate

        self.model.eval()
        answers = []
        for conversation in conversations:
            ids = self._chat_ids(conversation, add_generation_prompt=True)
            answers.append(generate(self.model, self.tokenizer, prompt=ids, max_tokens=max_new_tokens, verbose=False).strip())
        return answers

    def loss(self, records: list[dict], max_length: int = 512) -> float:
        self.model.eval()
        total = 0.0
        for record in records:
            logps, count = self._answer_logps([self._encode(record["prompt"], record["completion"], max_length)])
            total += float(-logps.sum() / count.sum())
        return total / max(len(records), 1)
