"""Networks: 3D backbones, heads, text encoder, masking."""
