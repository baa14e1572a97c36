"""The one loader behind `chat`, `generate` and `serve`: any model source, adapted to the machine.

A MODEL is a checkpoint folder, a Hugging Face id (`Qwen/Qwen3-8B`, through the hub's cache), a PEFT
adapter folder (its base is read from adapter_config.json or given with --base), a .gguf file
(imported once into the qwenforge cache), or "embedded".
The loader looks at the hardware (CUDA / Apple MPS / CPU and their free memory), decides the
device, dtype and quantization, and says what it chose and why in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwenforge.checkpoint.dtypes import weight_dtype
from qwenforge.errors import QwenforgeError

ENGINES = ("transformers", "llama.cpp", "vllm")
QUANTS = ("none", "nf4", "int8", "int8-dynamic")
BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "nf4": 0.56, "int8": 1.06, "int8-dynamic": 1.06}


@dataclass(frozen=True)
class Hardware:
    """What the loader decides from: the best accelerator and the memory free on it."""

    device: str  # "cuda" | "mps" | "cpu"
    name: str
    free_bytes: int
    ram_free_bytes: int
    bf16_fast: bool = False  # CUDA compute capability >= 8
    fp16_fast: bool = False  # CPU: AVX-512 (fp16 matrix-vector kernels beat fp32 ~2x here); GPUs: always
    bitsandbytes: bool = False
    gpus: int = 1  # visible CUDA GPUs; free_bytes is then the least free on any of them


@dataclass(frozen=True)
class LoadSetup:
    """The loader's decision: where the weights live, in what precision, and why."""

    device: str  # "cuda" | "cuda:N" | "mps" | "cpu" | "auto" (accelerate offload)
    dtype: str
    quant: str
    reason: str
    attention: str = "sdpa"  # transformers attn_implementation: sdpa, or flash_attention_2 where installed
    rope_scaling: dict | None = None  # YaRN applied at load time for a context beyond the native window


@dataclass
class LoadedModel:
    """A model ready to generate: the engine's handle, the tokenizer (always the model's own), facts."""

    engine: str
    name: str
    source: Path  # the HF folder (GGUF imported into the cache) whose tokenizer and config are used
    tokenizer: object
    setup: LoadSetup
    context_limit: int
    model: object = None  # transformers model (engine transformers)
    llama: object = None  # llama_cpp.Llama (engine llama.cpp)
    gguf: Path | None = None
    adapter: Path | None = None

    def describe(self) -> str:
        """The one line the loader prints."""
        quant = "" if self.setup.quant == "none" else f" {self.setup.quant}"
        attention = f", {self.setup.attention} attention" if self.engine == "transformers" else ""
        yarn = self.setup.rope_scaling
        context = f", YaRN x{yarn['factor']:g} to {self.context_limit:,} tokens" if yarn else ""
        return f"{self.name}: {self.engine} on {self.setup.device}, {self.setup.dtype}{quant}{attention}{context} — {self.setup.reason}"


def detect_hardware() -> Hardware:
    """CUDA first, then Apple MPS, then the CPU; with the memory a model may use there."""
    import importlib.util

    import torch

    from qwenforge.devices import available_memory

    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    ram = available_memory("cpu")
    if torch.cuda.is_available():
        major, _minor = torch.cuda.get_device_capability(0)
        name = torch.cuda.get_device_name(0)
        count = torch.cuda.device_count()
        free = min(int(torch.cuda.mem_get_info(index)[0]) for index in range(count))
        return Hardware("cuda", name, free, ram, bf16_fast=major >= 8, fp16_fast=True, bitsandbytes=has_bnb, gpus=count)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return Hardware("mps", "Apple MPS", available_memory("mps"), ram, fp16_fast=True, bitsandbytes=False)
    capability = torch.backends.cpu.get_cpu_capability()
    return Hardware("cpu", f"CPU ({capability})", ram, ram, fp16_fast=capability.startswith("AVX512"), bitsandbytes=has_bnb)


PLANNED = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "fp16": ("float16", "none"), "int8": ("bfloat16", "int8"), "nf4": ("bfloat16", "nf4")}


