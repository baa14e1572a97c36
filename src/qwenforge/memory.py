"""The memory model behind `qwenforge plan` (plan_report.py renders it): how much memory a model needs to run or train, line by line, and what fits a device.

    qwenforge plan Qwen2.5-72B-Instruct --mode qlora --context 4096 --device M2-Ultra-64GB
    qwenforge plan Qwen3-32B --fit H100-80GB

The model is a sum of small functions over a `ModelSpec` and a `Setup`, one per component (weights,
quantization constants, LoRA adapters, gradients, optimizer states, activations, logits, KV cache,
framework overhead); each returns its bytes and the assumption it rests on, so a reader can check
every figure. Activation and logit counts follow what stock transformers + PEFT keep alive (sdpa
attention, RMSNorm upcast to fp32, PEFT's fp32 adapters); `benchmarks/plan_accuracy.py` measures them.
The inference stage calls `choose_inference_setup` to pick a dtype and quantization for its machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from qwenforge.arch.spec import PROJECTIONS, ModelSpec, module_shapes, parameter_counts
from qwenforge.devices import GIB, Device
from qwenforge.errors import QwenforgeError

MODES = ("infer", "lora", "qlora", "full")
KV_DTYPES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "q8_0": 34 / 32}
OPTIMIZERS = ("adamw", "adamw-8bit", "paged")
LINEAR_MODULES = PROJECTIONS
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LLAMA_CPP_UBATCH = 512  # llama.cpp's default n_ubatch: prompt tokens processed per compute step


@dataclass(frozen=True)
class WeightFormat:
    """How one weight format stores a linear layer: value bits, constant bits (scales, zeros) per weight."""

    name: str
    engine: str  # "transformers" (PyTorch, bitsandbytes, GPTQ/AWQ kernels) or "llama.cpp" (GGUF)
    value_bits: float
    constant_bits: float
    compute: str  # dtype of activations
    note: str


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in [
        WeightFormat("fp32", "transformers", 32, 0, "fp32", "every tensor in fp32"),
        WeightFormat("bf16", "transformers", 16, 0, "bf16", "every tensor in bf16"),
        WeightFormat("fp16", "transformers", 16, 0, "fp16", "every tensor in fp16"),
        WeightFormat("int8", "transformers", 8, 0, "bf16", "bitsandbytes LLM.int8: int8 values + one fp32 scale per output row"),
        WeightFormat("nf4", "transformers", 4, 8 / 64 + 32 / (64 * 256), "bf16",
                     "bitsandbytes NF4, blocks of 64, double-quantized absmax (8 bit + fp32 per 256 blocks)"),
        WeightFormat("gptq-int4", "transformers", 4, 16 / 128 + 4 / 128, "bf16",
                     "GPTQ 4 bit, group 128: fp16 scale + 4-bit zero per group, int32 g_idx per input"),
        WeightFormat("awq-int4", "transformers", 4, 16 / 128 + 4 / 128, "bf16", "AWQ 4 bit, group 128: fp16 scale + 4-bit zero per group"),
        WeightFormat("mlx-4bit", "mlx", 4, 2 * 16 / 64, "bf16",
                     "MLX affine 4 bit (mlx-lm quantize), group 64: bf16 scale + bias per group (fp32 from an fp32 checkpoint)"),
        WeightFormat("q8_0", "llama.cpp", 8, 0.5, "fp32", "GGUF Q8_0: 32 int8 + fp16 scale per block"),
        WeightFormat("q6_k", "llama.cpp", 6, 0.5625, "fp32", "GGUF Q6_K: 210 bytes per 256 weights"),
        WeightFormat("q5_k_m", "llama.cpp", 5, 0.5, "fp32", "GGUF Q5_K_M: Q5_K, half of attn_v/ffn_down in Q6_K"),
        WeightFormat("q4_k_m", "llama.cpp", 4, 0.5, "fp32", "GGUF Q4_K_M: Q4_K, half of attn_v/ffn_down in Q6_K"),
        WeightFormat("q4_1", "llama.cpp", 4, 1.0, "fp32", "GGUF Q4_1: 32 4-bit values + fp16 scale and minimum per block"),
        WeightFormat("q4_0", "llama.cpp", 4, 0.5, "fp32", "GGUF Q4_0: 32 4-bit values + fp16 scale per block"),
    ]
}

# GGUF tensor types: (value bits, constant bits) per weight, and block width.
GGUF_TYPES = {
    "f32": (32, 0, 1), "f16": (16, 0, 1),
    "q8_0": (8, 0.5, 32), "q5_1": (5, 1.0, 32), "q5_0": (5, 0.5, 32), "q4_1": (4, 1.0, 32), "q4_0": (4, 0.5, 32),
    "q6_k": (6, 0.5625, 256), "q5_k": (5, 0.5, 256), "q4_k": (4, 0.5, 256),
}
GGUF_BASE_TYPE = {"q8_0": "q8_0", "q6_k": "q6_k", "q5_k_m": "q5_k", "q4_k_m": "q4_k", "q4_1": "q4_1", "q4_0": "q4_0"}
# llama.cpp's replacement when a row is not a multiple of the 256-wide k-quant block.
GGUF_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
# Where each format's kernels run: bitsandbytes has no Metal backend; GPTQ/AWQ kernels are CUDA's; llama.cpp runs everywhere.
RUNS_ON = {"int8": ("cuda", "cpu"), "nf4": ("cuda", "cpu"), "gptq-int4": ("cuda",), "awq-int4": ("cuda",), "mlx-4bit": ("mps",)}
QUALITY_ORDER = ("bf16", "fp16", "fp32", "q8_0", "int8", "q6_k", "q5_k_m", "awq-int4", "gptq-int4", "q4_k_m", "q4_1", "nf4", "mlx-4bit", "q4_0")


@dataclass(frozen=True)
class Setup:
    """What to run: mode, weight format, sequence, batch and (for training) adapters and optimizer.

    `context` is the prompt + generated tokens for inference and the sequence length for training;
    `generated` says how many of those tokens generate produces (0: count the whole context as prompt).
    `lora` lists (layer, module, rank) triples; build it with `lora_targets` or `lora_targets_per_layer`.
    """

    mode: str = "infer"
    weights: str = "bf16"
    context: int = 4096
    generated: int = 0
    batch: int = 1
    kv_dtype: str = "auto"  # "auto": what the engine uses by default (see `default_kv_dtype`)
    lora: tuple[tuple[int, str, int], ...] = ()
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True
    rope_factor: float = 1.0

    @property
    def format(self) -> WeightFormat:
        return WEIGHT_FORMATS[self.weights]

    @property
    def compute_dtype(self) -> str:
        """Activation dtype: fp32/fp16 weights compute in their own dtype, every other format in bf16 (llama.cpp: fp32)."""
        return self.format.compute

    @property
    def cache_dtype(self) -> str:
        return default_kv_dtype(self.weights) if self.kv_dtype == "auto" else self.kv_dtype

    @property
    def training(self) -> bool:
        return self.mode != "infer"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kv_dtype"] = self.cache_dtype
        data["lora"] = summarize_lora(self.lora)
        data["compute_dtype"] = self.compute_dtype
        data["engine"] = self.format.engine
        return data


@dataclass(frozen=True)
class Line:
    component: str
    bytes: int
    assumption: str


@dataclass(frozen=True)
class MemoryPlan:
    setup: Setup
    lines: tuple[Line, ...]
    device: Device | None = None

    @property
    def total(self) -> int:
        return sum(line.bytes for line in self.lines)

    @property
    def model_dependent(self) -> int:
        """Everything but the framework's fixed overhead: the part `benchmarks/plan_accuracy.py` measures."""
        return sum(line.bytes for line in self.lines if line.component != "framework overhead")

    @property
    def fits(self) -> bool | None:
        return None if self.device is None else self.total <= self.device.usable_bytes


