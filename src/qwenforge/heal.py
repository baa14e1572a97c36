"""`qwenforge heal CONVERTED OUT --teacher SOURCE`: give back the fidelity a conversion cost.

Self-distillation with the distillation engine: the source model is the teacher, the converted
Qwen3 model the student. Methods:
- anchor (closed form, the default; needs the q/k biases a conversion keeps by default): per layer one
  RoPE dimension pair of q and k becomes a large per-head constant (bias) with norm weight 0, so every
  head's RMS is nearly constant over tokens and RMSNorm acts as a fixed scale the norm weight undoes.
  Weights stay in their normal range (float16, GGUF blocks and fine-tuning keep working); the pair
  given up is the one whose score term varies least across keys on the healing text.
- anchor+global: anchor, then the global phase below.
- layerwise: each converted attention gets the source's own hidden states as input and is fit
  to the source layer's attention output (all layers at once, independent, no LM head);
- global: KL between the two models' next-token distributions on the healing text.
- linearize (closed form, fragile: exact in float32/bfloat16 only): scale each q/k projection down so
  that every head's mean square stays below margin^2 * eps; then RMSNorm is linear (x / sqrt(eps))
  and the norm weight sqrt(eps)/scale undoes the scaling. The ~1e-7 q/k weights underflow in float16
  and GGUF block scales and break under fine-tuning; train, distill and float16 inference refuse
  such a checkpoint (convert/qk_norm.py: fragile_qk_reason).
Only what the conversion changed is trained (`--train norms`: q_norm/k_norm; `norms+qk-lora`:
plus low-rank q/k updates merged back; `attention`: every attention weight; `vocabulary`: after a
transplant to another tokenizer, one map that places every new token's embedding/head row
(vocab_heal.py) and low-rank updates of every layer's projections, merged back, so the layers learn
to read and predict the new tokenization, with cross-entropy on the text beside the KL and text
sampled from the teacher (distill/samples.py); benchmarks/vocab_transplant.py). Held-out KL picks
the best checkpoint (bits per byte with --train vocabulary: the held-out KL sees shared tokens only); the
output is a plain Qwen3 checkpoint plus heal_report.json and a plot.
A teacher that does not fit beside the student is refused with the way out: capture its top-k once
(`qwenforge distill capture`) and heal from that store (`--teacher-logits`, weights never loaded).
`--resume` restores the trainable weights, the optimizer's moments and the step.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from qwenforge import __version__, vocab_heal
from qwenforge.checkpoint.folder import read_config, refuse_overlap, trained_output
from qwenforge.distill import engine, store
from qwenforge.distill.teacher import LiveTeacher, Schedule, StoredTeacher, check_heldout, heldout_count, vocabulary
from qwenforge.errors import QwenforgeError
from qwenforge.fidelity import byte_counts, shared_ids, token_sequences
from qwenforge.files import default_text, read_text
from qwenforge.train.plot import plot_curves

TRAIN_CHOICES = ("norms", "norms+qk-lora", "attention", "vocabulary")
METHODS = ("anchor", "anchor+global", "global", "layerwise", "layerwise+global", "linearize")
CLOSED_FORM = ("anchor", "linearize")  # one transformation of the weights, no training
# Files of the converted folder that are the model itself (rewritten) rather than its provenance.
MODEL_FILES = {"config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json", ".qwenforge-complete"}


@dataclass(frozen=True)
class HealOptions(engine.LoopOptions):
    """`heal` options: the loop's (engine.LoopOptions, here per phase) and these, checked when built."""

    train: str = "norms+qk-lora"
    method: str | None = None  # default_method: anchor where the conversion kept q/k biases
    steps: int = 300  # per phase
    text: str | None = None  # healing text file; default: the packaged calibration text
    heldout: str | None = None  # evaluation text file; default: the packaged held-out text
    heal_tokens: int = 16384
    eval_tokens: int = 1024
    learning_rate: float | None = None  # default per --train choice (LEARNING_RATES)
    lora_rank: int = 16
    eval_every: int = 25
    patience: int = 4
    layerwise_share: float = 0.6  # of the time budget, for layerwise+global
    ce_weight: float | None = None  # cross-entropy on the text's own tokens, a share of the global loss; default: CE_WEIGHTS per --train
    sample_tokens: int | None = None  # text sampled from the teacher, healed on after --text; default: SAMPLE_TOKENS per --train
    formats: str | None = "bf16,fp16,q8_0"  # healed vs source, each put in these formats (compare --formats); None skips

    def __post_init__(self) -> None:
        super().__post_init__()
        engine.check_option("--method", self.method, self.method in METHODS, f"choose one of {', '.join(METHODS)}")
        engine.check_option("--train", self.train, self.train in TRAIN_CHOICES, f"choose one of {', '.join(TRAIN_CHOICES)}")
        for flag, value in (("--lora-rank", self.lora_rank), ("--heal-tokens", self.heal_tokens), ("--eval-tokens", self.eval_tokens)):
            engine.check_option(flag, value, value >= 1, "must be at least 1")
        engine.check_option("--layerwise-share", self.layerwise_share, 0 < self.layerwise_share < 1, "must be between 0 and 1 (both phases get time)")
        engine.check_option("--ce-weight", self.ce_weight, self.ce_weight is None or 0 <= self.ce_weight <= 1, "must be between 0 and 1")
        engine.check_option("--sample-tokens", self.sample_tokens, self.sample_tokens is None or self.sample_tokens >= 0, "must be 0 or more")
        if self.formats is not None:
            from qwenforge.formats import parse_formats

            parse_formats(self.formats)


