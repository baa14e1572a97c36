"""`qwenforge generate MODEL --input prompts.jsonl --output out.jsonl`: batched generation from a file.

    qwenforge generate embedded --input prompts.jsonl --output answers.jsonl --temperature 0 --batch-size 8

Each input line is {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}; each goes
through the model's chat template. Prompts are batched with left padding; every finished batch is
appended to the output at once, so an interrupted run resumes by skipping ids already written.
`--seed` seeds each prompt (seed + its position in the input), so a run resumed anywhere, even
mid-batch after a torn last line, repeats a full one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from qwenforge.errors import QwenforgeError
from qwenforge.files import check_writable, read_text, same_file
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
    if not path.exists():
        raise QwenforgeError(f"{path}: no such input file; give a JSONL file of {{\"id\", \"prompt\"}} lines")
    items, seen = [], set()
    for number, line in enumerate(read_text(path, "input file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise QwenforgeError(f"{path}:{number}: not JSON ({error}); each line is one JSON object") from None
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list) and row["messages"]):
            raise QwenforgeError(f"{path}:{number}: need a \"prompt\" string or a non-empty \"messages\" list")
        item_id = row.get("id", number)
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
            raise QwenforgeError(f"{path}:{number}: \"id\" must be a string or an integer, got {item_id!r}")
        messages = row["messages"] if isinstance(row.get("messages"), list) and row["messages"] else [{"role": "user", "content": row["prompt"]}]
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool") or not isinstance(message.get("content"), str):
                raise QwenforgeError(f"{path}:{number}: each message needs a role (system, user, assistant or tool) and a string content, got {message!r}")
        if item_id in seen:
            raise QwenforgeError(f"{path}:{number}: duplicate id {item_id!r}; ids must be unique to resume safely")
        seen.add(item_id)
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


class _SeededRows:
    """A logits processor that samples each row (after the sampling's own processors: penalties,
    temperature, top-k, top-p, min-p) with its own generator and leaves only that token: with greedy
    search after it, a prompt's answer depends on its own seed, not on which prompts share its batch,
    so a run resumed mid-batch repeats a whole one."""

    def __init__(self, seeds: list[int], processors):
        self.seeds, self.processors = seeds, processors
        self.generators = None

    def __call__(self, input_ids, scores):
        import torch

        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(seed) for seed in self.seeds]
        probabilities = torch.softmax(self.processors(input_ids, scores.float()), dim=-1)
        chosen = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            pick = torch.multinomial(probabilities[row], 1, generator=generator)
            chosen[row, pick] = 0.0
        return chosen


def _batch_rows(loaded, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> list[dict]:
    """Generate for several prompts at once (left padding); one row of figures per prompt.

    With `seeds` (one per prompt) sampling is seeded per row (`_SeededRows`)."""
    import torch
    from transformers import LogitsProcessorList

    tokenizer, model = loaded.tokenizer, loaded.model
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    width = inputs["input_ids"].shape[1]
    from qwenforge.infer.generation import _eos_ids, _generation_kwargs, check_length, sampling_processors

    check_length(loaded, width, sampling.max_new_tokens)
    if seeds is not None and sampling.temperature > 0:
        kwargs = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": tokenizer.pad_token_id, "do_sample": False, "repetition_penalty": 1.0,
                  "temperature": None, "top_p": None, "top_k": None, "min_p": None}
        kwargs["logits_processor"] = LogitsProcessorList([_SeededRows(seeds, sampling_processors(sampling, width))])
    else:
        kwargs = _generation_kwargs(sampling, tokenizer, width)
    with torch.inference_mode():
        output = model.generate(**inputs, **kwargs)
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


def _batches(items: list[dict], finished: set, batch_size: int):
    """The input's batches (by position, as a full run makes them) that still hold a pending prompt.

    A batch resumed whole, answered prompts included, pads and computes as in the full run, so a
    run cut anywhere (a torn last line mid-batch) resumes to the same answers."""
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        if any(item["id"] not in finished for item in batch):
            yield batch


def check_output(input_path: Path, output_path: Path) -> None:
    """Refuse, before a model is loaded, an output that is the input, a folder or unwritable."""
    if same_file(input_path, output_path):
        raise QwenforgeError(f"{output_path}: is the input file too; answers would be appended to the prompts; give another --output")
    check_writable(output_path, "output file")
    check_writable(Path(f"{output_path}.recipe.json"), "recipe file beside the output")


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
    from qwenforge import __version__

    if batch_size < 1:
        raise QwenforgeError("--batch-size must be at least 1")
    items = read_prompts(input_path)
    output_path = Path(output_path)
    check_output(input_path, output_path)
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
    thinking = reasons(loaded.tokenizer)
    task = progress.add_task("generating", total=len(pending), rate="") if progress else None
    started, tokens = time.perf_counter(), 0
    out = None  # opened with the first finished batch: a run that fails at once leaves no empty output
    try:
        for batch in _batches(items, finished, batch_size):
            prompts = [build_prompt(loaded.tokenizer, item["messages"], enable_thinking) for item in batch]
            if loaded.engine == "transformers":
                seeds = None if sampling.seed is None else [sampling.seed + item["position"] for item in batch]
                rows = _batch_rows(loaded, prompts, sampling, seeds)
            else:
                rows = []
                for index, prompt in enumerate(prompts):
                    seeded = sampling if sampling.seed is None else sampling.updated(seed=sampling.seed + batch[index]["position"])
                    result = complete(loaded, prompt, seeded)
                    rows.append({"text": result.text, "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason})
            if out is None:
                output_path.parent.mkdir(parents=True, exist_ok=True)
                recipe_path.write_text(json.dumps(recipe, indent=2, default=str) + "\n")
                out = open(output_path, "a")
            for item, prompt, row in zip(batch, prompts, rows):
                if item["id"] in finished:  # answered before this run; regenerated only to keep its batch whole
                    continue
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
                progress.update(task, advance=sum(item["id"] not in finished for item in batch), rate=f"{rate:.1f} tokens/s")
    finally:
        if out is not None:
            out.close()
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
    read_prompts(input_path)  # fail on a bad input or output before loading a model
    check_output(input_path, output_path)
    loaded = load_model(model, **load_options, batch=batch_size, say=None if quiet else (lambda line: console.print(f"[dim]{line}[/dim]", highlight=False)))
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        return generate_file(loaded, input_path, output_path, settings, batch_size=batch_size, enable_thinking=enable_thinking, progress=progress, force=force)
