"""`qwenforge generate MODEL --input prompts.jsonl --output out.jsonl`: batched generation from a file.

    qwenforge generate embedded --input prompts.jsonl --output answers.jsonl --temperature 0 --batch-size 8

Each input line is {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}; each goes
through the model's chat template. Prompts are batched with left padding; every finished batch is
appended to the output at once, so an interrupted run resumes by skipping ids already written.
`--seed` seeds each batch from its position in the input, so a resumed run repeats a full one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from qwenforge.errors import QwenforgeError
from qwenforge.infer.generation import (
    Sampling,
    build_prompt,
    complete,
    opened_reasoning,
    reasons,
    resolve_sampling,
    split_reasoning,
    thinking_mode,
)


def read_prompts(path: Path) -> list[dict]:
    """The input file as [{"id", "messages"}], with errors naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise QwenforgeError(f"{path}: no such input file; give a JSONL file of {{\"id\", \"prompt\"}} lines")
    items, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise QwenforgeError(f"{path}:{number}: not JSON ({error}); each line is one JSON object") from None
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
            raise QwenforgeError(f"{path}:{number}: need a \"prompt\" string or a \"messages\" list")
        item_id = row.get("id", number)
        if item_id in seen:
            raise QwenforgeError(f"{path}:{number}: duplicate id {item_id!r}; ids must be unique to resume safely")
        seen.add(item_id)
        messages = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
        items.append({"id": item_id, "messages": messages, "position": len(items)})
    return items


def done_ids(output: Path) -> set:
    """Ids already answered in `output`; a torn last line (killed mid-write) is ignored."""
    if not Path(output).exists():
        return set()
    ids = set()
    for line in Path(output).read_text().splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            continue
    return ids


def _drop_torn_line(output: Path) -> None:
    """Cut a last line without its newline (a run killed mid-write) so appends start clean."""
    if not output.exists():
        return
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        output.write_bytes(data[: data.rfind(b"\n") + 1])


def _batch_rows(loaded, prompts: list[str], sampling: Sampling) -> list[dict]:
    """Generate for several prompts at once (left padding); one row of figures per prompt."""
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    width = inputs["input_ids"].shape[1]
    from qwenforge.infer.generation import _eos_ids, _generation_kwargs, check_length

    check_length(loaded, width, sampling.max_new_tokens)
    with torch.inference_mode():
        output = model.generate(**inputs, **_generation_kwargs(sampling, tokenizer, width))
    eos = _eos_ids(loaded)
    rows = []
    for index in range(len(prompts)):
        new = output[index, width:].tolist()
        stop_at = next((i for i, token in enumerate(new) if token in eos), None)
        kept = new if stop_at is None else new[: stop_at + 1]
        rows.append(
            {
                "text": tokenizer.decode(kept, skip_special_tokens=True),
                "prompt_tokens": int(inputs["attention_mask"][index].sum()),
                "completion_tokens": len(kept),
                "finish_reason": "stop" if stop_at is not None else "length",
            }
        )
    return rows


def generate_file(
    loaded,
    input_path: Path,
    output_path: Path,
    sampling: Sampling,
    batch_size: int = 8,
    enable_thinking: bool | None = None,
    progress=None,
    force: bool = False,
) -> dict:
    """Answer every pending prompt of `input_path` into `output_path`; returns counts and speed.

    An existing output is resumed only when its recipe (model, engine, sampling) matches; `force` starts over.
    """
    import torch

    from qwenforge import __version__

    if batch_size < 1:
        raise QwenforgeError("--batch-size must be at least 1")
    items = read_prompts(input_path)
    output_path = Path(output_path)
    sampling, sampling_origin = resolve_sampling(loaded, sampling, thinking_mode(loaded.tokenizer, [], enable_thinking))
    recipe_path = Path(f"{output_path}.recipe.json")
    recipe = {
        "qwenforge_version": __version__,
        "model": loaded.name,
        "source": str(loaded.source),
        "engine": loaded.engine,
        "setup": loaded.setup.__dict__,
        "sampling": sampling.to_dict(),
        "sampling_defaults": sampling_origin,
        "batch_size": batch_size,
        "enable_thinking": enable_thinking,
        "input": str(input_path),
    }
    if force:
        output_path.unlink(missing_ok=True)
    elif output_path.exists() and recipe_path.exists():
        before = json.loads(recipe_path.read_text())
        changed = [key for key in ("source", "engine", "sampling", "enable_thinking") if json.dumps(before.get(key), default=str) != json.dumps(recipe[key], default=str)]
        if changed:
            raise QwenforgeError(
                f"{output_path}: written with another {', '.join(changed)} (see {recipe_path.name}); resume with the same options, "
                "choose another --output, or pass --force to start over"
            )
    _drop_torn_line(output_path)
    finished = done_ids(output_path)
    pending = [item for item in items if item["id"] not in finished]
    output_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(json.dumps(recipe, indent=2, default=str) + "\n")
    thinking = reasons(loaded.tokenizer)
    task = progress.add_task("generating", total=len(pending), rate="") if progress else None
    started, tokens = time.perf_counter(), 0
    with open(output_path, "a") as out:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            prompts = [build_prompt(loaded.tokenizer, item["messages"], enable_thinking) for item in batch]
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed + batch[0]["position"])
            if loaded.engine == "transformers":
                rows = _batch_rows(loaded, prompts, sampling)
            else:
                rows = []
                for index, prompt in enumerate(prompts):
                    seeded = sampling if sampling.seed is None else sampling.updated(seed=sampling.seed + batch[index]["position"])
                    result = complete(loaded, prompt, seeded)
                    rows.append({"text": result.text, "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason})
            for item, prompt, row in zip(batch, prompts, rows):
                record = {"id": item["id"], "output": row["text"]}
                if thinking:
                    record["reasoning"], record["output"] = split_reasoning(opened_reasoning(prompt) + row["text"])
                record.update(prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"], finish_reason=row["finish_reason"])
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                tokens += row["completion_tokens"]
            out.flush()
            os.fsync(out.fileno())
            if progress:
                rate = tokens / max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=len(batch), rate=f"{rate:.1f} tokens/s")
    seconds = time.perf_counter() - started
    return {
        "input": str(input_path),
        "output": str(output_path),
        "total": len(items),
        "skipped": len(items) - len(pending),
        "generated": len(pending),
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 and tokens else 0.0,
    }


def run_generate(
    console, model: str, load_options: dict, input_path: Path, output_path: Path, sampling: dict, batch_size: int = 8, enable_thinking=None, quiet=False, force=False
) -> dict:
    """`qwenforge generate`: load MODEL, then answer the input file with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qwenforge.infer.load import load_model

    settings = Sampling().updated(**{k: v for k, v in sampling.items() if v is not None})
    read_prompts(input_path)  # fail on a bad input before loading a model
    loaded = load_model(model, **load_options, batch=batch_size, say=None if quiet else (lambda line: console.print(f"[dim]{line}[/dim]", highlight=False)))
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        return generate_file(loaded, input_path, output_path, settings, batch_size=batch_size, enable_thinking=enable_thinking, progress=progress, force=force)
