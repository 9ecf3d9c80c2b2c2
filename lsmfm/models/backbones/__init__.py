"""3D backbones: the registry (`registry.py`: `BackboneConfig`, `build_backbone`, one line per architecture),
the shared network interface (`base.py`), and one module per architecture (`unet.py`, `swinunetr.py`)."""
