"""`qwenforge train`: zone-LoRA curriculum training, per topic SFT -> evaluate -> DPO -> evaluate.

config.py (the YAML, validated), zones.py (zones -> per-layer plan -> one PEFT LoraConfig),
curriculum.py (topic folders of JSONL), pipeline.py (the loop, resume, Ctrl-C), evaluate.py
(accuracy and voice fidelity), merge.py (`train merge`), backends/ (pytorch: PEFT + TRL; mlx).
"""
