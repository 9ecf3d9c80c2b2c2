"""Named releases: `lsmfm.load_pretrained("unet_image_text")` downloads, verifies and loads a known file.

Each entry says where the file is, how to check it (sha256, else md5, and size) and which architecture its
weights must have, so a wrong or swapped file is caught. The paper's four Lightning checkpoints are
registered here. The paper publishes no sha256; Zenodo lists an md5 per file. Known values
(`swinunetr_image_only`: Zenodo's md5, its size and sha256; `swinunetr_image_text`: sha256) are recorded
as reported by an independent audit of the Zenodo record that downloaded and verified the files; the
two UNets' are not known here. A file with no known hash is trusted on first download: its sha256 is
stored next to it in the cache and every later use is checked against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lsmfm.errors import InputError

ZENODO = "https://zenodo.org/records/20146516/files/{}?download=1"


@dataclass(frozen=True)
class Release:
    """A downloadable set of weights.

    Args:
        name: what users pass to `load_pretrained`.
        url: https:// or file:// address of the file.
        filename: name of the file in the cache.
        format: "paper-ckpt" (a Lightning checkpoint in the paper's layout) or "safetensors" (our
            format as one file, its config embedded in the header).
        arch: BackboneConfig fields the weights must have (checked after loading).
        sha256: hex digest; a mismatch deletes the download (or refuses the cached file) and raises.
        md5: hex digest (what Zenodo publishes), checked the same way when sha256 is unknown.
        size: bytes, checked when given.
        description: one line for listings.
    """

    name: str
    url: str
    filename: str
    format: Literal["paper-ckpt", "safetensors"]
    arch: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    size: int | None = None
    description: str = ""
    md5: str | None = None

    def __post_init__(self) -> None:
        if self.format not in ("paper-ckpt", "safetensors"):
            raise ValueError(f"release {self.name}: format must be paper-ckpt or safetensors, "
                             f"got {self.format!r}")
        if (self.format == "safetensors") != self.filename.endswith(".safetensors"):
            raise ValueError(f"release {self.name}: filename {self.filename!r} does not fit "
                             f"format {self.format}")
        for kind, digits in (("sha256", 64), ("md5", 32)):
            value = getattr(self, kind)
            if value is not None and (len(value) != digits or any(c not in "0123456789abcdef"
                                                                   for c in value.lower())):
                raise ValueError(f"release {self.name}: {kind} must be {digits} hex digits, got {value!r}")


RELEASES: dict[str, Release] = {}


def register_release(release: Release, replace: bool = False) -> Release:
    """Add a release to the registry (an existing name needs `replace=True`)."""
    if release.name in RELEASES and not replace:
        raise ValueError(f"release {release.name!r} is already registered")
    RELEASES[release.name] = release
    return release


def get_release(name: str) -> Release:
    if name not in RELEASES:
        raise InputError(None, f"unknown release {name!r}; registered: {', '.join(sorted(RELEASES))}")
    return RELEASES[name]


def check_arch(release: Release, backbone: Any, path: Any) -> None:
    """Raise if the loaded architecture differs from what the registry promises."""
    diffs = []
    for key, want in release.arch.items():
        got = getattr(backbone, key)
        same = str(got).lower() == str(want).lower() if key == "norm" else list(got) == list(want) \
            if isinstance(want, (list, tuple)) else got == want
        if not same:
            diffs.append(f"{key} is {got!r} in the file but {want!r} in the registry")
    if diffs:
        raise InputError(path, f"does not match release {release.name!r}: {'; '.join(diffs)}")


_UNET = {"arch": "unet", "in_channels": 1, "channels": [32, 64, 128, 256, 512], "strides": [2, 2, 2, 1],
         "num_res_units": 2, "norm": "batch", "out_channels": 128}


def _paper(name: str, arch: dict[str, Any], what: str, **check: Any) -> Release:
    filename = f"{name}_best.ckpt"
    return Release(name=name, url=ZENODO.format(filename), filename=filename, format="paper-ckpt", arch=arch,
                   description=f"LSM foundation model paper: {what}", **check)


for _release in (
    _paper("unet_image_text", _UNET, "UNet 32-512, embedding 128, image+text pretraining"),
    _paper("unet_image_only", _UNET, "UNet 32-512, embedding 128, image-only pretraining"),
    _paper("swinunetr_image_text", {"arch": "swinunetr", "in_channels": 1, "feature_size": 36,
                                    "out_channels": 512, "norm": "instance"},
           "SwinUNETR feature size 36, embedding 512, image+text pretraining",
           sha256="f08122ee471fae0c555f3b71df37087d6dd78ffda7bf000f0510aa262c1c5d15"),
    _paper("swinunetr_image_only", {"arch": "swinunetr", "in_channels": 1, "feature_size": 24,
                                    "out_channels": 512, "norm": "instance"},
           "SwinUNETR feature size 24, embedding 512, image-only pretraining",
           sha256="ef0f3d100f9a9aaa5d9a48bb9b07e7f1b0e0d1cc690cdcd308b1e0446bd01634",
           md5="eabe42d6a6755dcb8ac5f7b7d98c4ae5", size=278_085_300),
):
    register_release(_release)
