"""The memory model against hand-computed figures, and the refusals of impossible setups."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qwenforge import memory as plan  # the memory model
from qwenforge.arch.presets import get_preset
from qwenforge.arch.spec import parameter_counts, spec_from_config
from qwenforge.devices import GIB, DEVICES, custom_device, get_device
from qwenforge.errors import QwenforgeError


def preset(name: str, **overrides):
    return spec_from_config(get_preset(name) | overrides, f"preset {name}")


def line(result: plan.MemoryPlan, component: str) -> int:
    return next(item.bytes for item in result.lines if item.component == component)


def infer(spec, **setup):
    return plan.plan_memory(spec, plan.Setup(mode="infer", **setup))


def test_kv_cache_of_qwen25_72b_at_32k_in_bf16_is_10_gib():
    # 2 (K and V) x 80 layers x 8 KV heads x 128 head_dim x 32,768 positions x 2 bytes
    result = infer(preset("Qwen2.5-72B-Instruct"), context=32768, kv_dtype="bf16")
    assert line(result, "KV cache") == 2 * 80 * 8 * 128 * 32768 * 2 == 10 * GIB


def test_grouped_query_attention_caches_eight_times_less_than_multi_head():
    gqa = infer(preset("Qwen2.5-72B-Instruct"), context=8192)
    mha = infer(preset("Qwen2.5-72B-Instruct", num_key_value_heads=64), context=8192)
    assert line(mha, "KV cache") == 8 * line(gqa, "KV cache")


def test_qwen3_uses_its_real_head_dim_not_hidden_over_heads():
    spec = preset("Qwen3-32B")
    assert spec.hidden // spec.heads == 80 and spec.head_dim == 128
    result = infer(spec, context=32768, kv_dtype="bf16")
    assert line(result, "KV cache") == 2 * 64 * 8 * 128 * 32768 * 2 == 8 * GIB  # 5 GiB with head_dim 80


def test_sliding_window_layers_cache_only_the_window():
    # Qwen2 slides the window on layers from max_window_layers on: 20 full layers + 8 layers of 4,096 positions.
    spec = preset("Qwen2.5-7B-Instruct", use_sliding_window=True, sliding_window=4096, max_window_layers=20)
    per_position_layer = 2 * 4 * 128 * 2
    assert line(infer(spec, context=32768, kv_dtype="bf16"), "KV cache") == per_position_layer * (20 * 32768 + 8 * 4096)


def test_kv_cache_dtype_scales_the_cache():
    spec = preset("Qwen2.5-7B-Instruct")
    bf16 = line(infer(spec, context=4096, kv_dtype="bf16"), "KV cache")
    assert line(infer(spec, context=4096, kv_dtype="fp8"), "KV cache") == bf16 // 2
    assert line(infer(spec, weights="q4_k_m", context=4096, kv_dtype="q8_0"), "KV cache") == int(bf16 / 2 * 34 / 32)


def test_tied_embeddings_are_counted_once():
    tied = preset("Qwen2.5-0.5B-Instruct")
    untied = preset("Qwen2.5-0.5B-Instruct", tie_word_embeddings=False)
    difference = line(infer(untied), "weights") - line(infer(tied), "weights")
    assert difference == 151936 * 896 * 2
    assert line(infer(tied), "weights") == parameter_counts(tied)["total"] * 2


def test_nf4_keeps_embeddings_and_head_in_16_bit():
    spec = preset("Qwen2.5-72B-Instruct")
    embeddings = 2 * 152064 * 8192  # embed_tokens + separate lm_head
    linears = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 29568)
    one_d = 80 * (2 * 8192 + 8192 + 2 * 1024) + 8192  # norms, q/k/v biases, final norm
    assert embeddings + linears + one_d == parameter_counts(spec)["total"]
    result = infer(spec, weights="nf4")
    assert line(result, "weights") == embeddings * 2 + linears // 2 + one_d * 2
    # double quantization: one 8-bit absmax per 64 weights + one fp32 per 256 blocks
    assert line(result, "quantization constants") == int(linears * (8 / 64 + 32 / 16384) / 8)


def test_gguf_sizes_match_published_files():
    # Qwen/Qwen2.5-7B-Instruct-GGUF and bartowski/Qwen2.5-72B-Instruct-GGUF list Q4_K_M files of 4.68 GB and 47.42 GB.
    for name, published in (("Qwen2.5-7B-Instruct", 4.68e9), ("Qwen2.5-72B-Instruct", 47.42e9)):
        result = infer(preset(name), weights="q4_k_m")
        size = line(result, "weights") + line(result, "quantization constants")
        assert abs(size / published - 1) < 0.01, (name, size)


def test_llama_cpp_tensor_type_rules():
    spec = preset("Qwen2.5-72B-Instruct")
    assert plan.gguf_tensor_type(spec, "q4_k_m", "output", None, 8192) == "q6_k"
    assert plan.gguf_tensor_type(spec, "q4_k_m", "v_proj", 0, 8192) == "q6_k"  # first eighth gets more bits
    assert plan.gguf_tensor_type(spec, "q4_k_m", "v_proj", 11, 8192) == "q5_k"  # 80-layer (70B) rule
    assert plan.gguf_tensor_type(spec, "q4_k_m", "down_proj", 11, 29568) == "q5_0"  # 29,568 is no multiple of 256
    assert plan.gguf_tensor_type(spec, "q4_k_m", "q_proj", 11, 8192) == "q4_k"
    assert plan.gguf_tensor_type(spec, "q8_0", "output", None, 8192) == "q8_0"


def test_gguf_weights_equal_the_bundled_real_file(embedded_model_dir):
    # The embedded Qwen2.5-Coder-0.5B GGUF (Q4_K_M): 896-wide rows are no multiple of 256, so most K-quant
    # tensors fall back (Q4_K -> Q5_0, Q6_K -> Q8_0) and the untied output is Q8_0; only ffn_down (4,864 wide) is K-quant.
    from gguf import GGUFReader

    from qwenforge.arch.resolve import load_model_config
    from qwenforge.cache import embedded_gguf

    path = embedded_gguf()
    spec = spec_from_config(*load_model_config(str(embedded_model_dir)))  # the config imported from that file
    tensors = GGUFReader(path).tensors
    stored = sum(int(tensor.n_bytes) for tensor in tensors)
    result = infer(spec, weights="q4_k_m", context=2048)
    assert line(result, "weights") + line(result, "quantization constants") == stored
    types = {tensor.name: tensor.tensor_type.name.lower() for tensor in tensors}
    assert plan.gguf_tensor_type(spec, "q4_k_m", "output", None, 896) == types["output.weight"] == "q8_0"
    assert plan.gguf_tensor_type(spec, "q4_k_m", "token_embd", None, 896) == types["token_embd.weight"] == "q5_0"
    # Half the layers get more bits (ffn_down Q6_K, attn_v Q6_K -> Q8_0); the published file picked other layers
    # than llama.cpp's use_more_bits rule does, so the counts are compared, not the layer numbers.
    for module, name, width in (("down_proj", "ffn_down", 4864), ("v_proj", "attn_v", 896)):
        planned = sorted(plan.gguf_tensor_type(spec, "q4_k_m", module, layer, width) for layer in range(24))
        assert planned == sorted(types[f"blk.{layer}.{name}.weight"] for layer in range(24))


def test_training_logits_are_full_vocabulary_fp32_and_their_gradients():
    spec = preset("Qwen2.5-72B-Instruct")
    setup = plan.Setup(mode="qlora", weights="nf4", context=4096, lora=plan.lora_targets(spec, "all-linear", 16))
    result = plan.plan_memory(spec, setup)
    assert line(result, "logits") == 4096 * 152064 * 12
    assert line(result, "KV cache") == 0
    # checkpointed: every layer's bf16 input + one dequantized gate/up/down matrix; the recomputed layer (2.3 GB)
    # runs after the logits' gradients (7.5 GB) are freed, so it adds nothing
    assert line(result, "activations") == 80 * 8192 * 2 * 4096 + 8192 * 29568 * 2


def test_lora_parameters_rank_times_in_plus_out():
    spec = preset("Qwen2.5-72B-Instruct")
    per_layer = (8192 + 8192) + 2 * (8192 + 1024) + (8192 + 8192) + 3 * (8192 + 29568)
    assert plan.lora_parameters(spec, plan.lora_targets(spec, "all-linear", 16)) == 80 * 16 * per_layer == 210_534_400
    setup = plan.Setup(mode="qlora", weights="nf4", lora=plan.lora_targets(spec, "all-linear", 16))
    result = plan.plan_memory(spec, setup)
    assert line(result, "LoRA adapters") == line(result, "gradients") == 4 * 210_534_400
    assert line(result, "optimizer states") == 8 * 210_534_400
    eight_bit = plan.plan_memory(spec, replace(setup, optimizer="adamw-8bit"))
    assert line(eight_bit, "optimizer states") == int(210_534_400 * (2 + 8 / 256))


def test_per_layer_targets_for_the_trainer():
    spec = preset("Qwen2.5-7B-Instruct")
    targets = plan.lora_targets_per_layer(spec, {0: ["q_proj"], 27: ["down_proj", "up_proj"]}, {0: 8, 27: 4})
    assert plan.lora_parameters(spec, targets) == 8 * (3584 + 3584) + 4 * 2 * (3584 + 18944)


def test_saved_activations_match_the_autograd_trace_of_smollm2():
    # Traced with saved_tensors_hooks on the real model (fp32, LoRA r=8 on q/v): per token and layer autograd kept
    # 3 hidden + 3 intermediate + 2 query-width + 2 KV-width tensors and two rank-8 lora_A outputs.
    spec = spec_from_config({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True})
    setup = plan.Setup(mode="lora", weights="fp32", context=512, lora=plan.lora_targets(spec, ["q_proj", "v_proj"], 8),
                       gradient_checkpointing=False)
    modules, ranks = plan.adapters_by_layer(spec, setup)[0]
    floats = 3 * 576 + 3 * 1536 + 2 * 576 + 2 * 192 + 2 * 8
    assert plan.saved_bytes_per_token(spec, setup, modules, ranks) == floats * 4
    assert line(plan.plan_memory(spec, setup), "activations") == 512 * 30 * floats * 4


def test_gradient_checkpointing_keeps_layer_inputs_and_one_layer():
    spec = preset("Qwen2.5-7B-Instruct")
    setup = plan.Setup(mode="lora", context=2048, lora=plan.lora_targets(spec, "all-linear", 16))
    with_checkpoints = line(plan.plan_memory(spec, setup), "activations")
    without = line(plan.plan_memory(spec, replace(setup, gradient_checkpointing=False)), "activations")
    assert with_checkpoints < without / 5


def test_full_training_counts_gradients_and_adam_states_for_every_parameter():
    spec = preset("Qwen2.5-0.5B-Instruct")
    total = parameter_counts(spec)["total"]
    result = plan.plan_memory(spec, plan.Setup(mode="full", weights="fp32", context=512))
    assert line(result, "gradients") == 4 * total and line(result, "optimizer states") == 8 * total


def test_every_line_says_its_assumption():
    spec = preset("Qwen3-0.6B")
    result = infer(spec, weights="q4_k_m", kv_dtype="q8_0")
    assert [item.component for item in result.lines] == [
        "weights", "quantization constants", "LoRA adapters", "gradients", "optimizer states",
        "activations", "logits", "KV cache", "framework overhead",
    ]
    assert all(item.assumption for item in result.lines)


@pytest.mark.parametrize(
    ("spec_name", "setup", "expected"),
    [
        ("Qwen2.5-7B-Instruct", plan.Setup(context=40000), "max_position_embeddings 32,768 and its config has no rope_scaling"),
        ("Qwen2.5-7B-Instruct", plan.Setup(mode="full", weights="nf4"), "use --mode qlora --weights nf4"),
        ("Qwen2.5-7B-Instruct", plan.Setup(mode="lora", weights="q4_k_m", lora=((0, "q_proj", 8),)), "GGUF format for llama.cpp inference"),
        ("Qwen2.5-7B-Instruct", plan.Setup(mode="qlora", weights="nf4"), "needs targets"),
        ("Qwen2.5-7B-Instruct", plan.Setup(weights="int3"), "choose one of fp32, bf16"),
        ("Qwen2.5-7B-Instruct", plan.Setup(weights="q4_k_m", kv_dtype="fp8"), "use --kv-dtype q8_0"),
    ],
)
def test_impossible_setups_get_one_line_with_the_fix(spec_name, setup, expected):
    with pytest.raises(QwenforgeError) as error:
        plan.plan_memory(preset(spec_name), setup, model=spec_name)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_rope_factor_allows_longer_context():
    spec = preset("Qwen2.5-7B-Instruct")
    assert line(infer(spec, context=131072, rope_factor=4), "KV cache") == 4 * line(infer(spec, context=32768), "KV cache")


def test_lora_target_the_architecture_lacks():
    spec = preset("Qwen2.5-7B-Instruct")
    with pytest.raises(QwenforgeError, match="'qkv_proj': Qwen2ForCausalLM has no such module; choose from q_proj"):
        plan.lora_targets(spec, ["qkv_proj"], 16)
    with pytest.raises(QwenforgeError, match="layers 0-27"):
        plan.lora_targets(spec, ["q_proj"], 16, layers=[28])


def test_unknown_device_lists_what_would_work():
    with pytest.raises(QwenforgeError) as error:
        get_device("H100")
    message = str(error.value)
    assert "did you mean H100-80GB" in message and "--memory GB" in message and "\n" not in message
    assert get_device("h100-80gb").name == "H100-80GB"


def test_apple_presets_use_the_gpu_share_of_unified_memory():
    assert DEVICES["M2-Ultra-64GB"].usable_bytes == 48 * GIB
    assert DEVICES["M3-Max-36GB"].usable_bytes == 24 * GIB
    assert custom_device(24).usable_bytes == 24 * GIB


def test_largest_context_is_the_boundary():
    spec = preset("Qwen2.5-7B-Instruct")
    device = get_device("RTX-4090")
    setup = plan.Setup(weights="q4_k_m", kv_dtype="fp16", context=4096)
    best = plan.largest_context(spec, setup, device)
    assert best == 32768 or not plan.plan_memory(spec, replace(setup, context=best + 1), device).fits
    assert plan.plan_memory(spec, replace(setup, context=best), device).fits
    bf16 = plan.Setup(weights="bf16", context=1024)
    assert plan.largest_context(spec, bf16, custom_device(10)) == 0  # 15 GB of weights never fit 10 GiB


def test_fit_ranks_setups_that_fit_best_first():
    spec = preset("Qwen2.5-72B-Instruct")
    device = get_device("H100-80GB")
    ranked = plan.fit_device(spec, plan.Setup(context=8192), device)
    assert ranked and all(entry["plan"].fits for entry in ranked)
    # bf16 (145 GB) cannot fit; 8-bit is the most precise that does: GGUF q8_0 (77 GB) first, then int8
    assert [entry["setup"].weights for entry in ranked[:3]] == ["q8_0", "q8_0", "int8"]
    reaches = [entry["reaches_context"] for entry in ranked]
    assert reaches == sorted(reaches, reverse=True)
    assert all(entry["plan"].setup.weights != "bf16" for entry in ranked)


def test_choose_inference_setup_for_the_inference_stage():
    big = preset("Qwen2.5-72B-Instruct")
    assert plan.choose_inference_setup(big, 80 * GIB, "cuda", context=8192).weights == "int8"
    assert plan.choose_inference_setup(big, 48 * GIB, "cuda", context=8192).weights == "nf4"
    small = preset("Qwen2.5-7B-Instruct")
    chosen = plan.choose_inference_setup(small, 64 * GIB, "cpu", context=4096)
    assert (chosen.weights, chosen.compute_dtype, chosen.kv_dtype) == ("fp32", "fp32", "fp32")
    with pytest.raises(QwenforgeError, match="GiB are available"):
        plan.choose_inference_setup(big, 16 * GIB, "mps", context=8192)


def test_fit_on_a_mac_offers_only_formats_that_run_on_metal():
    ranked = plan.fit_device(preset("Qwen2.5-72B-Instruct"), plan.Setup(context=4096), get_device("M2-Ultra-64GB"))
    formats = {entry["setup"].weights for entry in ranked}
    assert formats and formats <= {"q4_k_m", "q4_1", "q4_0", "q5_k_m", "q6_k", "q8_0", "bf16", "fp16", "fp32"}
    assert ranked[0]["setup"].weights == "q4_k_m" and ranked[0]["reaches_context"]


def test_mlx_4bit_constants_are_a_bf16_scale_and_bias_per_64_weights():
    """What mlx-lm's quantize allocates: measured on the embedded SmolLM2 by the mlx backend, 6,635,520 bytes."""
    smollm2 = spec_from_config({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192,
    })
    assert line(infer(smollm2, weights="mlx-4bit"), "quantization constants") == 6_635_520
    big = preset("Qwen2.5-72B-Instruct")
    linears = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 29568)
    assert line(infer(big, weights="mlx-4bit"), "quantization constants") == linears // 64 * 4
    qlora = plan.Setup(mode="qlora", context=1024, lora=plan.lora_targets(big, "all-linear", 16))
    ranked = plan.fit_device(big, qlora, get_device("M2-Ultra-64GB"))
    assert ranked and {entry["setup"].weights for entry in ranked} == {"mlx-4bit"}