def default_kv_dtype(weights: str) -> str:
    """What an engine caches K/V in unless told otherwise: transformers the compute dtype, llama.cpp f16."""
    fmt = WEIGHT_FORMATS[weights]
    return "fp16" if fmt.engine == "llama.cpp" else fmt.compute


# ---------------------------------------------------------------- validation and LoRA targets


def lora_targets(spec: ModelSpec, modules, rank: int = 16, layers=None) -> tuple[tuple[int, str, int], ...]:
    """(layer, module, rank) for MODULES in LAYERS (all layers when None); 'all-linear' means all seven projections."""
    modules = list(LINEAR_MODULES) if modules in ("all-linear", ["all-linear"]) else list(modules)
    layers = range(spec.layers) if layers is None else layers
    return lora_targets_per_layer(spec, {layer: modules for layer in layers}, rank)


def lora_targets_per_layer(spec: ModelSpec, modules_by_layer, rank: int | dict = 16) -> tuple[tuple[int, str, int], ...]:
    """Explicit per-layer targets (the trainer's zones): {layer: [module, ...]}, rank an int or {layer: rank}.

    Raises QwenforgeError for a module the architecture lacks or a layer it does not have.
    """
    targets = []
    for layer, modules in sorted(dict(modules_by_layer).items()):
        if not 0 <= int(layer) < spec.layers:
            raise QwenforgeError(f"LoRA target layer {layer}: the model has layers 0-{spec.layers - 1}")
        layer_rank = rank[layer] if isinstance(rank, dict) else rank
        if int(layer_rank) < 1:
            raise QwenforgeError(f"LoRA rank {layer_rank}: use a positive rank such as 16")
        for module in modules:
            if module not in LINEAR_MODULES:
                raise QwenforgeError(
                    f"LoRA target {module!r}: {spec.architecture} has no such module; choose from {', '.join(LINEAR_MODULES)} or all-linear"
                )
            targets.append((int(layer), module, int(layer_rank)))
    return tuple(dict.fromkeys(targets))


