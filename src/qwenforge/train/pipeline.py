"""`qwenforge train CONFIG`: for each topic, SFT -> evaluate -> DPO -> evaluate -> save.

Run folder (OUT, from the config's `output`):
    recipe.json                      resolved config, zone plan, qwenforge version
    metrics.jsonl, metrics.png       every training log and evaluation, one JSON per line; the plot
    topics/NN-<name>/sft/            the SFT trainer's checkpoints (what --resume continues)
    topics/NN-<name>/sft-adapter/    the adapter after SFT (the DPO reference)
    topics/NN-<name>/dpo/            the DPO trainer's checkpoints
    topics/NN-<name>/adapter/        the topic's final PEFT adapter, with metrics.json
Progress is read back from these files, so `--resume` continues after the last finished topic
or saved step; Ctrl-C asks the trainer to save a checkpoint at the current step and stop.
Between topics the adapter either keeps training (`continue`) or is merged into the weights
before a fresh one starts (`merge`); two adapters are never stacked.
Under `accelerate launch` (several processes, shipped configs in train/accelerate/) every process
trains in step and only the main one writes, evaluates and prints (train/ranks.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from qwenforge import __version__
from qwenforge.checkpoint.folder import atomic_output, write_json
from qwenforge.errors import QwenforgeError
from qwenforge.train import ranks
from qwenforge.train.config import EvalSettings, TrainConfig, config_to_dict
from qwenforge.train.curriculum import Curriculum, Topic, dpo_records, load_curriculum, sft_records
from qwenforge.train.evaluate import VoiceRules, evaluate_topic
from qwenforge.train.zones import ZonePlan, plan_zones


def resolve_model_folder(model: str) -> Path:
    """A trainable checkpoint folder: `embedded`, a hub id or a folder with config.json and weights (the one resolver)."""
    from qwenforge.arch.resolve import model_folder
    from qwenforge.arch.presets import preset_names

    if model in preset_names():
        raise QwenforgeError(f"model: {model} is a preset (a config without weights); training needs a checkpoint folder, a hub id or 'embedded'")
    try:
        return model_folder(model)
    except QwenforgeError as error:
        raise QwenforgeError(f"model: {error}") from None


def zone_plan(config: TrainConfig, folder: Path) -> ZonePlan:
    from qwenforge.arch.spec import parameter_counts, spec_from_config
    from qwenforge.checkpoint.folder import read_config

    spec = spec_from_config(read_config(folder), str(folder / "config.json"))
    return plan_zones(config, spec, parameter_counts(spec)["total"])


def cpu_threads(config: TrainConfig) -> int:
    """Torch threads: the config's `threads` (or --threads), else OMP_NUM_THREADS, else every core this process may use.

    No guess from the load average: one taken at the start stuck for the whole run, and a run
    started just after other work trained on one core of two for 4x as long.
    """
    import os

    if config.threads:
        return config.threads
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def torch_threads(config: TrainConfig):
    """`cpu_threads(config)` torch threads while training on CPU in one process; the previous count after.

    Yields the count in use (None where it is not ours to set: GPU, MLX, accelerate launch).
    """
    import torch

    if config.backend != "pytorch" or torch.cuda.is_available() or ranks.world_size() > 1:
        yield None
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(config))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def topic_dir(out: Path, index: int, topic: Topic) -> Path:
    return out / "topics" / f"{index + 1:02d}-{topic.name}"


def voice_rules(config: TrainConfig, curriculum: Curriculum) -> VoiceRules:
    """Markers from the config, else from curriculum.yaml."""
    settings = config.evaluation
    return VoiceRules(
        markers=settings.voice_markers or curriculum.voice_markers,
        negative_patterns=settings.negative_patterns or curriculum.negative_patterns,
        markers_needed=settings.markers_needed,
    )


class Interrupted(QwenforgeError):
    """Training stopped on request after saving a resumable checkpoint."""


@contextmanager
def ctrl_c_requests_stop(stop: threading.Event):
    """First Ctrl-C: save at the current step and stop; a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (kept open across a resumed run); main process only."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}, default=str) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _prepare_output(config: TrainConfig, out: Path, resume: bool, force: bool) -> None:
    recipe_path = out / "recipe.json"
    if resume:
        if not recipe_path.exists():
            raise QwenforgeError(f"{out}: nothing to resume (no recipe.json); run without --resume")
        saved = json.loads(recipe_path.read_text())["config"]
        current = config_to_dict(config)
        changed = [k for k in ("model", "curriculum", "zones", "lora", "between_topics") if saved.get(k) != current.get(k)]
        if changed:
            raise QwenforgeError(f"{out}: --resume with a changed {changed[0]!r}; resume with the config the run started with")
        return
    if out.exists() and any(out.iterdir()):
        if not force:
            raise QwenforgeError(f"{out}: already exists; pass --resume to continue it or --force to start over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _write_recipe(config: TrainConfig, out: Path, plan: ZonePlan, folder: Path, curriculum: Curriculum) -> dict:
    recipe = {
        "qwenforge_version": __version__,
        "command": "qwenforge train",
        "config": config_to_dict(config),
        "model_folder": str(folder),
        "curriculum_folder": str(curriculum.folder),
        "topics": [t.name for t in curriculum.topics],
        "zone_plan": {
            "trainable_parameters": plan.trainable_parameters,
            "rows": [{"layer": r.layer, "zone": r.zone, "modules": list(r.modules), "r": r.r, "alpha": r.alpha} for r in plan.rows],
        },
    }
    write_json(out / "recipe.json", recipe)
    return recipe


def _save_adapter(backend, folder: Path, extra: dict) -> None:
    with atomic_output(folder, force=True) as temp:
        backend.save_adapter(temp)
        for name, data in extra.items():
            write_json(temp / name, data)


def _save_sft(backend, tdir: Path, sft_result: dict) -> None:
    _save_adapter(backend, tdir / "sft-adapter", {})
    write_json(tdir / "sft-result.json", sft_result)


def _read(path: Path) -> dict | None:
    """A file the main process writes, as the main process sees it now, on every process.

    Every branch taken on it must be taken by all processes alike. The main process writes such a
    file and then broadcasts; another process that read the file itself after the write would skip
    that broadcast, and both would hang (seen when one process loaded its model late).
    """
    return ranks.on_main(lambda: json.loads(path.read_text()) if path.exists() else None)


def _has_checkpoint(work_dir: Path) -> bool:
    return ranks.on_main(lambda: any(work_dir.glob("checkpoint-*")))


def refuse_fragile(folder: Path, verb: str) -> None:
    """A linearized checkpoint trains into garbage (measured: 0.75 -> 2.96 bits/byte in 20 LoRA steps): stop first."""
    from qwenforge.convert.qk_norm import fragile_qk_reason

    if reason := fragile_qk_reason(folder):
        raise QwenforgeError(f"{verb}: {reason}")


def train(config: TrainConfig, resume: bool = False, force: bool = False, console=None,
          stop: threading.Event | None = None, on_log=None) -> dict:
    """Run the whole curriculum; returns the summary (also in OUT/summary.json)."""
    from rich.console import Console

    from qwenforge.train.backends import check_settings, create_backend

    ranks.join()
    if not ranks.is_main() or console is None:
        console = Console(quiet=True)
    if ranks.world_size() > 1 and config.backend != "pytorch":
        raise QwenforgeError(f"backend: {config.backend} trains in one process; use backend: pytorch under accelerate launch")
    if config.quantization == "nf4" and config.backend == "pytorch":
        from qwenforge.train.backends.pytorch import check_nf4

        check_nf4(config.source)
    check_settings(config)
    started = time.perf_counter()
    curriculum = load_curriculum(config.curriculum)  # every data problem stops the run here
    folder = resolve_model_folder(config.model)
    refuse_fragile(folder, "train")
    plan = zone_plan(config, folder)
    out = Path(config.output)
    ranks.on_main(_prepare_output, config, out, resume, force)
    recipe = ranks.on_main(_write_recipe, config, out, plan, folder, curriculum)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=ranks.is_main())
    rules = voice_rules(config, curriculum)
    stop = stop or threading.Event()

    backend = create_backend(config.backend)
    summaries = []
    with torch_threads(config) as threads, ctrl_c_requests_stop(stop):
        with console.status(f"loading {folder.name} ..."):
            backend.load(folder, plan, config.quantization, config.seed)
        console.print(f"zones: {len(plan.rows)} of {plan.layers} layers adapted, {plan.trainable_parameters:,} trainable parameters"
                      + (f"; {threads} CPU thread(s)" if threads else ""))
        for index, topic in enumerate(curriculum.topics):
            tdir = topic_dir(out, index, topic)
            done = _read(tdir / "adapter" / "metrics.json")
            if done is not None:
                console.print(f"[dim]{topic.name}: finished earlier, skipped[/dim]")
                if config.between_topics == "merge":
                    backend.load_adapter(tdir / "adapter")
                    backend.merge_adapter()
                summaries.append(done)
                continue
            previous = topic_dir(out, index - 1, curriculum.topics[index - 1]) / "adapter" if index else None
            summary = _train_topic(config, backend, topic, tdir, previous, rules, metrics, stop, console, on_log)
            summaries.append(summary)
            if config.between_topics == "merge":
                backend.merge_adapter()
            if config.evaluation.stop_on_fail and not summary["passed"]:
                console.print(f"[red]{topic.name} did not pass its thresholds; stopping (evaluation.stop_on_fail)[/red]")
                break

    result = {
        "output": str(out),
        "seconds": round(time.perf_counter() - started, 1),
        "topics": summaries,
        "trainable_parameters": plan.trainable_parameters,
        "processes": ranks.world_size(),
        "threads": threads,
        "qwenforge_version": recipe["qwenforge_version"],
    }
    return ranks.on_main(_finish, out, result, metrics)