@pytest.mark.parametrize("name, weights, prompt, published, tolerance", [
    # Qwen2.5 Speed Benchmark (A100, transformers 4.46, flash attention 2, batch 1, 2,048 generated tokens), GiB;
    # benchmarks/plan_accuracy.py --published prints these with their source.
    ("Qwen2.5-72B-Instruct", "bf16", 1, 136.20, 0.05),
    ("Qwen2.5-72B-Instruct", "gptq-int4", 1, 39.91, 0.05),
    ("Qwen2.5-7B-Instruct", "bf16", 1, 14.38, 0.05),
    ("Qwen2.5-7B-Instruct", "gptq-int4", 1, 5.52, 0.10),
    ("Qwen2.5-7B-Instruct", "bf16", 30720, 19.97, 0.05),
])
def test_published_generate_figures(name, weights, prompt, published, tolerance):
    result = infer(preset(name), weights=weights, context=prompt + 2048, generated=2048)
    assert abs(result.model_dependent / GIB / published - 1) <= tolerance


def test_prefill_transients_share_memory_with_the_generated_tokens_cache():
    spec = preset("Qwen2.5-7B-Instruct")
    whole_prompt = line(infer(spec, context=32768), "activations")
    generating = infer(spec, context=32768, generated=2048)
    kv_of_generated = plan.kv_bytes(spec, generating.setup, 32768) - plan.kv_bytes(spec, generating.setup, 30720)
    prompt_only = line(infer(spec, context=30720), "activations")
    assert line(generating, "activations") == pytest.approx(prompt_only - kv_of_generated, abs=2)
    assert line(generating, "activations") < whole_prompt
    assert line(infer(spec, context=2049, generated=2048), "activations") == 0  # a 1-token prefill fits in the cache it leaves room for
    assert line(generating, "KV cache") == line(infer(spec, context=32768), "KV cache")  # the cache holds every token either way