def summarize_lora(targets) -> dict:
    modules = sorted({module for _, module, _ in targets}, key=LINEAR_MODULES.index)
    return {
        "modules": modules,
        "layers": len({layer for layer, _, _ in targets}),
        "ranks": sorted({rank for _, _, rank in targets}),
        "adapters": len(targets),
    }


def module_shape(spec: ModelSpec, module: str) -> tuple[int, int]:
    """(in_features, out_features) of one projection."""
    return module_shapes(spec)[module]


def lora_parameters(spec: ModelSpec, targets) -> int:
    """Trainable LoRA parameters: rank x (in + out) per targeted module."""
    return sum(rank * sum(module_shape(spec, module)) for _, module, rank in targets)


def max_context(spec: ModelSpec, setup: Setup) -> int:
    """The longest context of `spec`, with YaRN at setup.rope_factor scaling the native window (arch.long_context)."""
    from qwenforge.arch.long_context import context_limit

    return context_limit(spec, setup.rope_factor)


def validate(spec: ModelSpec, setup: Setup, model: str = "the model") -> None:
    """Refuse impossible setups with one line saying why and what would work instead."""
    if setup.mode not in MODES:
        raise QwenforgeError(f"--mode {setup.mode}: choose one of {', '.join(MODES)}")
    if setup.weights not in WEIGHT_FORMATS:
        raise QwenforgeError(f"--weights {setup.weights}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if setup.kv_dtype != "auto" and setup.kv_dtype not in KV_DTYPES:
        raise QwenforgeError(f"--kv-dtype {setup.kv_dtype}: choose auto or one of {', '.join(KV_DTYPES)}")
    if setup.optimizer not in OPTIMIZERS:
        raise QwenforgeError(f"--optimizer {setup.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
    if setup.context < 1 or setup.batch < 1:
        raise QwenforgeError(f"--context {setup.context} --batch {setup.batch}: both must be at least 1")
    if not 0 <= setup.generated < setup.context:
        raise QwenforgeError(f"--generate {setup.generated}: must be below --context {setup.context} (the prompt needs a token)")
    if not 1 <= setup.rope_factor <= 4:
        raise QwenforgeError(f"--rope-factor {setup.rope_factor}: YaRN factors run from 1 to 4 (Qwen documents 4: 32,768 -> 131,072 tokens)")
    limit = max_context(spec, setup)
    if setup.context > limit:
        if spec.rope_scaling or setup.rope_factor > 1:
            raise QwenforgeError(f"--context {setup.context} exceeds {limit:,} tokens for {model}; use --context {limit} or a larger --rope-factor")
        from qwenforge.arch.long_context import yarn_factor

        factor = yarn_factor(spec, setup.context)
        raise QwenforgeError(
            f"--context {setup.context} exceeds {model}'s max_position_embeddings {spec.max_positions:,} and its config has no "
            f"rope_scaling; use --context {spec.max_positions} or enable YaRN with --rope-factor {factor:g}"
        )
    engine = setup.format.engine
    if setup.training and engine == "llama.cpp":
        raise QwenforgeError(
            f"--weights {setup.weights} is a GGUF format for llama.cpp inference; train with --mode lora --weights bf16 or --mode qlora --weights nf4"
        )
    if setup.mode == "full" and setup.weights not in DTYPE_BYTES:
        raise QwenforgeError(
            f"--mode full cannot train {setup.weights} weights (quantized weights have no gradients); use --mode qlora --weights {setup.weights} "
            "or --mode full --weights bf16"
        )
    if setup.mode == "lora" and setup.weights not in DTYPE_BYTES:
        raise QwenforgeError(f"--mode lora trains a 16/32-bit base; for {setup.weights} weights use --mode qlora")
    if setup.mode == "qlora" and setup.weights in DTYPE_BYTES:
        raise QwenforgeError(f"--mode qlora needs a quantized base (nf4, int8, gptq-int4, awq-int4, mlx-4bit); with {setup.weights} use --mode lora")
    if setup.mode in ("lora", "qlora") and not setup.lora:
        raise QwenforgeError("LoRA training needs targets: give --lora-targets (e.g. all-linear) or a zone file")
    if engine == "llama.cpp" and setup.cache_dtype == "fp8":
        raise QwenforgeError(f"--kv-dtype fp8 is not a llama.cpp cache type; with {setup.weights} use --kv-dtype q8_0 or bf16")
    if engine == "transformers" and setup.cache_dtype == "q8_0":
        raise QwenforgeError(f"--kv-dtype q8_0 is llama.cpp's cache type; with {setup.weights} use --kv-dtype fp8 (vLLM) or bf16")


# ---------------------------------------------------------------- weights


def _use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in *_K_M formats (first and last eighth, every third between)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def gguf_tensor_type(spec: ModelSpec, weights: str, tensor: str, layer: int | None, in_features: int) -> str:
    """The GGUF type llama.cpp's quantizer gives one tensor (dense-model rules of llama_tensor_get_type)."""
    base = GGUF_BASE_TYPE[weights]
    chosen = base
    is_output = tensor == "output" or (tensor == "token_embd" and spec.tied_embeddings)
    if is_output:
        chosen = "q8_0" if base == "q8_0" or in_features % 256 else "q6_k"
    elif tensor in ("v_proj", "down_proj") and weights in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, spec.layers):
        chosen = "q6_k"
    elif tensor == "v_proj" and spec.layers == 80 and chosen == "q4_k":
        chosen = "q5_k"  # llama.cpp's 70B rule: 8 query heads share attn_v, so more bits are nearly free
    if GGUF_TYPES[chosen][2] == 256 and in_features % 256:
        chosen = GGUF_FALLBACK[chosen]
    return chosen


def weight_tensors(spec: ModelSpec):
    """(name, layer, in_features, out_features) of every 2-D weight; 1-D norms and biases are counted separately."""
    yield "token_embd", None, spec.hidden, spec.embedding_rows
    if not spec.tied_embeddings:
        yield "output", None, spec.hidden, spec.embedding_rows
    for layer in range(spec.layers):
        for module in LINEAR_MODULES:
            in_features, out_features = module_shape(spec, module)
            yield module, layer, in_features, out_features


def weight_bits(spec: ModelSpec, weights: str) -> tuple[float, float]:
    """(value bits, constant bits) summed over all tensors of the model stored in WEIGHTS."""
    fmt = WEIGHT_FORMATS[weights]
    counts = parameter_counts(spec)
    one_d = counts["total"] - sum(i * o for _, _, i, o in weight_tensors(spec))  # norms and biases
    values = constants = 0.0
    if fmt.engine == "llama.cpp":
        for name, layer, in_features, out_features in weight_tensors(spec):
            value_bits, constant_bits, _ = GGUF_TYPES[gguf_tensor_type(spec, weights, name, layer, in_features)]
            values += value_bits * in_features * out_features
            constants += constant_bits * in_features * out_features
        return values + 32 * one_d, constants
    if weights in DTYPE_BYTES:
        return fmt.value_bits * counts["total"], 0.0
    # transformers quantizers (and qwenforge's MLX backend) replace the Linear layers inside the blocks; embeddings,
    # lm_head, norms and biases stay 16-bit.
    for name, _, in_features, out_features in weight_tensors(spec):
        if name in ("token_embd", "output"):
            values += 16 * in_features * out_features
            continue
        values += fmt.value_bits * in_features * out_features
        constants += fmt.constant_bits * in_features * out_features
        if weights == "int8":
            constants += 32 * out_features
        elif weights == "gptq-int4":
            constants += 32 * in_features
    return values + 16 * one_d, constants


def weights_line(spec: ModelSpec, setup: Setup) -> Line:
    values, _ = weight_bits(spec, setup.weights)
    fmt = setup.format
    tied = "tied embeddings counted once" if spec.tied_embeddings else "separate lm_head"
    if fmt.engine == "llama.cpp":
        why = f"{fmt.note}; llama.cpp's per-tensor types (output Q6_K, rows not a multiple of 256 fall back), norms f32; {tied}"
    elif setup.weights in DTYPE_BYTES:
        why = f"{parameter_counts(spec)['total']:,} parameters x {DTYPE_BYTES[setup.weights]} bytes; {tied}"
    else:
        why = f"{fmt.value_bits:g}-bit values of the block linears; embeddings, lm_head, norms and biases kept 16-bit; {tied}"
    return Line("weights", int(values / 8), why)


def quantization_constants_line(spec: ModelSpec, setup: Setup) -> Line:
    _, constants = weight_bits(spec, setup.weights)
    why = "none: unquantized weights" if not constants else setup.format.note
    return Line("quantization constants", int(constants / 8), why)


# ---------------------------------------------------------------- training state


def trainable_parameters(spec: ModelSpec, setup: Setup) -> int:
    if setup.mode == "full":
        return parameter_counts(spec)["total"]
    if setup.mode in ("lora", "qlora"):
        return lora_parameters(spec, setup.lora)
    return 0


def lora_line(spec: ModelSpec, setup: Setup) -> Line:
    if setup.mode not in ("lora", "qlora"):
        return Line("LoRA adapters", 0, "no adapters")
    count = lora_parameters(spec, setup.lora)
    summary = summarize_lora(setup.lora)
    why = (f"{count:,} parameters = rank x (in + out) on {summary['adapters']} modules "
           f"({', '.join(summary['modules'])} in {summary['layers']} layers), fp32 as PEFT keeps them")
    return Line("LoRA adapters", 4 * count, why)


def gradients_line(spec: ModelSpec, setup: Setup) -> Line:
    if not setup.training:
        return Line("gradients", 0, "no gradients at inference")
    count = trainable_parameters(spec, setup)
    size = 4 if setup.mode != "full" else DTYPE_BYTES[setup.weights]
    return Line("gradients", size * count, f"one gradient per trainable parameter ({count:,}) in its dtype ({size} bytes)")


def optimizer_line(spec: ModelSpec, setup: Setup) -> Line:
    if not setup.training:
        return Line("optimizer states", 0, "no optimizer at inference")
    count = trainable_parameters(spec, setup)
    state = 4 if setup.mode != "full" else DTYPE_BYTES[setup.weights]
    if setup.optimizer == "adamw-8bit":
        return Line("optimizer states", int(count * (2 + 8 / 256)),
                    "bitsandbytes 8-bit AdamW: two 1-byte states + fp32 absmax per 256-value block")
    why = f"AdamW: exp_avg and exp_avg_sq in the parameters' dtype ({state} bytes each)"
    if setup.optimizer == "paged":
        why = "paged AdamW (32-bit states in unified/pageable memory; on CUDA they may spill to host under pressure, counted here in full)"
        state = 4
    return Line("optimizer states", 2 * state * count, why)


# ---------------------------------------------------------------- activations, logits, KV cache


def kv_layers(spec: ModelSpec, context: int) -> float:
    """Cached positions summed over layers: sliding-window layers keep at most `sliding_window` positions."""
    if not spec.use_sliding_window or not spec.sliding_window:
        return spec.layers * context
    full = min(spec.max_window_layers or 0, spec.layers)
    return full * context + (spec.layers - full) * min(context, spec.sliding_window)


def kv_cache_line(spec: ModelSpec, setup: Setup) -> Line:
    if setup.training:
        return Line("KV cache", 0, "training runs with use_cache=False: no KV cache")
    dtype = setup.cache_dtype
    per_position = 2 * spec.kv_heads * spec.head_dim * KV_DTYPES[dtype]
    size = per_position * kv_layers(spec, setup.context) * setup.batch
    why = (f"K and V: {spec.kv_heads} KV heads x head_dim {spec.head_dim} x {setup.context} positions x {spec.layers} layers "
           f"x batch {setup.batch} in {dtype} ({KV_DTYPES[dtype]:g} bytes)")
    if spec.use_sliding_window and spec.sliding_window:
        why += f"; sliding-window layers keep {spec.sliding_window} positions"
    return Line("KV cache", int(size), why)


def _dequantized_linear_bytes(spec: ModelSpec, setup: Setup) -> int:
    """bitsandbytes and GPTQ/AWQ dequantize one linear at a time for large matmuls: the biggest one, in bf16."""
    if setup.format.engine != "transformers" or setup.weights in DTYPE_BYTES:
        return 0
    return 2 * max(i * o for module in LINEAR_MODULES for i, o in [module_shape(spec, module)])


def kv_bytes(spec: ModelSpec, setup: Setup, positions: int) -> float:
    return 2 * spec.kv_heads * spec.head_dim * KV_DTYPES[setup.cache_dtype] * kv_layers(spec, positions) * setup.batch


def inference_activation_bytes(spec: ModelSpec, setup: Setup) -> tuple[int, str]:
    """Transient memory of the prefill: one block's tensors for every prompt token (no_grad frees each block's).

    The prefill's transients are freed before the first generated token's K and V are written, so
    they share memory with the cache of the generated tokens: the peak is the larger of the prefill
    (prompt cache + transients) and the decode (full cache + one token's transients).
    """
    prompt = max(1, setup.context - setup.generated)
    q_width, kv_width = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    per_token = max(4 * spec.hidden + 3 * spec.intermediate, 3 * spec.hidden + 3 * q_width + 3 * kv_width)
    if setup.format.engine == "llama.cpp":
        tokens = setup.batch * min(prompt, LLAMA_CPP_UBATCH)
        scores = setup.batch * spec.heads * min(prompt, LLAMA_CPP_UBATCH) * prompt * 4
        size = tokens * per_token * 4 + scores
        why = (f"llama.cpp compute buffer: {LLAMA_CPP_UBATCH}-token micro-batches in fp32 (4 hidden + 3 intermediate "
               "widths per token) + attention scores against the whole prompt (no flash attention)")
    else:
        size = setup.batch * prompt * per_token * DTYPE_BYTES[setup.compute_dtype] + _dequantized_linear_bytes(spec, setup)
        why = (f"prefill of {prompt} prompt tokens x batch {setup.batch} in {setup.compute_dtype}: residual, norm and MLP tensors of one "
               "block alive at once (4 hidden + 3 intermediate widths per token); sdpa/flash attention, no N^2 scores")
        if _dequantized_linear_bytes(spec, setup):
            why += "; + one dequantized linear"
    if setup.generated:
        size = max(0, size - kv_bytes(spec, setup, setup.context) + kv_bytes(spec, setup, prompt))
        why += f"; freed before the {setup.generated} generated tokens' K/V are written, so only what exceeds their cache counts"
    return int(size), why


def adapters_by_layer(spec: ModelSpec, setup: Setup) -> list[tuple[frozenset, int]]:
    """(targeted modules, sum of ranks) per layer; full training touches every module."""
    if setup.mode == "full":
        return [(frozenset(LINEAR_MODULES), 0)] * spec.layers
    modules = [set() for _ in range(spec.layers)]
    ranks = [0] * spec.layers
    for layer, module, rank in setup.lora:
        modules[layer].add(module)
        ranks[layer] += rank
    return [(frozenset(m), r) for m, r in zip(modules, ranks)]


def saved_bytes_per_token(spec: ModelSpec, setup: Setup, modules: frozenset, rank_sum: int) -> float:
    """Bytes autograd keeps per token for one decoder layer (stock transformers + PEFT, sdpa attention)."""
    c = DTYPE_BYTES[setup.compute_dtype]
    q_width, kv_width = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    full = setup.mode == "full"
    size = 2 * spec.hidden * 4  # both RMSNorm inputs, upcast to fp32 by transformers
    size += (2 * q_width + 2 * kv_width) * c  # sdpa keeps q, k, v and its output
    size += 3 * spec.intermediate * c  # SwiGLU: gate, silu(gate), up
    if spec.qk_norm:
        size += (q_width + kv_width) * 4  # Qwen3 q_norm / k_norm inputs in fp32
    inputs = {  # module input, width, and whether another op already keeps it in the compute dtype
        "attention input": (modules & {"q_proj", "k_proj", "v_proj"}, spec.hidden),
        "o_proj input": (modules & {"o_proj"}, q_width),
        "mlp input": (modules & {"gate_proj", "up_proj"}, spec.hidden),
        "down_proj input": (modules & {"down_proj"}, spec.intermediate),
    }
    for users, width in inputs.values():
        if not users:
            continue
        if full or c == 4:
            size += width * c  # one saved input shared by the modules reading it
        else:
            size += len(users) * width * 4  # PEFT casts the input to the fp32 adapter's dtype once per module
    if setup.lora_dropout and not full:
        size += sum(module_shape(spec, m)[0] * (4 + 1) for m in modules)  # dropout output + mask
    size += rank_sum * 4  # lora_A outputs, fp32
    return size


def training_activation_bytes(spec: ModelSpec, setup: Setup) -> tuple[int, str]:
    tokens = setup.batch * setup.context
    groups = adapters_by_layer(spec, setup)
    by_group = {group: saved_bytes_per_token(spec, setup, *group) for group in set(groups)}
    per_layer = [by_group[group] for group in groups]
    c = DTYPE_BYTES[setup.compute_dtype]
    if setup.gradient_checkpointing:
        # The last layer is recomputed only after the loss's logit gradients are freed: count its excess over them.
        recomputed = max(0, tokens * max(per_layer) - training_logits_bytes(spec, setup))
        size = tokens * spec.layers * spec.hidden * c + recomputed
        why = (f"gradient checkpointing: each layer's input ({spec.layers} x hidden x {c} bytes per token, {tokens} tokens) + one "
               f"layer's saved tensors recomputed in backward ({max(per_layer) / 1024:.1f} KiB/token), counted where they exceed "
               "the logits' gradients they follow")
    else:
        size = tokens * sum(per_layer)
        why = (f"no checkpointing: every layer keeps its saved tensors ({sum(per_layer) / spec.layers / 1024:.1f} KiB/token/layer: fp32 norm "
               f"inputs, q/k/v/output for sdpa, SwiGLU gate/up, adapter inputs), {tokens} tokens")
    extra = _dequantized_linear_bytes(spec, setup)
    if extra:
        why += "; + one dequantized linear"
    return int(size + extra), why


def activations_line(spec: ModelSpec, setup: Setup) -> Line:
    size, why = training_activation_bytes(spec, setup) if setup.training else inference_activation_bytes(spec, setup)
    return Line("activations", size, why)


def training_logits_bytes(spec: ModelSpec, setup: Setup) -> int:
    return setup.batch * setup.context * spec.embedding_rows * 12


def logits_line(spec: ModelSpec, setup: Setup) -> Line:
    rows = spec.embedding_rows
    if setup.training:
        tokens = setup.batch * setup.context
        why = (f"full-vocabulary logits for {tokens} tokens x {rows:,} rows, 12 bytes each at the start of backward: the fp32 "
               "log-softmax kept by the loss + fp32 gradients of log-probs and logits (outputs released before backward, as Trainer does)")
        return Line("logits", training_logits_bytes(spec, setup), why)
    if setup.format.engine == "llama.cpp":
        return Line("logits", setup.batch * rows * 4, f"last position only, fp32, {rows:,} rows x batch {setup.batch}")
    c = DTYPE_BYTES[setup.compute_dtype]
    why = f"generate keeps the last position only (logits_to_keep=1): {rows:,} rows x batch {setup.batch} in {setup.compute_dtype} + fp32 copy"
    return Line("logits", setup.batch * rows * (c + 4), why)


FRAMEWORK_OVERHEAD = {  # bytes outside the model's tensors, per device kind
    "cuda": (int(0.75 * GIB), "CUDA context + cuBLAS/cuDNN workspaces (~0.75 GiB) + 5% caching-allocator fragmentation"),
    "mps": (int(0.5 * GIB), "Python + torch/MLX runtime in unified memory (~0.5 GiB) + 5% allocator slack"),
    "cpu": (int(0.5 * GIB), "Python + torch + transformers + peft resident code and heaps (0.42-0.48 GiB RSS measured here) + 5% allocator slack"),
}


def overhead_line(spec: ModelSpec, setup: Setup, device_kind: str) -> Line:
    fixed, why = FRAMEWORK_OVERHEAD.get(device_kind, FRAMEWORK_OVERHEAD["cuda"])
    return Line("framework overhead", fixed, why)


COMPONENTS = (weights_line, quantization_constants_line, lora_line, gradients_line, optimizer_line,
              activations_line, logits_line, kv_cache_line)


# ---------------------------------------------------------------- several GPUs
# A plan split over N identical GPUs (`plan --devices 8xH100-80GB`, the loader): inference spreads the
# layers (transformers' device_map) or the heads (vLLM tensor parallel): each GPU holds 1/N of the
# weights and of the KV cache (tensor parallel cannot split fewer KV heads than GPUs: those are
# copied). Training shards parameters, gradients and optimizer states with ZeRO-3 or FSDP FULL_SHARD
# (the accelerate configs qwenforge ships) while each GPU runs its own micro-batch, so activations
# and logits stay whole. The framework overhead is paid on every GPU.

SHARDED_IN_TRAINING = ("weights", "quantization constants", "LoRA adapters", "gradients", "optimizer states")
SHARDED_IN_INFERENCE = ("weights", "quantization constants", "LoRA adapters")


def divisors(spec, setup, count: int) -> dict[str, int]:
    """How many ways each component is split across `count` GPUs."""
    if setup.training:
        return {component: count for component in SHARDED_IN_TRAINING}
    return {component: count for component in SHARDED_IN_INFERENCE} | {"KV cache": min(count, spec.kv_heads)}


def split_lines(spec, setup, lines, count: int) -> list:
    """Per-GPU lines: each sharded component divided (rounded up), its assumption saying how."""
    how = "ZeRO-3/FSDP shards" if setup.training else "tensor parallel / device_map spreads"
    split = divisors(spec, setup, count)
    out = []
    for line in lines:
        parts = split.get(line.component, 1)
        if parts > 1 and line.bytes:
            copies = f"; {spec.kv_heads} KV heads cannot split {count} ways" if line.component == "KV cache" and parts < count else ""
            line = replace(line, bytes=-(-line.bytes // parts), assumption=f"{line.assumption}; {how} it over {parts} GPUs{copies}")
        elif count > 1 and line.bytes and line.component in ("activations", "logits"):
            line = replace(line, assumption=f"{line.assumption}; per GPU (each runs its own {'micro-batch' if setup.training else 'forward'})")
        out.append(line)
    return out


def plan_memory(spec: ModelSpec, setup: Setup, device: Device | None = None, model: str = "the model") -> MemoryPlan:
    """The memory plan: one Line per component, validated first; fits/headroom when a device is given."""
    validate(spec, setup, model)
    lines = [component(spec, setup) for component in COMPONENTS]
    if device is not None and device.count > 1:  # what each of several GPUs holds
        lines = split_lines(spec, setup, lines, device.count)
    kind = device.kind if device else "cuda"
    fixed = overhead_line(spec, setup, kind)
    dynamic = sum(line.bytes for line in lines if line.component in ("activations", "logits", "KV cache"))
    lines.append(replace(fixed, bytes=fixed.bytes + int(0.05 * dynamic)))
    return MemoryPlan(setup=setup, lines=tuple(lines), device=device)


# ---------------------------------------------------------------- what fits


def largest_fitting(spec: ModelSpec, setup: Setup, device: Device, field_name: str, upper: int) -> int:
    """The largest `context` or `batch` whose plan fits DEVICE (0 if even 1 does not); memory grows with both."""

    def fits(value: int) -> bool:
        return plan_memory(spec, replace(setup, **{field_name: value}), device).fits

    if not fits(1):
        return 0
    if fits(upper):
        return upper
    low, high = 1, upper
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def largest_context(spec: ModelSpec, setup: Setup, device: Device) -> int:
    return largest_fitting(spec, setup, device, "context", max_context(spec, setup))


def largest_batch(spec: ModelSpec, setup: Setup, device: Device, upper: int = 4096) -> int:
    return largest_fitting(spec, setup, device, "batch", upper)


def runs_on(weights: str, device_kind: str) -> bool:
    return device_kind in RUNS_ON.get(weights, ("cuda", "mps", "cpu"))


def candidate_setups(spec: ModelSpec, base: Setup, device_kind: str = "cuda") -> list[Setup]:
    """The setups `--fit` compares for BASE's mode: every weight format that runs on DEVICE_KIND (and KV dtype, or
    optimizer/checkpointing). On Apple machines QLoRA's base is MLX's 4-bit (the mlx backend), not bitsandbytes."""
    if base.mode == "infer":
        setups = []
        for weights in (w for w in QUALITY_ORDER if runs_on(w, device_kind) and WEIGHT_FORMATS[w].engine != "mlx"):  # MLX: training only
            compact = "fp8" if WEIGHT_FORMATS[weights].engine == "transformers" else "q8_0"
            for kv in (default_kv_dtype(weights), compact):
                setups.append(replace(base, weights=weights, kv_dtype=kv))
        return setups
    formats = {"full": ("bf16", "fp32"), "lora": ("bf16",), "qlora": ("nf4", "int8", "gptq-int4", "awq-int4", "mlx-4bit")}[base.mode]
    formats = [w for w in formats if runs_on(w, device_kind)]
    return [
        replace(base, weights=weights, optimizer=optimizer, gradient_checkpointing=checkpointing)
        for weights in formats
        for checkpointing in (False, True)
        for optimizer in OPTIMIZERS
    ]


def fit_device(spec: ModelSpec, base: Setup, device: Device, model: str = "the model", limit: int = 12) -> list[dict]:
    """Setups that fit DEVICE, ranked: those reaching the requested context first, then by weight quality, then context.

    Each entry: the plan at the requested context (or the largest that fits), the largest context and batch.
    """
    candidates = candidate_setups(spec, base, device.kind)
    validate(spec, candidates[0], model)  # context, batch and targets errors come out here, once
    ranked = []
    for setup in candidates:
        try:
            validate(spec, setup, model)
        except QwenforgeError:
            continue
        context = largest_context(spec, setup, device)
        if context == 0:
            continue
        chosen = replace(setup, context=min(base.context, context))
        batch = largest_batch(spec, chosen, device)
        quality = QUALITY_ORDER.index(setup.weights)
        if setup.training:  # faster first: no recomputation, plain AdamW
            speed = (not setup.gradient_checkpointing, setup.optimizer == "adamw")
        else:  # the engine's own cache dtype before a compressed one
            speed = (setup.cache_dtype == default_kv_dtype(setup.weights),)
        ranked.append(((context < base.context, quality, tuple(not s for s in speed), -context), {
            "setup": chosen,
            "plan": plan_memory(spec, chosen, device, model),
            "largest_context": context,
            "largest_batch": batch,
            "reaches_context": context >= base.context,
        }))
    ranked.sort(key=lambda item: item[0])
    return [entry for _, entry in ranked[:limit]]


def choose_inference_setup(spec: ModelSpec, available_bytes: int, device_kind: str, context: int = 4096, batch: int = 1, count: int = 1) -> Setup:
    """The best inference Setup for a machine: the most precise weight dtype/quantization that fits CONTEXT x BATCH.

    For `qwenforge chat/serve`. DEVICE_KIND is "cuda", "mps" or "cpu"; AVAILABLE_BYTES is what the model may use
    (see `qwenforge.devices.available_memory`; per GPU when COUNT GPUs share the model). Preference: cuda bf16 > int8 > nf4 (bitsandbytes); mps fp16 (no
    bitsandbytes on Metal); cpu fp32 (fastest torch kernels) > bf16 > nf4. Read `.weights` and `.compute_dtype`
    to load the model, `.kv_dtype` for the cache. Raises QwenforgeError naming the memory needed when nothing fits.
    """
    preferences = {"cuda": ("bf16", "int8", "nf4"), "mps": ("fp16",), "cpu": ("fp32", "bf16", "nf4")}
    if device_kind not in preferences:
        raise QwenforgeError(f"device kind {device_kind!r}: choose cuda, mps or cpu")
    context = min(context, max_context(spec, Setup()))
    here = Device("this machine", device_kind, available_bytes, available_bytes, "available memory", count=count)
    smallest = None
    for weights in preferences[device_kind]:
        setup = Setup(mode="infer", weights=weights, context=context, batch=batch, kv_dtype=default_kv_dtype(weights))
        smallest = plan_memory(spec, setup, here)
        if smallest.fits:
            return setup
    fitting = largest_context(spec, smallest.setup, here)
    hint = f"a context of {fitting} fits with {smallest.setup.weights}" if fitting else "use a smaller model or a GGUF build"
    raise QwenforgeError(
        f"the model needs {smallest.total / GIB:.1f} GiB with {smallest.setup.weights} weights at context {context} but "
        f"{available_bytes / GIB:.1f} GiB are available on this {device_kind}; {hint}"
    )