def _finish(out: Path, result: dict, metrics: MetricsLog) -> dict:
    from qwenforge.train.plot import plot_metrics

    write_json(out / "summary.json", result)
    plot_metrics(metrics.read(), out / "metrics.png")
    return result


def _attach_start_adapter(config: TrainConfig, backend, previous: Path | None) -> None:
    if backend.has_adapter():
        return  # continue mode within one run: the previous topic's adapter keeps training
    if config.between_topics == "continue" and previous is not None:
        backend.load_adapter(previous)
    else:
        backend.start_adapter()


def _stage_logger(metrics: MetricsLog, topic: str, stage: str, progress, task, on_log):
    def log(record: dict) -> None:
        if "train_runtime" in record:
            return
        metrics.write({"topic": topic, "stage": stage, **record})
        progress.update(task, completed=record.get("step", 0), total=record.get("max_steps") or None)
        if on_log:
            on_log({"topic": topic, "stage": stage, **record})

    return log


def _evaluate(backend, topic: Topic, rules: VoiceRules, config: TrainConfig, path: Path, metrics: MetricsLog, stage: str, console) -> dict:
    """Scores on the topic's eval prompts, computed once (cached in `path`); the main process writes them."""
    cached = _read(path)
    if cached is not None:
        return cached
    if ranks.sharded():  # FSDP / ZeRO-3: generation needs every process for the sharded forward passes
        scores = _score(backend, topic, rules, config, stage, console)
        return ranks.on_main(_record_scores, scores, topic, path, metrics, stage, console)
    return ranks.on_main(lambda: _record_scores(_score(backend, topic, rules, config, stage, console), topic, path, metrics, stage, console))