# --train vocabulary's rate is relative: its map's features are scaled so a step moves a row by at most
# rate x the rows' RMS (vocab_heal.py).
LEARNING_RATES = {"norms": 2e-2, "norms+qk-lora": 2e-3, "attention": 5e-4, "vocabulary": 0.1}
# ... and its layers' low-rank updates train at this share of that rate (0.1 -> 1e-3, a plain LoRA rate)
BODY_RATE = 1e-2
# --train vocabulary: the teacher gives a new token's first piece a probability, not the token itself
# (the KL sums the student's tokens by first piece, engine.piece_divergence), so half the loss is
# cross-entropy on the text, and the text is mostly the teacher's own samples (the packaged calibration
# text is 1,032 tokens; samples.py opens most of them on code, markup and math) (benchmarks/vocab_transplant.py).
CE_WEIGHTS = {"vocabulary": 0.5}
SAMPLE_TOKENS = {"vocabulary": 32768}


def ce_weight(options: HealOptions) -> float:
    return CE_WEIGHTS.get(options.train, 0.0) if options.ce_weight is None else options.ce_weight


def sample_tokens(options: HealOptions) -> int:
    return SAMPLE_TOKENS.get(options.train, 0) if options.sample_tokens is None else options.sample_tokens


def default_method(converted: Path, from_store: bool) -> str:
    """anchor (closed form, format-robust) where the converted model kept its q/k biases; else gradient healing."""
    if read_config(converted).get("attention_bias"):
        return "anchor"
    return "global" if from_store else "layerwise+global"


# --- what is trained -----------------------------------------------------------------------------


