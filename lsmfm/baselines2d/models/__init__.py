"""Foundation models as 2D segmenters: SAM, DINOv2/DINOv3, CLIP, and the EffiCell-style decoder."""