def _score(backend, topic: Topic, rules: VoiceRules, config: TrainConfig, stage: str, console) -> dict:
    with console.status(f"{topic.name}: evaluating ({stage}) on {len(topic.eval)} held-out prompts ..."):
        return evaluate_topic(backend, list(topic.eval), rules, config.evaluation.max_new_tokens)


def _record_scores(scores: dict, topic: Topic, path: Path, metrics: MetricsLog, stage: str, console) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, scores)
    metrics.write({"topic": topic.name, "stage": stage, **{k: v for k, v in scores.items() if k != "samples"}})
    if scores.get("accuracy") is not None:
        console.print(f"{topic.name} {stage}: accuracy {scores['accuracy']:.3f}, voice {scores['voice']:.3f}")
    return scores


def topic_passes(scores: dict, settings: EvalSettings) -> bool:
    """A topic passes when each score it has reaches its gate (defaults: the guide's 0.85 and 0.85)."""
    return all(
        scores.get(key) is None or scores[key] >= threshold
        for key, threshold in (("accuracy", settings.pass_accuracy), ("voice", settings.pass_voice))
    )


def _train_topic(config, backend, topic, tdir, previous, rules, metrics, stop, console, on_log) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tdir.mkdir(parents=True, exist_ok=True)
    sft_adapter = tdir / "sft-adapter"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    sft_result = _read(tdir / "sft-result.json")
    if sft_result is None:
        _attach_start_adapter(config, backend, previous)
        before = _evaluate(backend, topic, rules, config, tdir / "eval-before.json", metrics, "eval-before", console)
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"{topic.name}: SFT", total=None)
            sft_result = backend.sft(
                sft_records(topic), config.sft, tdir / "sft", seed=config.seed,
                resume=_has_checkpoint(tdir / "sft"), stop=stop,
                on_log=_stage_logger(metrics, topic.name, "sft", progress, task, on_log),
            )
        if sft_result["interrupted"]:
            raise Interrupted(f"stopped during {topic.name} SFT at step {sft_result['steps']} (saved); continue with --resume")
        ranks.on_main(_save_sft, backend, tdir, sft_result)
    else:
        before = _read(tdir / "eval-before.json") or {}
        if backend.has_adapter():
            raise RuntimeError("resuming DPO needs the SFT adapter alone")
        backend.load_adapter(sft_adapter)
    after_sft = _evaluate(backend, topic, rules, config, tdir / "eval-sft.json", metrics, "eval-sft", console)

    dpo_result, after_dpo = None, None
    voice = after_sft.get("voice")
    run_dpo = config.dpo.enabled and topic.dpo and (voice is None or voice < config.evaluation.run_dpo_below_voice)
    if run_dpo:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"{topic.name}: DPO", total=config.dpo.steps)
            dpo_result = backend.dpo(
                dpo_records(topic), config.dpo, tdir / "dpo", seed=config.seed,
                resume=_has_checkpoint(tdir / "dpo"), stop=stop,
                on_log=_stage_logger(metrics, topic.name, "dpo", progress, task, on_log),
            )
        if dpo_result["interrupted"]:
            raise Interrupted(f"stopped during {topic.name} DPO at step {dpo_result['steps']} (saved); continue with --resume")
        after_dpo = _evaluate(backend, topic, rules, config, tdir / "eval-dpo.json", metrics, "eval-dpo", console)
    final = after_dpo or after_sft
    passed = topic_passes(final, config.evaluation)
    summary = {
        "topic": topic.name,
        "before": _scores(before),
        "after_sft": _scores(after_sft),
        "after_dpo": _scores(after_dpo),
        "sft": sft_result,
        "dpo": dpo_result,
        "passed": passed,
        "between_topics": config.between_topics,
    }
    fingerprints = ranks.gather(backend.adapter_fingerprint()) if ranks.world_size() > 1 else None
    return ranks.on_main(_close_topic, backend, tdir, summary, config, metrics, fingerprints)


