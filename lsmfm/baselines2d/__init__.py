"""2D vision-foundation-model baselines with parameter-efficient finetuning, and domain analysis.

Layout: `config.py` (Baseline2DConfig), `registry.py` (PEFT methods by name), `methods/` (one module
per method), `models/` (SAM, DINOv2/DINOv3, CLIP, EffiCell-style decoder), `build.py` (model + method,
counts, saved adapters), `data.py`, `train.py` (few-shot protocol), `evaluate.py` (its instance
accuracy is `lsmfm.metrics.instances`), `compare.py` (one table across runs), `domains.py`. Heavy
imports (transformers, peft) happen inside functions.
"""