class LowRankDelta(torch.nn.Module):
    """W + B @ A as a parametrization, so the merged weight is just the parametrized value."""

    def __init__(self, weight: torch.Tensor, rank: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(torch.randn(rank, weight.shape[1], generator=generator) / math.sqrt(weight.shape[1]))
        self.B = torch.nn.Parameter(torch.zeros(weight.shape[0], rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.B @ self.A


def trainable_parameters(student, train: str, lora_rank: int = 16, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    """Freeze the student, then open (or attach) exactly what `train` names; returns name -> parameter.
    `vocabulary`: the layers' low-rank updates (its row maps come from vocab_heal.row_maps)."""
    if train not in TRAIN_CHOICES:
        raise QwenforgeError(f"--train {train}: choose one of {', '.join(TRAIN_CHOICES)}")
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    if train == "vocabulary":
        attach_low_rank(student, PROJECTIONS, lora_rank, seed)
        return {name: p for name, p in student.named_parameters() if p.requires_grad}
    for layer in student.model.layers:
        attention = layer.self_attn
        if not hasattr(attention, "q_norm"):
            raise QwenforgeError("the converted model has no q_norm/k_norm; heal expects a Qwen3 checkpoint (qwenforge convert writes one)")
        opened = [attention.q_norm.weight, attention.k_norm.weight]
        if train == "attention":
            opened += [m.weight for m in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)]
        for parameter in opened:
            parameter.requires_grad_(True)
    if train == "norms+qk-lora":
        attach_low_rank(student, ("q_proj", "k_proj"), lora_rank, seed)
    return {name: p for name, p in student.named_parameters() if p.requires_grad}


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def attach_low_rank(student, names: tuple[str, ...], rank: int, seed: int) -> None:
    """A trainable W + B @ A on each named projection of every layer (merge_low_rank folds them back)."""
    from torch.nn.utils import parametrize

    for index, layer in enumerate(student.model.layers):
        for offset, name in enumerate(names):
            projection = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            parametrize.register_parametrization(projection, "weight", LowRankDelta(projection.weight, rank, seed + len(names) * index + offset))


def merge_low_rank(student) -> None:
    """Fold every low-rank delta into its weight: the student is a plain checkpoint again."""
    from torch.nn.utils import parametrize

    for module in list(student.model.layers.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def linearize_qk_norms(student, margin: float = 1e-2) -> dict:
    """Make every q/k RMSNorm act linearly (see the module docstring); returns the scales used.

    The bound is worst-case, not measured on text: ||W_head x + b_head|| <= ||W_head||_F ||x|| +
    ||b_head|| (Frobenius >= spectral norm, and far cheaper), with ||x||^2 <= hidden *
    max(input_layernorm weight^2) after RMSNorm.
    """
    eps = student.config.rms_norm_eps
    scales = []
    with torch.no_grad():
        for layer in student.model.layers:
            attention = layer.self_attn
            head_dim = attention.head_dim
            input_norm = layer.input_layernorm.weight.abs().max() * math.sqrt(attention.q_proj.in_features)
            for projection, norm in ((attention.q_proj, attention.q_norm), (attention.k_proj, attention.k_norm)):
                heads = projection.weight.view(-1, head_dim, projection.in_features)
                largest = torch.linalg.matrix_norm(heads) * input_norm
                if projection.bias is not None:
                    largest = largest + projection.bias.view(-1, head_dim).norm(dim=-1)
                mean_square_bound = float((largest**2).max()) / head_dim
                scale = margin * math.sqrt(eps / mean_square_bound)
                projection.weight.mul_(scale)
                if projection.bias is not None:
                    projection.bias.mul_(scale)
                norm.weight.fill_(math.sqrt(eps) / scale)
                scales.append(scale)
    return {"margin": margin, "smallest_scale": min(scales), "largest_scale": max(scales)}


ANCHOR_TOLERANCE = 1e-3  # relative spread of each head's RMS that the anchor leaves (the norm's nonlinearity)


def _head_moments(student, ids: torch.Tensor, window: int = 256) -> dict:
    """Per layer, q and k: per head E|x|^2 and std|x|^2, and per (head, dim) E[x x'] for each RoPE pair.

    Measured with q/k-norm taken out, where a converted model with kept biases computes exactly its
    source (no teacher needed): these are the source's own projections on the text.
    """
    stats: dict[tuple[int, str], list[torch.Tensor]] = {}
    head_dim = student.model.layers[0].self_attn.head_dim

    def hook(key):
        def record(module, inputs, output):
            x = output.detach().float().reshape(-1, output.shape[-1] // head_dim, head_dim)  # tokens, heads, dims
            half = head_dim // 2
            pairs = torch.stack([x[..., :half], x[..., half:]], -1)  # tokens, heads, pair, 2 (rotate_half layout)
            square = x.pow(2).sum(-1)
            sums = [square.sum(0), square.pow(2).sum(0), pairs.sum(0), torch.einsum("thpi,thpj->hpij", pairs, pairs), torch.tensor(float(len(x)))]
            stats[key] = sums if key not in stats else [a + b for a, b in zip(stats[key], sums)]

        return record

    saved, handles = [], []
    for index, layer in enumerate(student.model.layers):
        attention = layer.self_attn
        saved.append((attention.q_norm, attention.k_norm))
        attention.q_norm, attention.k_norm = torch.nn.Identity(), torch.nn.Identity()
        handles += [attention.q_proj.register_forward_hook(hook((index, "q"))), attention.k_proj.register_forward_hook(hook((index, "k")))]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), window):
                student.model(ids[start : start + window][None])
    finally:
        for handle in handles:
            handle.remove()
        for layer, (q_norm, k_norm) in zip(student.model.layers, saved):
            layer.self_attn.q_norm, layer.self_attn.k_norm = q_norm, k_norm
    moments = {}
    for key, (square, square2, pair_sum, pair_outer, count) in stats.items():
        mean_square = square / count
        mean = pair_sum / count
        moments[key] = {
            "mean_square": mean_square,
            "std_square": (square2 / count - mean_square.pow(2)).clamp_min(0).sqrt(),
            "mean": mean,  # heads, pairs, 2
            "second": pair_outer / count,  # heads, pairs, 2, 2
            "covariance": pair_outer / count - torch.einsum("hpi,hpj->hpij", mean, mean),
        }
    return moments


def _rope_coherence(config, head_dim: int, context: int) -> torch.Tensor:
    """Per RoPE pair, |mean of exp(i * distance * theta_p)| over distances 0..context-1: 1 = never turns."""
    rope = getattr(config, "rope_parameters", None) or {}
    base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(context, dtype=torch.float64)[:, None] * theta[None]
    return torch.complex(angles.cos(), angles.sin()).mean(0).abs().float()


def anchor_qk_norms(student, ids: torch.Tensor, tolerance: float = ANCHOR_TOLERANCE, context: int = 512) -> dict:
    """Make every q/k RMSNorm nearly linear with a constant anchor, keeping weights in a normal range.

    Per layer one RoPE dimension pair is given up: its q/k projection rows become 0, its bias a
    per-head constant C_h, its norm weights 0 (so it adds nothing to attention scores). C_h makes
    every head's RMS the same R over tokens up to `tolerance` relative spread, so RMSNorm(x) * R ~ x
    on all other dimensions. The pair given up is the one whose score contribution varies least
    across keys at distances up to `context` (a per-query constant is invisible to softmax) on the
    measured text. Needs q/k biases
    (attention_bias=True) to hold C_h.
    """
    moments = _head_moments(student, ids)
    chosen, largest = [], 0.0
    with torch.no_grad():
        for index, layer in enumerate(student.model.layers):
            attention = layer.self_attn
            if attention.q_proj.bias is None or attention.k_proj.bias is None:
                raise QwenforgeError("--method anchor needs q/k biases to hold the anchor; convert without --drop-bias")
            head_dim = attention.head_dim
            half = head_dim // 2
            q, k = moments[(index, "q")], moments[(index, "k")]
            group = q["second"].shape[0] // k["second"].shape[0]
            # cost of pair p: how much its score term q_p^T R(distance) k_p varies across keys, summed over query
            # heads: trace(E[q q^T] Cov(k)), plus the key mean turned by RoPE over the distances (1 - rho^2)
            key_covariance = k["covariance"].repeat_interleave(group, 0)
            key_mean = k["mean"].repeat_interleave(group, 0)
            turning = 1 - _rope_coherence(student.config, head_dim, context).pow(2)
            query_square = q["second"].diagonal(dim1=-2, dim2=-1).sum(-1)
            cost = torch.einsum("hpij,hpji->p", q["second"], key_covariance) + (turning * query_square * key_mean.pow(2).sum(-1) / 2).sum(0)
            pair = int(cost.argmin())
            chosen.append(pair)
            for projection, norm, stat in ((attention.q_proj, attention.q_norm, q), (attention.k_proj, attention.k_norm, k)):
                heads = stat["mean_square"].shape[0]
                given_up = stat["second"][:, pair].diagonal(dim1=-2, dim2=-1).sum(-1)  # E|x_pair|^2 per head, removed
                kept_square = stat["mean_square"] - given_up
                total = torch.maximum(stat["std_square"] / tolerance, kept_square).max()  # head_dim * R^2, shared by the heads
                anchor = (total - kept_square).clamp_min(0).sqrt()  # |C_h|, per head
                weight = projection.weight.view(heads, head_dim, -1)
                bias = projection.bias.view(heads, head_dim)
                for dim in (pair, pair + half):
                    weight[:, dim] = 0
                    bias[:, dim] = anchor / math.sqrt(2)
                radius = math.sqrt(float(total) / head_dim)
                norm.weight.fill_(radius)
                norm.weight[[pair, pair + half]] = 0
                largest = max(largest, float(anchor.max()))
    return {"method": "anchor", "tolerance": tolerance, "pairs_given_up": chosen, "largest_anchor": largest}


# --- layer-wise targets ------------------------------------------------------------------------


def capture_attention_io(teacher, batch: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[tuple[dict, torch.Tensor]]:
    """For each teacher layer: the keyword inputs its attention received and the output it produced."""
    captured: list[tuple[dict, torch.Tensor]] = []

    def hook(module, args, kwargs, output):
        keep = {k: kwargs[k] for k in ("hidden_states", "attention_mask", "position_embeddings") if k in kwargs}
        captured.append((keep, output[0].detach()))

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in teacher.model.layers]
    try:
        with torch.no_grad():
            teacher.model(batch, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def layerwise_loss(student, targets: list[tuple[dict, torch.Tensor]]) -> torch.Tensor:
    """Mean over layers of the relative squared error of each converted attention on the source's inputs."""
    losses = []
    for layer, (inputs, expected) in zip(student.model.layers, targets):
        produced = layer.self_attn(**inputs)[0]
        losses.append((produced - expected).pow(2).mean() / expected.pow(2).mean().clamp_min(1e-12))
    return torch.stack(losses).mean()


# --- the verb ------------------------------------------------------------------------------------


def _teacher_tokenizer(teacher_dir: Path, student_dir: Path, student_tokenizer):
    """The teacher's tokenizer: the student's own object when both folders hold the same tokenizer.json
    (the student's ids then go to the teacher as they are), else the teacher's, mapped by token string."""
    from transformers import AutoTokenizer

    from qwenforge.checkpoint.folder import sha256_of

    same_file = all((folder / "tokenizer.json").exists() for folder in (teacher_dir, student_dir)) and sha256_of(
        teacher_dir / "tokenizer.json"
    ) == sha256_of(student_dir / "tokenizer.json")
    return student_tokenizer if same_file else AutoTokenizer.from_pretrained(teacher_dir)


def _check_layers(teacher_config: dict, student_config: dict, method: str) -> None:
    teacher_layers, student_layers = teacher_config.get("num_hidden_layers"), student_config.get("num_hidden_layers")
    if "layerwise" in method and teacher_layers != student_layers:
        raise QwenforgeError(
            f"--method {method} matches layer to layer, but the teacher has {teacher_layers} layers and the student "
            f"{student_layers}; use --method global"
        )


def _check_memory(teacher_dir: Path, teacher_config: dict, student_dir: Path, student_config: dict, options: HealOptions, teacher_logits: Path | None) -> dict:
    vocab = max(int(teacher_config.get("vocab_size", 0)), int(student_config.get("vocab_size", 0)))
    estimate = engine.memory_estimate(None if teacher_logits else teacher_dir, student_dir, vocab, options.eval_tokens, options)
    if teacher_logits is not None:
        return engine.check_fits(estimate, options.memory_gb, f"{student_dir}: the student alone would", "heal it on a machine with more memory")
    return engine.check_fits(
        estimate, options.memory_gb, f"{teacher_dir}: teacher and student together would",
        f"capture the teacher's logits once with `qwenforge distill capture {teacher_dir} --data TEXT --out STORE` and heal with --teacher-logits STORE",
    )


def _load(folder: Path, what: str):
    from transformers import AutoModelForCausalLM

    read_config(folder)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    except (OSError, ValueError) as error:
        raise QwenforgeError(f"{folder}: cannot load the {what} ({str(error).splitlines()[0]}); give a checkpoint folder") from error


def _teacher_samples(model, teacher_tokenizer, heal_text: str, options: HealOptions, work: Path, console) -> tuple[list[str], dict]:
    """sample_tokens(options) of the teacher's own text (distill/samples.py), kept in `work` for --resume."""
    import json

    from rich.progress import Progress

    from qwenforge.distill.samples import OPENER_SHARE, sample_text

    wanted = sample_tokens(options)
    saved = work / "teacher_continuations.json"  # (an older heal's teacher_samples.json kept its prompts: not read)
    if saved.exists():
        record = json.loads(saved.read_text())
        if record["tokens"] == wanted and record["seed"] == options.seed and record.get("openers") == OPENER_SHARE:
            return record["texts"], {"tokens": wanted, "samples": len(record["texts"]), "seconds": record["seconds"]}
    started = time.perf_counter()
    with Progress(console=console, transient=False, disable=console is None) as progress:
        task = progress.add_task(f"sampling {wanted:,} tokens of healing text from the teacher", total=None)
        texts = sample_text(model, teacher_tokenizer, heal_text, wanted, seed=options.seed, progress=lambda done, total: progress.update(task, completed=done, total=total))
    seconds = time.perf_counter() - started
    work.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"tokens": wanted, "seed": options.seed, "openers": OPENER_SHARE, "seconds": seconds, "texts": texts}))
    return texts, {"tokens": wanted, "samples": len(texts), "seconds": seconds}


def _live_teacher(teacher_dir: Path, vocabulary, tokenizer, teacher_tokenizer, options: HealOptions, work: Path | None, console) -> tuple[LiveTeacher, dict]:
    """The source model as teacher on the healing text (in order, never shuffled; the teacher's samples
    after it) and the held-out text."""
    text_path = Path(options.text) if options.text else default_text("calibration.txt")
    heldout_path = Path(options.heldout) if options.heldout else default_text("heldout.txt")
    for path in (text_path, heldout_path):
        if not path.exists():
            raise QwenforgeError(f"{path}: text file not found")
    heal_text, heldout_text = read_text(text_path, "healing text"), read_text(heldout_path, "held-out text")
    if heal_text.strip() == heldout_text.strip():
        raise QwenforgeError(f"{text_path} and {heldout_path} are the same text; evaluate on text the model was not healed on")
    train = token_sequences(tokenizer, heal_text, options.sequence_length, options.heal_tokens, str(text_path))
    heldout = token_sequences(tokenizer, heldout_text, options.sequence_length, options.eval_tokens, str(heldout_path))
    model = _load(teacher_dir, "teacher")
    samples = None
    if sample_tokens(options) and work is not None:
        texts, samples = _teacher_samples(model, teacher_tokenizer, heal_text, options, work, console)
        train = train + token_sequences(tokenizer, "\n\n".join(texts), options.sequence_length, None, "the teacher's samples")
    teacher = LiveTeacher(model, vocabulary, train, heldout, byte_counts(tokenizer, heldout), Schedule(len(train), options.batch_size))
    return teacher, {"text": text_path, "heldout": heldout_path, "heldout_text": heldout_text, "samples": samples}


def _stored_teacher(folder: Path, teacher_tokenizer, tokenizer, teacher_config: dict, student_rows: int, options: HealOptions) -> tuple[StoredTeacher, dict]:
    """A `distill capture` store of the teacher: its last sequences (--eval-tokens worth) held out, the first
    --heal-tokens of the rest heal. A student of another vocabulary reads it mapped by token string."""
    index = store.open_store(folder)
    if index.get("tokenizer_hash") != store.tokenizer_hash(teacher_tokenizer):
        raise QwenforgeError(f"{folder}: captured with another tokenizer than the teacher's; capture the converted model's source")
    if int(index.get("vocab_size", -1)) != int(teacher_config.get("vocab_size", -2)):
        raise QwenforgeError(f"{folder}: captured from a model with {index.get('vocab_size')} vocabulary rows, the teacher has {teacher_config.get('vocab_size')}; capture this teacher")
    teacher_rows, shared = int(index["vocab_size"]), None
    if teacher_tokenizer is tokenizer:
        shared = shared_ids(tokenizer, teacher_tokenizer, student_rows, teacher_rows)
    else:  # entries and input ids in the student's ids (distill/mapping.py); KL on the tokens both hold
        index = store.open_store(folder, tokenizer)
        shared = vocabulary(tokenizer, teacher_tokenizer, student_rows, teacher_rows).student_ids
        teacher_rows = student_rows
    total, length = sum(shard["sequences"] for shard in index["shards"]), index["sequence_length"]
    held = heldout_count(total, length, options.eval_tokens)
    if options.method not in CLOSED_FORM:
        check_heldout(folder, total, held, length, "heal")
    count = min(total - held, max(1, options.heal_tokens // length))
    teacher = StoredTeacher(folder, index, held, Schedule(count, options.batch_size), tokenizer, teacher_rows=teacher_rows, shared=shared)
    facts = {"store": str(folder), "heldout_kl": "stored top-k plus one tail bucket", "k": index["k"], "values": index["values"], "data": index.get("data"),
             "sequence_length": length, "student_map": index.get("student_map")}
    return teacher, facts


def heal(
    converted: Path,
    out: Path,
    teacher_dir: Path,
    options: HealOptions = HealOptions(),
    *,
    teacher_logits: Path | None = None,
    force: bool = False,
    resume: bool = False,
    console=None,
) -> dict:
    """Heal `converted` against its source `teacher_dir`; writes OUT and returns the report.

    With `teacher_logits` (a `qwenforge distill capture` store of the teacher) the teacher's weights are
    never loaded: its config and tokenizer are read, the global phase trains on the stored top-k and the
    store's last sequences are the held-out text. `linearize` needs no teacher at all; the store only
    measures it. `layerwise` needs the teacher's hidden states, so it needs the live teacher.
    A converted model with another tokenizer than its teacher is healed through the teacher's
    vocabulary mapped by token string (distill/teacher.py).
    """
    from transformers import AutoTokenizer

    converted, out, teacher_dir = Path(converted), Path(out), Path(teacher_dir)
    if options.method is None:
        options = replace(options, method=default_method(converted, teacher_logits is not None))
    refuse_overlap(out, {"teacher": teacher_dir, "teacher logits": teacher_logits})  # OUT may be CONVERTED (healed in place)
    if out.exists() and not force:
        raise QwenforgeError(f"{out}: already exists; choose another output or pass --force to replace it")
    if teacher_logits is not None:
        teacher_logits = Path(teacher_logits)
        if "layerwise" in options.method:
            raise QwenforgeError(f"--method {options.method} needs the live teacher's hidden states; with --teacher-logits use --method global or linearize")
        if options.text or options.heldout:
            raise QwenforgeError(f"{teacher_logits}: the store holds the text (its last sequences are held out); drop --text/--heldout or capture that text")
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    started = time.perf_counter()

    teacher_config, student_config = read_config(teacher_dir), read_config(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    teacher_rows, student_rows = int(teacher_config.get("vocab_size", 0)), int(student_config.get("vocab_size", 0))
    teacher_tokenizer = _teacher_tokenizer(teacher_dir, converted, tokenizer)
    shared_vocabulary = vocabulary(tokenizer, teacher_tokenizer, student_rows, teacher_rows)
    if len(shared_vocabulary.student_ids) == 0:
        raise QwenforgeError(f"{converted} and {teacher_dir} share no vocabulary (no token of the same string); heal needs the converted model's source as --teacher")
    _check_layers(teacher_config, student_config, options.method)
    if options.train == "vocabulary" and options.method not in CLOSED_FORM:
        vocab_heal.new_ids(shared_vocabulary, student_rows, tokenizer, converted)  # refuses a student with no new token before any work
    if teacher_logits is not None and options.sample_tokens:
        raise QwenforgeError(f"{teacher_logits}: --sample-tokens samples from the live teacher; drop it or heal with --teacher instead of --teacher-logits")
    estimate = _check_memory(teacher_dir, teacher_config, converted, student_config, options, teacher_logits)
    work = engine.progress_folder(out, "heal")
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    if teacher_logits is None:
        sampling_work = None if options.method in CLOSED_FORM else work
        teacher, texts = _live_teacher(teacher_dir, shared_vocabulary, tokenizer, teacher_tokenizer, options, sampling_work, console)
        text_path, heldout_path, store_facts = texts["text"], texts["heldout"], None
    else:
        teacher, store_facts = _stored_teacher(teacher_logits, teacher_tokenizer, tokenizer, teacher_config, student_rows, options)
        text_path = heldout_path = teacher_logits
    student = _load(converted, "converted model")
    evaluate = lambda: teacher.evaluate(student)  # noqa: E731
    header = _report_header(converted, teacher_dir, store_facts, options, heldout_path, shared_vocabulary, teacher)

    before = evaluate()
    in_formats = None
    if teacher_logits is None and options.formats:  # another tokenization (a transplant) is compared by bits per byte alone
        from qwenforge.compare import format_fidelity
        from qwenforge.formats import parse_formats

        in_formats = lambda: format_fidelity((teacher.model, teacher_tokenizer), (student, tokenizer), texts["heldout_text"], parse_formats(options.formats)[0], max_tokens=options.eval_tokens)  # noqa: E731
    if options.method in CLOSED_FORM:
        return _finish_closed_form(student, converted, out, options, header, before, evaluate, started, force, teacher, in_formats)
    anchored = anchor_qk_norms(student, _anchor_ids(teacher)) if options.method == "anchor+global" else None
    forward, row_map_facts, rates = student, None, None
    learning_rate = options.learning_rate or LEARNING_RATES[options.train]
    if options.train == "vocabulary":
        body = trainable_parameters(student, options.train, options.lora_rank, options.seed)  # the layers adapt to the new tokenization
        maps, row_map_facts = vocab_heal.row_maps(student, tokenizer, converted, teacher_dir, shared_vocabulary)
        named = {f"{m.name}.map": m.map for m in maps} | body
        rates = {name: learning_rate * BODY_RATE for name in body}
        row_map_facts |= {"layers": {"projections": list(PROJECTIONS), "rank": options.lora_rank, "learning_rate": learning_rate * BODY_RATE}}
        forward = lambda ids: vocab_heal.forward(student, maps, ids)  # noqa: E731
        evaluate = lambda: (vocab_heal.write(student, maps), teacher.evaluate(student))[1]  # noqa: E731
    else:
        named = trainable_parameters(student, options.train, options.lora_rank, options.seed)
    results, history_by_phase = _run_phases(student, teacher, named, evaluate, options, learning_rate, work, resume, console, forward, rates)

    after = evaluate()
    merge_low_rank(student)
    merged_check = evaluate()
    if abs(merged_check["kl"] - after["kl"]) > 1e-3 * max(after["kl"], 1e-3):
        raise RuntimeError(f"merging the low-rank updates changed held-out KL {after['kl']} -> {merged_check['kl']}")

    schedule = teacher.schedule
    report = header | {
        "learning_rate": learning_rate,
        "healing_text": str(text_path),
        "healing_tokens": min(schedule.count, schedule.per_epoch() * schedule.batch_size) * (options.sequence_length + 1 if teacher_logits is None else teacher.sequence_length + 1),
        "memory_estimate_bytes": estimate,
        "trainable_parameters": sum(p.numel() for p in named.values()),
        "anchored": anchored,
        "vocabulary_map": row_map_facts,
        "teacher_samples": texts["samples"] if teacher_logits is None else None,
        "before": before,
        "after": after,
        "phases": {
            phase: {"steps": r.steps, "seconds": r.seconds, "stopped": r.stopped, "best_step": r.best["step"], "history": history_by_phase[phase]}
            for phase, r in results.items()
        },
        "seconds_total": time.perf_counter() - started,
        "formats": in_formats() if in_formats else None,
    }
    _write(student, converted, out, report, history_by_phase, before, force)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _run_phases(student, teacher, named: dict, evaluate, options: HealOptions, learning_rate: float, work: Path, resume: bool, console, forward=None, rates=None):
    """The gradient phases of `options.method` in order, each one `engine.run_loop` checkpointed under `work/PHASE`
    (a finished phase is picked up by --resume); returns (loop result, history on one time axis) per phase.
    `forward(ids)`: the student's output (default: the student itself); `rates`: run_loop's per-parameter rates."""
    forward = forward or student
    phases = {"layerwise": ["layerwise"], "global": ["global"], "layerwise+global": ["layerwise", "global"], "anchor+global": ["global"]}[options.method]
    shares = {"layerwise": options.layerwise_share if len(phases) == 2 else 1.0, "global": 1 - options.layerwise_share if len(phases) == 2 else 1.0}
    results: dict[str, engine.LoopResult] = {}
    history_by_phase: dict[str, list[dict]] = {}
    offset_seconds = 0.0
    # after a transplant the KL sees shared tokens only; bits per byte also counts the new ones
    score = "bits_per_byte" if options.train == "vocabulary" else "kl"
    for phase in phases:
        if phase == "layerwise":  # on the teacher's own input stream: each converted attention gets the source's hidden states
            targets = [capture_attention_io(teacher.model, *teacher.vocabulary.inputs(teacher.batch(step).ids)[:2]) for step in range(teacher.schedule.per_epoch())]
            step_loss = lambda step: layerwise_loss(student, targets[step % len(targets)])  # noqa: E731
        else:
            targets = None

            def step_loss(step: int) -> torch.Tensor:
                batch = teacher.batch(step)
                return teacher.loss(forward(batch.ids[:, :-1]).logits, batch, options.divergence, options.temperature, ce_weight(options))

        checkpoint = work / phase  # engine.save_progress's layout, as `distill train` keeps it
        saved = engine.load_progress(checkpoint, named) if resume else None  # copies the saved weights in
        if saved and saved["extra"].get("done"):
            history = saved["history"]
            results[phase] = engine.LoopResult(history=history, best=min(history, key=lambda r: r[score]), steps=saved["start_step"], seconds=saved["elapsed"], stopped="resumed")
        else:
            settings = replace(
                options,
                budget_minutes=options.budget_minutes * shares[phase] if options.budget_minutes else None,
                learning_rate=learning_rate if phase == "global" or options.train != "attention" else learning_rate * 2,
            )
            resumed = {key: saved[key] for key in ("start_step", "elapsed", "history", "optimizer_state", "best_state")} if saved else {}
            results[phase] = engine.run_loop(
                named, step_loss, evaluate, settings, label=f"heal {phase}", console=console,
                on_checkpoint=lambda state, checkpoint=checkpoint: engine.save_progress(checkpoint, named, state), score=score, rates=rates, **resumed,
            )
            final = {"step": results[phase].steps, "seconds": results[phase].seconds, "history": results[phase].history,
                     "optimizer": {"state": {}, "param_groups": []}, "best_state": {name: p.detach() for name, p in named.items()}}
            engine.save_progress(checkpoint, named, final, {"done": True})
        history_by_phase[phase] = [{**row, "seconds": row["seconds"] + offset_seconds} for row in results[phase].history]
        offset_seconds += results[phase].seconds
        targets = None  # the layer-wise targets go before the next phase
    return results, history_by_phase


def _report_header(converted, teacher_dir, store_facts, options, heldout_path, shared_vocabulary, teacher) -> dict:
    """What every heal report starts with, whichever method ran."""
    header = {
        "qwenforge_version": __version__,
        "converted": str(converted),
        "teacher": str(teacher_dir),
        "teacher_logits": store_facts,
        "options": asdict(options),
        "heldout_text": str(heldout_path),
        "shared_vocabulary": len(shared_vocabulary.student_ids),
    }
    if shared_vocabulary.to_teacher is not None and isinstance(teacher, LiveTeacher):  # another tokenizer: how whole the teacher reads the text
        header["teacher_reads_whole_tokens"] = shared_vocabulary.whole_share(teacher.train + teacher.heldout)
    return header


def _anchor_ids(teacher, tokens: int = 2048) -> torch.Tensor:
    """The healing text's first `tokens` tokens, where the anchor measures the projections."""
    sequences = teacher.train if isinstance(teacher, LiveTeacher) else teacher.first_ids(tokens)
    return torch.cat([ids[:-1] for ids in sequences])[:tokens]


def _finish_closed_form(student, converted, out, options, header, before, evaluate, started, force, teacher, in_formats) -> dict:
    """`anchor` or `linearize`: one transformation of the weights, measured before and after, written."""
    method = options.method
    scales = anchor_qk_norms(student, _anchor_ids(teacher)) if method == "anchor" else linearize_qk_norms(student)
    after = evaluate()
    seconds = time.perf_counter() - started
    report = header | {
        "healing_text": None if method == "linearize" else "first 2,048 tokens (measured, not trained on)",
        "trainable_parameters": 0,
        ("linearized" if method == "linearize" else "anchored"): scales,
        "before": before,
        "after": after,
        "phases": {method: {"steps": 0, "seconds": seconds, "stopped": "closed form", "history": [
            {"step": 0, "seconds": 0.0, **before}, {"step": 1, "seconds": seconds, **after}]}},
        "seconds_total": seconds,
        "formats": in_formats() if in_formats else None,
    }
    _write(student, converted, out, report, {method: report["phases"][method]["history"]}, before, force)
    return report


def convert_then_heal(source: Path, out: Path, options, healing: HealOptions | None = None, *, force: bool = False, progress=None, console=None) -> dict:
    """`qwenforge convert SOURCE OUT --heal METHOD`: convert (convert.run.ConvertOptions), then heal OUT in
    place with the source as teacher (another tokenizer included); the healed model is then what must
    not be broken. Without `healing`, the conversion alone."""
    from qwenforge.convert.run import broken_reason, convert

    if healing is None:
        return convert(source, out, options, force=force, progress=progress)
    result = convert(source, out, replace(options, accept_lossy=True), force=force, progress=progress)
    after = heal(out, out, source, healing, force=True, console=console)["after"]  # the healed folder replaces OUT, provenance carried over
    result["metadata"]["heal"] = after
    figures = {"top1_agreement": after["top1_agreement"], "bits_per_byte_ratio": after["bits_per_byte"] / after["teacher_bits_per_byte"]}
    if (reason := broken_reason(figures)) and not options.accept_lossy:
        raise QwenforgeError(f"{out}: healed but still broken: {reason}; heal longer (--heal-minutes) or with another --heal method, or pass --accept-lossy (the folder is kept)")
    return result


def heal_lines(report: dict) -> str:
    """Human lines for a heal report (what `qwenforge heal` prints)."""
    before, after = report["before"], report["after"]
    line = (f"held-out top-1 agreement {before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}; "
            f"bits/byte {before['bits_per_byte']:.4f} -> {after['bits_per_byte']:.4f} (source {after['teacher_bits_per_byte']:.4f}); "
            f"KL {before['kl']:.4f} -> {after['kl']:.4f}")
    if report.get("formats"):
        from qwenforge.compare import formats_table

        line += "\n" + formats_table(report["formats"])
    return line


def _write(student, converted: Path, out: Path, report: dict, history_by_phase: dict, before: dict, force: bool) -> None:
    student.config.dtype = "float32"
    with trained_output(student, out, converted, "heal_report.json", report, force) as folder:
        for item in converted.iterdir():  # carry the conversion's provenance over
            if item.is_file() and item.name not in MODEL_FILES and not item.name.endswith(".safetensors") and not (folder / item.name).exists():
                shutil.copy2(item, folder / item.name)
        if report.get("formats") and (folder / "README.md").exists():  # the model card says what the heal gave, per format
            from qwenforge.convert.provenance import format_lines

            after = report["after"]
            lines = ["", f"## Healed ({report['options']['method']})", "", f"Held-out top-1 agreement {100 * after['top1_agreement']:.1f}%, bits/byte "
                     f"{after['bits_per_byte']:.4f} (source {after['teacher_bits_per_byte']:.4f}).", *format_lines(report["formats"]), ""]
            (folder / "README.md").write_text((folder / "README.md").read_text() + "\n".join(lines))
        plot_curves(folder / "heal_kl.png", history_by_phase, "seconds", "healing time (s)", {"kl": "held-out KL (nats/token)"}, before, log=True)