def _close_topic(backend, tdir: Path, summary: dict, config: TrainConfig, metrics: MetricsLog, fingerprints) -> dict:
    """Main process: save the topic's adapter, drop trainer checkpoints, log that it is done."""
    summary = {**summary, "sft": _stage_numbers(metrics, summary["topic"], "sft", summary["sft"]),
               "dpo": _stage_numbers(metrics, summary["topic"], "dpo", summary["dpo"]) if summary["dpo"] else None}
    recipe = {"qwenforge_version": __version__, "config": config_to_dict(config), "topic": summary["topic"]}
    _save_adapter(backend, tdir / "adapter", {"metrics.json": summary, "qwenforge-recipe.json": recipe})
    for work in ("sft", "dpo"):  # trainer checkpoints (optimizer state) are only needed until the topic is done
        shutil.rmtree(tdir / work, ignore_errors=True)
    if fingerprints is not None:  # DDP keeps the ranks' adapters identical; this records that it did
        metrics.write({"topic": summary["topic"], "stage": "ranks", "adapter_fingerprints": fingerprints})
    metrics.write({"topic": summary["topic"], "stage": "topic-done", "passed": summary["passed"]})
    return summary


def _scores(scores: dict | None) -> dict | None:
    if not scores or scores.get("accuracy") is None:
        return None
    return {k: scores[k] for k in ("accuracy", "voice", "similarity", "markers", "clean") if k in scores}


def _stage_numbers(metrics: MetricsLog, topic: str, stage: str, result: dict) -> dict:
    """First and last logged loss (and DPO reward margin) of a stage, from metrics.jsonl."""
    logs = [r for r in metrics.read() if r.get("topic") == topic and r.get("stage") == stage and "loss" in r]
    numbers = {"steps": result.get("steps"), "seconds": result.get("train_runtime")}
    if logs:
        numbers.update(loss_first=logs[0]["loss"], loss_last=logs[-1]["loss"])
    margins = [r["rewards/margins"] for r in logs if "rewards/margins" in r]
    if margins:
        numbers.update(margin_first=margins[0], margin_last=margins[-1], margin_max=max(margins))
    return numbers


def sft_trial(model: str | Path, work_dir: Path, topic: str = "tokens", steps: int = 3, examples: int = 8,
              max_seq_length: int = 256, threads: int | None = None) -> dict:
    """A few SFT steps on one sample topic: the answer loss on those examples before and after.

    The demo's training step; the zone plan and chat-template handling are the real ones.
    """
    from qwenforge.train.backends import create_backend

    config = TrainConfig(model=str(model), output=str(work_dir), threads=threads)
    config = dataclasses.replace(
        config, sft=dataclasses.replace(config.sft, max_steps=steps, batch_size=2, max_seq_length=max_seq_length, learning_rate=1e-3)
    )
    chosen = [t for t in load_curriculum("sample").topics if t.name == topic][0]
    records = sft_records(chosen)[:examples]
    folder = resolve_model_folder(config.model)
    refuse_fragile(folder, "train")
    plan = zone_plan(config, folder)
    backend = create_backend("pytorch")
    backend.load(folder, plan)
    backend.start_adapter()
    started = time.perf_counter()
    with torch_threads(config):
        before = backend.loss(records)
        result = backend.sft(records, config.sft, Path(work_dir) / "sft")
        after = backend.loss(records)
    return {
        "topic": topic,
        "examples": len(records),
        "steps": result["steps"],
        "loss_before": before,
        "loss_after": after,
        "trainable_parameters": plan.trainable_parameters,
        "adapted_layers": len(plan.rows),
        "seconds": round(time.perf_counter() - started, 1),
    }