def choose_setup(
    spec,
    hardware: Hardware,
    dtype: str | None = None,
    quant: str | None = None,
    device: str | None = None,
    context: int = 4096,
    batch: int = 1,
) -> LoadSetup:
    """Pick device, dtype and quantization for the model `spec` on `hardware`; overrides win.

    The memory planner (`qwenforge.memory.choose_inference_setup`) picks the most precise weights
    that fit a `context`-token conversation. Two refinements from measurements here: on an
    AVX-512 CPU fp16 weights decode ~2x faster than fp32 (torch's fp16 matrix-vector kernels;
    `--dtype float32` is exact; batches stay fp32: fp16 matrix-matrix
    kernels are ~4x slower than fp32 on the CPU); on a GPU without fast bf16 (pre-Ampere) bf16 becomes fp16.
    When nothing fits, accelerate offloads layers to CPU/disk as the last resort.
    """
    from qwenforge import memory
    from qwenforge.arch.spec import parameter_counts

    weight_dtype(dtype)
    if quant is not None and quant not in QUANTS:
        raise QwenforgeError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if device is not None and device.split(":")[0] not in ("cpu", "cuda", "mps", "auto"):
        raise QwenforgeError(f"--device {device}: choose cpu, cuda, cuda:N, mps or auto")
    where = device or hardware.device
    kind = hardware.device if where == "auto" else where.split(":")[0]
    budget = hardware.free_bytes if kind == hardware.device else hardware.ram_free_bytes
    parameters = parameter_counts(spec)["total"]
    overrides = [f"--{name} {value}" for name, value in (("dtype", dtype), ("quant", quant), ("device", device)) if value]
    why = []
    if dtype is None or quant is None:
        try:
            planned, spread = _planned_across_gpus(spec, budget, kind, context, batch, hardware.gpus if where in ("cuda", "auto") else 1)
            planned_dtype, planned_quant = PLANNED[planned.weights]
            if spread > 1:
                where = "auto" if device is None else where
                why.append(f"planner: {planned.weights} fits across {spread} GPUs ({budget / 2**30:.1f} GiB free on each, {hardware.name}) "
                           f"at context {planned.context}: layers spread with device_map")
            else:
                why.append(f"planner: {planned.weights} fits {budget / 2**30:.1f} GiB free on {hardware.name} at context {planned.context}")
        except QwenforgeError as error:
            planned_dtype, planned_quant = ("bfloat16" if kind != "cpu" else "float32"), "none"
            if device is None:
                where = "auto"
                why.append(f"offloading layers to CPU/disk ({error})")
        if planned_quant != "none" and not hardware.bitsandbytes:
            why.append(f"{planned_quant} wanted but bitsandbytes is missing (pip install bitsandbytes): offloading instead")
            planned_dtype, planned_quant = "bfloat16", "none"
            if device is None:
                where = "auto"
        if planned_dtype == "bfloat16" and kind == "cuda" and not hardware.bf16_fast:
            planned_dtype = "float16"
            why.append("fp16: this GPU has no fast bf16")
        if planned_dtype == "float32" and kind == "cpu" and hardware.fp16_fast and batch == 1 and dtype is None:
            planned_dtype = "float16"
            why.append("fp16 weights: AVX-512 fp16 matrix-vector decode is ~2x fp32 here (--dtype float32 is exact)")
        dtype = dtype or planned_dtype
        quant = quant or planned_quant
    size = parameters * BYTES[quant if quant != "none" else dtype]
    attention = attention_implementation(kind, dtype)
    return LoadSetup(device=where, dtype=dtype, quant=quant, reason="; ".join(why + overrides + [f"{size / 2**30:.2f} GiB of weights"]), attention=attention)


def _planned_across_gpus(spec, budget: int, kind: str, context: int, batch: int, gpus: int):
    """(planned LoadSetup, GPUs used): one GPU when its best choice is as precise as all GPUs' together, else every visible GPU."""
    from qwenforge import memory

    try:
        single = memory.choose_inference_setup(spec, budget, kind, context=context, batch=batch)
    except QwenforgeError:
        if gpus < 2:
            raise
        single = None
    if gpus < 2 or (single and single.weights == "bf16"):
        return single, 1
    try:
        together = memory.choose_inference_setup(spec, budget, kind, context=context, batch=batch, count=gpus)
    except QwenforgeError:
        if single is None:
            raise
        return single, 1
    if single is None or memory.QUALITY_ORDER.index(together.weights) < memory.QUALITY_ORDER.index(single.weights):
        return together, gpus
    return single, 1


