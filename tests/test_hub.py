"""Hugging Face ids as MODEL: read through huggingface_hub's cache, laid out on disk as the hub lays it out (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenforge.arch.resolve import load_model_config, model_folder
from qwenforge.checkpoint.hub import is_hub_id
from qwenforge.errors import QwenforgeError

MAIN, OLD = "a" * 40, "b" * 40
QWENFORGE = str(Path(sys.executable).parent / "qwenforge")


def cache_model(hub: Path, repo_id: str, files: dict[str, Path | str], commit: str = MAIN, ref: str | None = "main") -> Path:
    """Lay out `files` as huggingface_hub does: blobs/<sha256>, snapshots/<commit>/<name> -> blob, refs/<ref>."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        data = Path(content).read_bytes() if isinstance(content, Path) else content.encode()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_qwen3):
    home = tmp_path_factory.mktemp("hf_home")
    hub = home / "hub"
    cache_model(hub, "Qwen/Tiny3", {path.name: path for path in tiny_qwen3.iterdir() if path.is_file()})
    old_config = json.loads((tiny_qwen3 / "config.json").read_text()) | {"num_hidden_layers": 1}
    cache_model(hub, "Qwen/Tiny3", {"config.json": json.dumps(old_config)}, commit=OLD, ref=None)
    cache_model(hub, "Qwen/ConfigOnly", {"config.json": (tiny_qwen3 / "config.json").read_text()})
    return home


def test_hub_ids_are_told_apart_from_paths(tmp_path, monkeypatch):
    assert is_hub_id("Qwen/Qwen2.5-72B-Instruct") and is_hub_id("Qwen/QwQ-32B")
    assert not is_hub_id("Qwen2.5-72B-Instruct") and not is_hub_id("/abs/model") and not is_hub_id("./a/b") and not is_hub_id("a/b/c")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "model").mkdir(parents=True)
    assert not is_hub_id("runs/model")  # an existing local folder wins


def test_model_folder_and_config_come_from_the_cache(hf_home, tiny_qwen3):
    hub = hf_home / "hub"
    folder = model_folder("Qwen/Tiny3", cache_dir=hub)
    assert folder == hub / "models--Qwen--Tiny3" / "snapshots" / MAIN and (folder / "model.safetensors").exists()
    config, label = load_model_config("Qwen/Tiny3", cache_dir=hub)
    assert config == json.loads((tiny_qwen3 / "config.json").read_text()) and label.startswith("Qwen/Tiny3 (")
    old, _ = load_model_config("Qwen/Tiny3", revision=OLD, cache_dir=hub)
    assert old["num_hidden_layers"] == 1
    with pytest.raises(QwenforgeError, match=r"Qwen/Missing: no local folder of that name, and the model is not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        model_folder("Qwen/Missing", cache_dir=hub)
    with pytest.raises(QwenforgeError, match="config.json is not in the Hugging Face cache"):
        load_model_config("Qwen/Missing", cache_dir=hub)
    config, label = load_model_config("Qwen/Qwen3-32B", cache_dir=hub)  # not cached, but a preset of that name exists
    assert config["num_hidden_layers"] == 64 and label == "preset Qwen3-32B (Qwen/Qwen3-32B is not in the Hugging Face cache)"


def _run(*args, home: Path, cwd: Path):
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([QWENFORGE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_every_verb_takes_a_hub_id_offline(hf_home, tmp_path):
    spec = _run("spec", "Qwen/ConfigOnly", "--json", home=hf_home, cwd=tmp_path)  # only config.json is cached: enough
    assert spec.returncode == 0, spec.stderr
    assert json.loads(spec.stdout)["architecture"]["layers"] == 2
    plan = _run("plan", "Qwen/Tiny3", "--revision", OLD, "--context", "1024", "--json", home=hf_home, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert str(hf_home / "hub" / "models--Qwen--Tiny3" / "snapshots" / OLD) in json.loads(plan.stdout)["source"]
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "Hi"}\n')
    generate = _run("generate", "Qwen/Tiny3", "-i", "in.jsonl", "-o", "out.jsonl", "--max-new-tokens", "2", "--threads", "1", "--json", home=hf_home, cwd=tmp_path)
    assert generate.returncode == 0, generate.stderr
    recipe = json.loads((tmp_path / "out.jsonl.recipe.json").read_text())
    assert recipe["source"] == str(hf_home / "hub" / "models--Qwen--Tiny3" / "snapshots" / MAIN)
    missing = _run("chat", "Qwen/Qwen3-8B", home=hf_home, cwd=tmp_path)
    assert missing.returncode == 2 and "Qwen/Qwen3-8B: no local folder of that name" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr


def test_train_takes_hub_ids_but_not_presets(hf_home, monkeypatch):
    from qwenforge.checkpoint import hub
    from qwenforge.train.pipeline import resolve_model_folder

    real = hub.hub_download
    monkeypatch.setattr(hub, "hub_download", lambda repo_id, filename=None, revision=None, cache_dir=None: real(repo_id, filename, revision, hf_home / "hub"))
    assert resolve_model_folder("Qwen/Tiny3") == hf_home / "hub" / "models--Qwen--Tiny3" / "snapshots" / MAIN
    with pytest.raises(QwenforgeError, match="model: Qwen3-32B is a preset"):
        resolve_model_folder("Qwen3-32B")
    with pytest.raises(QwenforgeError, match="model: Qwen/Missing: no local folder"):
        resolve_model_folder("Qwen/Missing")
