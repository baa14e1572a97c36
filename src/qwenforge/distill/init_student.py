"""`qwenforge distill init-student TEACHER OUT --keep-layers ...`: a student made of a subset of the teacher's layers.

Streams tensor by tensor: layer i of the student is the teacher's `keep[i]`; embeddings, final
norm and head are copied. The result is a standard checkpoint of the same architecture.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwenforge import __version__
from qwenforge.checkpoint.folder import atomic_output, copy_tokenizer_files, read_config, refuse_overlap, write_json
from qwenforge.checkpoint.safetensors_io import ShardedWriter, TensorReader
from qwenforge.errors import QwenforgeError

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def parse_keep_layers(text: str, layers: int) -> list[int]:
    """'half' (every other layer, first and last kept), 'first:N', or a list like '0,2,4-7'."""
    text = text.strip()
    if text == "half":
        keep = sorted(set(range(0, layers, 2)) | {layers - 1})
    elif text.startswith("first:"):
        keep = list(range(int(text.split(":", 1)[1])))
    else:
        from qwenforge.arch.spec import layer_ranges

        try:
            keep = layer_ranges(text)
        except ValueError as error:
            raise QwenforgeError(f"--keep-layers {text!r}: give 'half', 'first:N' or indices like 0,2,4-7") from error
    if not keep or len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= layers:
        raise QwenforgeError(f"--keep-layers {text!r}: need distinct layer indices between 0 and {layers - 1}")
    return sorted(keep)


def init_student(teacher_dir: Path, out: Path, keep_layers: str, *, force: bool = False) -> dict:
    """Write OUT: the teacher with only `keep_layers`; returns the recipe written beside it."""
    teacher_dir, out = Path(teacher_dir), Path(out)
    refuse_overlap(out, {"teacher": teacher_dir})
    config = read_config(teacher_dir)
    layers = int(config["num_hidden_layers"])
    keep = parse_keep_layers(keep_layers, layers)
    reader = TensorReader(teacher_dir)
    renumber = {old: new for new, old in enumerate(keep)}
    plan = []  # (student name, teacher name)
    for name in reader.names():
        match = LAYER.match(name)
        if not match:
            plan.append((name, name))
        elif int(match.group(1)) in renumber:
            plan.append((f"model.layers.{renumber[int(match.group(1))]}.{match.group(2)}", name))
    infos = reader.tensors
    config = {**config, "num_hidden_layers": len(keep)}
    for key in ("layer_types",):
        if isinstance(config.get(key), list):
            config[key] = [config[key][i] for i in keep]
    if "max_window_layers" in config:
        config["max_window_layers"] = min(int(config["max_window_layers"]), len(keep))
    recipe = {"qwenforge_version": __version__, "teacher": str(teacher_dir), "keep_layers": keep, "layers": len(keep)}
    with atomic_output(out, force=force) as folder:
        writer = ShardedWriter(folder, [(new, tuple(infos[old].shape), infos[old].dtype) for new, old in plan])
        for new, old in plan:
            writer.write(new, reader.get(old))
        writer.close()
        write_json(folder / "config.json", config)
        copy_tokenizer_files(teacher_dir, folder)
        write_json(folder / "student_recipe.json", recipe)
    return recipe