def attention_implementation(kind: str, dtype: str) -> str:
    """flash_attention_2 on a CUDA GPU in fp16/bf16 when flash-attn is installed; torch's sdpa otherwise."""
    import importlib.util

    if kind == "cuda" and dtype in ("float16", "bfloat16") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def resolve_source(model: str, base: str | None = None, revision: str | None = None) -> dict:
    """What MODEL names: {"folder", "gguf", "adapter"}; GGUF files are imported into the cache once.

    Folders, hub ids and 'embedded' go through the one resolver (`arch.resolve.model_folder`).
    """
    from qwenforge.arch.resolve import model_folder
    from qwenforge.cache import EMBEDDED, cache_root, embedded_gguf, embedded_model
    from qwenforge.checkpoint.gguf_import import import_gguf

    if model == EMBEDDED:
        return {"folder": embedded_model(), "gguf": embedded_gguf(), "adapter": None}
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise QwenforgeError(f"{path}: not a .gguf file; give a checkpoint folder, adapter folder, .gguf file, a Hugging Face id or 'embedded'")
        if path.resolve() == embedded_gguf().resolve():
            return {"folder": embedded_model(), "gguf": path, "adapter": None}
        stat = path.stat()
        folder = cache_root() / "models" / f"{path.stem}-{stat.st_size:x}"
        if not (folder / "config.json").exists():
            import_gguf(path, folder, force=True)
        return {"folder": folder, "gguf": path, "adapter": None}
    if (path / "adapter_config.json").exists():
        from qwenforge.checkpoint.folder import read_json

        adapter_config = read_json(path / "adapter_config.json")
        base = base or adapter_config.get("base_model_name_or_path")
        if not base:
            raise QwenforgeError(f"{path}/adapter_config.json names no base model; pass --base BASE_FOLDER")
        base_source = resolve_source(str(base))
        if base_source["adapter"]:
            raise QwenforgeError(f"{base}: the base of an adapter must be a model, not another adapter")
        return {"folder": base_source["folder"], "gguf": None, "adapter": path}
    return {"folder": model_folder(model, revision), "gguf": None, "adapter": None}


def load_tokenizer(folder: Path):
    """The model's own tokenizer with its chat template; left padding for batches."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tokenizer, "chat_template", None):
        raise QwenforgeError(f"{folder}: the tokenizer has no chat template; add one to tokenizer_config.json (chat_template)")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _spec(folder: Path):
    """The normalized architecture of a checkpoint folder, from config.json alone."""
    from qwenforge.arch.spec import spec_from_config
    from qwenforge.checkpoint.folder import read_config

    return spec_from_config(read_config(folder), str(folder / "config.json"))


def load_model(
    model: str,
    engine: str = "transformers",
    dtype: str | None = None,
    quant: str | None = None,
    device: str | None = None,
    base: str | None = None,
    hardware: Hardware | None = None,
    threads: int | None = None,
    max_context: int | None = None,
    batch: int = 1,
    revision: str | None = None,
    say=None,
) -> LoadedModel:
    """Load MODEL for generation on `engine`; `say(line)` receives the one-line choice and why."""
    import torch

    if engine not in ENGINES:
        raise QwenforgeError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if engine == "vllm":
        raise QwenforgeError("the vllm engine runs vLLM's own server: use `qwenforge serve MODEL --engine vllm`")
    if threads:
        torch.set_num_threads(threads)
    from dataclasses import replace

    from qwenforge.arch.long_context import context_limit, yarn_scaling

    source = resolve_source(model, base, revision)
    folder = Path(source["folder"])
    spec = _spec(folder)
    context = int(max_context or context_limit(spec))
    yarn = yarn_scaling(spec, context, Path(model).name)
    tokenizer = load_tokenizer(folder)
    hardware = hardware or detect_hardware()
    name = Path(source["adapter"] or folder).name
    if engine == "llama.cpp":
        loaded = _load_llama_cpp(source, folder, tokenizer, name, context, threads, yarn)
    else:
        setup = choose_setup(spec, hardware, dtype=dtype, quant=quant, device=device, context=min(context, 4096), batch=batch)
        setup = replace(setup, rope_scaling=yarn)
        setup = _avoid_fragile_float16(setup, folder, explicit=dtype == "float16")
        loaded = LoadedModel(
            engine="transformers",
            name=name,
            source=folder,
            tokenizer=tokenizer,
            setup=setup,
            context_limit=context,
            model=_load_transformers(folder, setup, source["adapter"]),
            gguf=source["gguf"],
            adapter=source["adapter"],
        )
    if say:
        say(loaded.describe())
    return loaded


def _avoid_fragile_float16(setup: LoadSetup, folder: Path, explicit: bool) -> LoadSetup:
    """A linearized checkpoint's q/k weights underflow in float16: refuse --dtype float16, else pick another dtype."""
    if setup.dtype != "float16":
        return setup
    from qwenforge.convert.qk_norm import fragile_qk_reason

    if not (reason := fragile_qk_reason(folder)):
        return setup
    if explicit:
        raise QwenforgeError(f"--dtype float16: {reason}")
    other = "float32" if setup.device == "cpu" else "bfloat16"
    return LoadSetup(device=setup.device, dtype=other, quant=setup.quant, reason=f"{setup.reason}; {other}, not float16: q/k weights of a linearized heal underflow in float16")


