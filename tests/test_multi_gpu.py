"""Many GPUs, decided on simulated device lists (no GPU here): the planner's per-GPU shares and the loader's choices."""

from __future__ import annotations

import pytest

from qwenforge import memory as plan  # the memory model
from qwenforge.arch.presets import get_preset
from qwenforge.arch.spec import spec_from_config
from qwenforge.devices import GIB, get_device
from qwenforge.errors import QwenforgeError
from qwenforge.infer.load import Hardware, choose_setup
from qwenforge.multi_gpu import tensor_parallel_size, vllm_tensor_parallel


def preset(name):
    return spec_from_config(get_preset(name), name)


def line(result, component):
    return next(item for item in result.lines if item.component == component)


def test_device_lists_parse():
    eight = get_device("8xH100-80GB")
    assert (eight.name, eight.count, eight.usable_bytes) == ("8xH100-80GB", 8, get_device("H100-80GB").usable_bytes)
    assert get_device("2 x rtx-4090").count == 2 and get_device("1xH100-80GB") == get_device("H100-80GB")
    with pytest.raises(QwenforgeError, match="unknown device"):
        get_device("8xH1000")
    with pytest.raises(QwenforgeError, match="at least one"):
        get_device("0xH100-80GB")


def test_inference_weights_and_kv_are_shared_out():
    spec = preset("Qwen2.5-72B-Instruct")
    one = plan.plan_memory(spec, plan.Setup(context=8192), get_device("H100-80GB"))
    two = plan.plan_memory(spec, plan.Setup(context=8192), get_device("2xH100-80GB"))
    assert not one.fits and two.fits
    assert line(two, "weights").bytes == -(-line(one, "weights").bytes // 2) and "over 2 GPUs" in line(two, "weights").assumption
    assert line(two, "KV cache").bytes == -(-line(one, "KV cache").bytes // 2)
    assert line(two, "activations").bytes == line(one, "activations").bytes
    assert line(two, "framework overhead").bytes >= line(one, "framework overhead").bytes - int(0.05 * line(one, "KV cache").bytes)
    sixteen = plan.plan_memory(spec, plan.Setup(context=8192), get_device("16xH100-80GB"))
    assert line(sixteen, "KV cache").bytes == -(-line(one, "KV cache").bytes // 8)  # 8 KV heads: copied beyond 8 GPUs
    assert "8 KV heads cannot split 16 ways" in line(sixteen, "KV cache").assumption
    assert plan.largest_context(spec, plan.Setup(), get_device("4xH100-80GB")) == plan.max_context(spec, plan.Setup())


def test_training_shards_states_with_zero3_but_not_activations():
    spec = preset("Qwen2.5-32B-Instruct")
    setup = plan.Setup(mode="full", weights="bf16", context=4096)
    one = plan.plan_memory(spec, setup, get_device("H100-80GB"))
    eight = plan.plan_memory(spec, setup, get_device("8xH100-80GB"))
    for component in ("weights", "gradients", "optimizer states"):
        assert line(eight, component).bytes == -(-line(one, component).bytes // 8) and "ZeRO-3/FSDP" in line(eight, component).assumption
    assert line(eight, "activations").bytes == line(one, "activations").bytes and "micro-batch" in line(eight, "activations").assumption
    assert not one.fits and eight.fits
    ranked = plan.fit_device(spec, setup, get_device("8xH100-80GB"), "Qwen2.5-32B-Instruct")
    assert ranked and ranked[0]["reaches_context"]


def test_plan_report_takes_a_device_list():
    from qwenforge.plan_report import plan_report

    report = plan_report("Qwen3-32B", device="4xRTX-4090", context=8192)
    assert report["device"]["count"] == 4 and report["fits"]
    assert not plan_report("Qwen3-32B", device="RTX-4090", context=8192)["fits"]


def test_loader_budgets_every_visible_gpu():
    eight = Hardware("cuda", "H100", 79 * GIB, 500 * GIB, bf16_fast=True, fp16_fast=True, bitsandbytes=True, gpus=8)
    big = choose_setup(preset("Qwen2.5-72B-Instruct"), eight)
    assert (big.device, big.dtype, big.quant) == ("auto", "bfloat16", "none") and "across 8 GPUs" in big.reason
    small = choose_setup(preset("Qwen2.5-7B-Instruct"), eight)
    assert small.device == "cuda" and "across" not in small.reason  # one GPU suffices: no spreading
    one = Hardware("cuda", "H100", 79 * GIB, 500 * GIB, bf16_fast=True, fp16_fast=True, bitsandbytes=True, gpus=1)
    assert choose_setup(preset("Qwen2.5-72B-Instruct"), one).quant in ("int8", "nf4")
    pinned = choose_setup(preset("Qwen2.5-72B-Instruct"), eight, device="cuda:0")
    assert pinned.device == "cuda:0" and pinned.quant in ("int8", "nf4")


def test_vllm_tensor_parallel_is_the_fewest_gpus_that_fit():
    assert tensor_parallel_size(preset("Qwen2.5-7B-Instruct"), 8) == [1, 2, 4]  # 28 heads: 8 does not divide them
    assert vllm_tensor_parallel(preset("Qwen2.5-72B-Instruct"), 79 * GIB, 8) == 2
    assert vllm_tensor_parallel(preset("Qwen2.5-7B-Instruct"), 79 * GIB, 8) == 1
    assert vllm_tensor_parallel(preset("Qwen2.5-72B-Instruct"), 20 * GIB, 8) == 8
