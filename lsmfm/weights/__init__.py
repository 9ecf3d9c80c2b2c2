"""Pretrained weights: one-line loading, the safetensors format, releases, the paper's checkpoints, export.

- `load.py`: `load_pretrained(source, which=None, map_location="cpu")` (also `lsmfm.load_pretrained`).
- `format.py`: `ModelConfig`, `save_model_dir`, `read_model_dir`: model.safetensors + config.json + README.md.
- `paper.py`: the LSM foundation model paper's Lightning checkpoints (teacher by default).
- `registry.py` / `download.py`: named releases, cached downloads with sha256 checks; Hub repositories
  (`hf-hub:org/name` or `org/name`) and their download.
- `hub.py`: `HubMixin` (save_pretrained / from_pretrained / push_to_hub on every backbone).
- `export.py`: DeepSpeed run -> weights folder (`lsmfm export`); the only module that imports DeepSpeed.

Nothing is imported here, so `import lsmfm.weights.registry` stays cheap.
"""