def _load_transformers(folder: Path, setup: LoadSetup, adapter: Path | None):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    kwargs = {"dtype": getattr(torch, setup.dtype), "attn_implementation": setup.attention}
    if setup.rope_scaling:  # YaRN: the config's own rope parameters (rope_theta ...) plus Qwen's scaling
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
        config.rope_parameters = {**(config.rope_parameters or {}), **setup.rope_scaling}
        kwargs["config"] = config
    if setup.quant in ("nf4", "int8"):
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise QwenforgeError(f"--quant {setup.quant} needs bitsandbytes; pip install bitsandbytes, or use --quant none") from None
        if setup.quant == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=kwargs["dtype"]
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if setup.device == "auto" or setup.quant in ("nf4", "int8"):
        kwargs["device_map"] = "auto" if setup.device == "auto" else setup.device
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as error:
        raise QwenforgeError(f"{folder}: could not load the checkpoint ({error})") from error
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if "device_map" not in kwargs:
        model = model.to(setup.device)
    if setup.device == "cpu" and setup.dtype == "float16" and setup.quant == "none":
        prompts_in_fp32(model)
    if setup.quant == "int8-dynamic":
        if setup.device != "cpu":
            raise QwenforgeError("--quant int8-dynamic is a CPU quantization; use --device cpu or --quant nf4/int8 on GPUs")
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(model.float(), {torch.nn.Linear}, dtype=torch.qint8)
    model.eval()
    return model


def prompts_in_fp32(model) -> None:
    """CPU fp16: keep torch's fast fp16 matrix-vector kernels for decoding, but run many-row inputs
    (prompts, batches) through fp32 copies of each weight made on the fly: torch's CPU fp16
    matrix-matrix kernels are ~4x slower than fp32 here (time to first token 2.5x better this way).
    """
    import torch
    import torch.nn.functional as F

    def forward(module, x):
        if x.dim() >= 2 and x.shape[:-1].numel() > 1:
            bias = None if module.bias is None else module.bias.float()
            return F.linear(x.float(), module.weight.float(), bias).to(x.dtype)
        return F.linear(x, module.weight, module.bias)

    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = forward.__get__(module)


def _load_llama_cpp(source: dict, folder: Path, tokenizer, name: str, context: int, threads: int | None, yarn: dict | None = None) -> LoadedModel:
    """llama.cpp runs the GGUF itself; the prompt text still comes from the model's own template."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise QwenforgeError("--engine llama.cpp needs llama-cpp-python; pip install 'qwenforge[llama-cpp]'") from None
    gguf = source["gguf"]
    if gguf is None:
        raise QwenforgeError(f"{folder}: --engine llama.cpp needs a .gguf MODEL (or 'embedded'); use --engine transformers for folders")
    from qwenforge.infer.gguf_precision import full_precision_gguf

    runnable = full_precision_gguf(Path(gguf))
    n_ctx = context if yarn else min(context, 4096)
    scaling = {}
    if yarn:  # llama.cpp's own YaRN: LLAMA_ROPE_SCALING_TYPE_YARN = 2
        scaling = {"rope_scaling_type": 2, "yarn_orig_ctx": yarn["original_max_position_embeddings"], "rope_freq_scale": 1 / yarn["factor"]}
    llama = Llama(model_path=str(runnable), n_ctx=n_ctx, n_threads=threads or None, verbose=False, type_k=0, type_v=0, **scaling)
    setup = LoadSetup(
        device="cpu",
        dtype="float32",
        quant="none",
        reason=f"llama.cpp on {runnable.name}: the GGUF's weights dequantized to f32 once, so answers match transformers",
        rope_scaling=yarn,
    )
    return LoadedModel(
        engine="llama.cpp", name=name, source=folder, tokenizer=tokenizer, setup=setup, context_limit=n_ctx, llama=llama, gguf=Path(gguf)
    )
