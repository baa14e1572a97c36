"""`accelerate launch` with the shipped DDP config, two CPU processes (gloo), on a tiny model.

(`--cpu` would make accelerate start one process; without a GPU the DDP config's launcher starts
two and each joins a gloo group. bf16 autocast is a GPU setting, so `--mixed_precision no`.)

Both processes train in step (the data is split between them, so there are half the steps of
one process), they end with the same adapter, and only the main process writes the run folder
and prints. The second process is made to load its model late: the main process then writes its
first scores before the other gets there, which once let that one skip a collective and hang both.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

import qwenforge.train
from qwenforge.fixtures.tiny import build_tiny_checkpoint

VOICE = "Picture a bench. Here's the nub: {}. Try it yourself."
SFT_EXAMPLES, BATCH, PROCESSES = 8, 2, 2


def write_curriculum(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "curriculum.yaml").write_text("topics: [alpha]\nvoice_markers: [Picture, \"Here's the nub\"]\n")
    folder = root / "alpha"
    folder.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": VOICE.format(f"fact {i}")}]} for i in range(SFT_EXAMPLES)]
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"prompt": f"question {i}?", "chosen": VOICE.format(i), "rejected": "No."} for i in range(4)]
    (folder / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (folder / "eval.jsonl").write_text(json.dumps({"prompt": "held out?", "reference": VOICE.format("x")}) + "\n")
    return root


# Imported by every Python process started with this folder on PYTHONPATH: rank 1 loads late.
LATE_RANK = """
import os
if os.environ.get("RANK") == "1":
    import time
    from qwenforge.train.backends import pytorch
    load = pytorch.PyTorchBackend.load
    def late(self, *args, **kwargs):
        load(self, *args, **kwargs)
        time.sleep(10)
    pytorch.PyTorchBackend.load = late
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_train_one_adapter(tmp_path, qwen25_tokenizer_dir):
    model = build_tiny_checkpoint("qwen2", tmp_path / "model", qwen25_tokenizer_dir, num_hidden_layers=2)
    config = {
        "model": str(model),
        "curriculum": str(write_curriculum(tmp_path / "curriculum")),
        "output": str(tmp_path / "run"),
        "sft": {"batch_size": BATCH, "max_seq_length": 64, "learning_rate": 5e-3, "save_steps": 100},
        "dpo": {"steps": 2, "batch_size": BATCH, "max_seq_length": 64, "learning_rate": 5e-3},
        "evaluation": {"max_new_tokens": 2},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    ddp = Path(qwenforge.train.__file__).parent / "accelerate" / "ddp.yaml"
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(ddp),
        "--num_processes", str(PROCESSES), "--mixed_precision", "no", "--main_process_port", str(free_port()),
        "-m", "qwenforge.cli", "train", "run", str(tmp_path / "train.yaml"), "--json",
    ]
    late = tmp_path / "late"
    late.mkdir()
    (late / "sitecustomize.py").write_text(LATE_RANK)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(late), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)  # ~45 s alone; a hang never ends
    assert done.returncode == 0, done.stderr[-3000:]

    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, done.stdout  # only the main process reports
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["processes"] == PROCESSES

    out = tmp_path / "run"
    topic = out / "topics" / "01-alpha"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "metrics.png", "recipe.json", "summary.json", "topics"]
    assert (topic / "adapter" / "adapter_model.safetensors").exists()
    summary = result["topics"][0]
    # the examples are split between the processes: half the optimizer steps of one process
    assert summary["sft"]["steps"] == math.ceil(SFT_EXAMPLES / (BATCH * PROCESSES))
    assert summary["dpo"]["steps"] == 2 and summary["after_dpo"] is not None

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sft_logs = [r for r in records if r.get("stage") == "sft" and "loss" in r]
    assert len(sft_logs) == summary["sft"]["steps"]  # one writer: no line logged twice
    fingerprints = [r["adapter_fingerprints"] for r in records if r.get("stage") == "ranks"][0]
    assert len(fingerprints) == PROCESSES and fingerprints[0] > 0
    assert math.isclose(fingerprints[0], fingerprints[1], rel_tol=1e-9)  # both ranks hold the same adapter
    assert len([r for r in records if r.get("stage") == "eval-dpo"]) == 1  # evaluated once, by the main process
