"""The PyTorch backend: PEFT adapters laid out by the zone plan, TRL's SFT and DPO trainers.

The DPO reference is the SFT policy without a second model: TRL keeps a frozen copy of the
adapter (named "ref", a few MB) and switches to it for the reference pass; it is dropped after
DPO, so the saved adapter is always the single "default" one.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from pathlib import Path

from qwenforge.errors import QwenforgeError
from qwenforge.train import ranks
from qwenforge.train.config import DpoSettings, OptimizerSettings, SftSettings
from qwenforge.train.zones import ZonePlan, apply_zone_dropout, lora_config


@contextlib.contextmanager
def _quiet():
    """Trainer chatter off: datasets' bars, the log printer's dicts, deprecation notes from TRL's calls."""
    import datasets

    datasets.disable_progress_bars()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*(gradient checkpointing|use_cache|padding-free|packing).*")
        yield


def _without_printer(trainer):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def latest_checkpoint(work_dir: Path) -> str | None:
    """The newest `checkpoint-N` a Trainer left in work_dir, to resume from."""
    found = sorted(Path(work_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def _callback(stop: threading.Event | None, on_log):
    from transformers import TrainerCallback

    class Hooks(TrainerCallback):
        """Forwards logs; on a stop request, saves a checkpoint at this step and ends training."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log and logs:
                on_log({"step": state.global_step, "max_steps": state.max_steps, **logs})

        def on_step_end(self, args, state, control, **kwargs):
            if stop is not None and ranks.any_set(stop.is_set()):  # all processes stop at the same step
                control.should_save = True
                control.should_training_stop = True
            return control

    return Hooks()


# qwenforge's optimizer names -> Trainer's `optim` (the last three are bitsandbytes').
OPTIMIZERS = {"adamw": "adamw_torch", "adamw-8bit": "adamw_bnb_8bit", "paged-adamw": "paged_adamw_32bit", "paged-adamw-8bit": "paged_adamw_8bit"}


def train_device() -> str:
    """Where the Trainer runs: CUDA, else Apple's MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def refusal(settings: OptimizerSettings, device: str) -> str | None:
    """Why this backend cannot honour a stage's settings on `device`, in one line; None when it can."""
    import importlib.util

    import torch

    if settings.optimizer != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
        return f"optimizer: {settings.optimizer} needs bitsandbytes (`pip install bitsandbytes`); or set optimizer: adamw"
    if settings.mixed_precision == "fp16" and device == "cpu":
        return "mixed_precision: fp16 needs a GPU (CUDA or MPS); on a CPU use bf16 or none"
    if settings.mixed_precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        return "mixed_precision: bf16 is not supported by this GPU; use fp16 or none"
    return None


def stage_args(settings: OptimizerSettings) -> dict:
    """The Trainer arguments SFT and DPO share; `train.schedule.learning_rate_at` gives the same curve."""
    return {
        "learning_rate": settings.learning_rate,
        "gradient_accumulation_steps": settings.grad_accumulation,
        "warmup_steps": settings.warmup_steps or settings.warmup_ratio,  # Trainer: a float below 1 is a ratio
        "weight_decay": settings.weight_decay,
        "lr_scheduler_type": settings.scheduler,
        "max_grad_norm": settings.max_grad_norm,
        "bf16": settings.mixed_precision == "bf16",
        "fp16": settings.mixed_precision == "fp16",
        "optim": OPTIMIZERS[settings.optimizer],
        "gradient_checkpointing": settings.gradient_checkpointing,
        "save_steps": settings.save_steps,
        "per_device_train_batch_size": settings.batch_size,
        "max_length": settings.max_seq_length,
    }


class PyTorchBackend:
    name = "pytorch"

    def __init__(self):
        self.model = None  # a PeftModel while an adapter is attached, else the plain model
        self.tokenizer = None
        self.plan: ZonePlan | None = None

    # -- model and adapter ---------------------------------------------------------------
    def load(self, model_path: Path, plan: ZonePlan, quantization: str = "none", seed: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        kwargs = {"dtype": torch.float32}
        if quantization == "nf4":
            kwargs = {"quantization_config": _nf4_config(), "dtype": torch.bfloat16}
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.plan = plan

    def start_adapter(self) -> None:
        """A fresh adapter exactly as the zone plan lays it out."""
        from peft import get_peft_model

        if self.has_adapter():
            raise RuntimeError("an adapter is already attached; merge or continue it, never stack a second one")
        self.model = get_peft_model(self.model, lora_config(self.plan))
        apply_zone_dropout(self.model, self.plan)

    def load_adapter(self, folder: Path) -> None:
        """Attach a saved adapter, trainable, to continue training it."""
        from peft import PeftModel

        if self.has_adapter():
            raise RuntimeError("an adapter is already attached; never stack a second one")
        self.model = PeftModel.from_pretrained(self.model, str(folder), is_trainable=True)
        apply_zone_dropout(self.model, self.plan)

    def merge_adapter(self) -> None:
        """Fold the adapter into the weights in memory; the next topic starts a fresh one."""
        self.model = self.model.merge_and_unload()

    def has_adapter(self) -> bool:
        return hasattr(self.model, "peft_config")

    def save_adapter(self, folder: Path) -> None:
        """A standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
        self.model.save_pretrained(str(folder), selected_adapters=["default"], safe_serialization=True)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def adapter_fingerprint(self) -> float:
        """Sum of |w| over the trainable weights: equal on every process when DDP kept them in step."""
        return float(sum(p.detach().double().abs().sum() for p in self.model.parameters() if p.requires_grad))

    # -- training ------------------------------------------------------------------------
    def _common_args(self, work_dir: Path, seed: int, settings: OptimizerSettings) -> dict:
        import importlib.util

        return {
            **stage_args(settings),
            "output_dir": str(work_dir),
            "logging_steps": 1,
            "save_strategy": "steps",
            "save_total_limit": 2,
            "report_to": ["tensorboard"] if importlib.util.find_spec("tensorboard") else [],
            "disable_tqdm": True,
            "seed": seed,
            "use_cpu": train_device() == "cpu",
            "dataloader_num_workers": 0,
        }

    def sft(self, records: list[dict], settings: SftSettings, work_dir: Path, seed: int = 0,
            resume: bool = False, stop: threading.Event | None = None, on_log=None) -> dict:
        """Supervised fine-tuning with loss on the assistant's answer only; returns the train metrics."""
        import torch
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        batch, accumulation = settings.batch_size, settings.grad_accumulation
        if settings.packing and train_device() != "cuda":
            # Padding-free packing flattens a batch into one row; without a varlen kernel (CPU SDPA) that
            # row's attention is computed in full and masked block-diagonally, so a batch of 4 rows of
            # 256 costs 1024^2 attention. One packed row per micro-step keeps it at 256^2; accumulating
            # `batch_size` of them keeps the tokens per optimizer step.
            batch, accumulation = 1, settings.batch_size * settings.grad_accumulation
        with _quiet():
            args = SFTConfig(
                **{**self._common_args(work_dir, seed, settings), "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation},
                num_train_epochs=settings.epochs,
                max_steps=settings.max_steps,
                packing=settings.packing,
            )
        with _quiet():
            trainer = _without_printer(SFTTrainer(
                model=self.model,
                args=args,
                train_dataset=Dataset.from_list(records),
                processing_class=self.tokenizer,
                callbacks=[_callback(stop, on_log)],
            ))
            output = trainer.train(resume_from_checkpoint=latest_checkpoint(work_dir) if resume else None)
        return {**output.metrics, "steps": trainer.state.global_step, "interrupted": bool(stop and stop.is_set())}

    def dpo(self, records: list[dict], settings: DpoSettings, work_dir: Path, seed: int = 0,
            resume: bool = False, stop: threading.Event | None = None, on_log=None) -> dict:
        """DPO against the current (SFT) policy as reference; returns train metrics and the final margin."""
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        with _quiet():
            args = DPOConfig(
                **self._common_args(work_dir, seed, settings),
                max_steps=settings.steps,
                beta=settings.beta,
                loss_type=[settings.loss_type],
            )
        margins = []

        def collect(logs):
            if "rewards/margins" in logs:
                margins.append(logs["rewards/margins"])
            if on_log:
                on_log(logs)

        try:
            with _quiet():
                trainer = _without_printer(DPOTrainer(
                    model=self.model,
                    args=args,
                    train_dataset=Dataset.from_list(records),
                    processing_class=self.tokenizer,
                    callbacks=[_callback(stop, collect)],
                ))
                output = trainer.train(resume_from_checkpoint=latest_checkpoint(work_dir) if resume else None)
        finally:
            if "ref" in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter("ref")
                self.model.set_adapter("default")
        return {
            **output.metrics,
            "steps": trainer.state.global_step,
            "reward_margin_first": margins[0] if margins else None,
            "reward_margin_last": margins[-1] if margins else None,
            "interrupted": bool(stop and stop.is_set()),
        }

    # -- inference -----------------------------------------------------------------------
    def generate(self, conversations: list[list[dict]], max_new_tokens: int = 96, batch_size: int = 8) -> list[str]:
        """Greedy answers to chat conversations, through the model's chat template."""
        import torch

        was_training = self.model.training
        self.model.eval()
        self.tokenizer.padding_side = "left"
        answers = []
        try:
            for start in range(0, len(conversations), batch_size):
                chunk = conversations[start:start + batch_size]
                texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
                batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
                with torch.no_grad(), _quiet():
                    out = self.model.generate(
                        **batch, max_new_tokens=max_new_tokens, do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                new = out[:, batch["input_ids"].shape[1]:]
                answers += [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        finally:
            self.tokenizer.padding_side = "right"
            self.model.train(was_training)
        return answers

    def loss(self, records: list[dict], max_length: int = 512) -> float:
        """Mean next-token loss on the answers of prompt/completion records (for tests and the demo)."""
        import torch

        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for record in records:
                prompt = self.tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
                full = self.tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=False)
                prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                ids = self.tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_length]
                labels = ids.clone()
                labels[:, : len(prompt_ids)] = -100
                total += float(self.model(input_ids=ids.to(self.model.device), labels=labels.to(self.model.device)).loss)
                count += 1
        return total / max(count, 1)


def check_nf4(source: str = "config") -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU (its 4-bit kernels); say so in one line, before any work."""
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise QwenforgeError(f"{source}: quantization: nf4 needs bitsandbytes; `pip install bitsandbytes` or set quantization: none")
    if not torch.cuda.is_available():
        raise QwenforgeError(
            f"{source}: quantization: nf4 needs a CUDA GPU (bitsandbytes 4-bit); on this CPU set quantization: none, "
            "or use backend: mlx with a 4-bit base"
        )


def _nf4_config():
    """QLoRA's quantization: nf4, double quantization, bf16 compute."""
    check_nf4()
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )
