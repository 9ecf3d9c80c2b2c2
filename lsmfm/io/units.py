"""Length units of voxel sizes, as file formats spell them (TIFF/ImageJ, OME-XML, NIfTI, NGFF), in µm."""
from __future__ import annotations

UNIT_TO_UM = {
    "m": 1e6, "meter": 1e6, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
    "um": 1.0, "µm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3,
}


def unit_factor(unit: str | None, default: float = 1.0) -> float:
    """Micrometres per `unit`; `default` when the unit is missing or unknown (the format's convention)."""
    if not unit:
        return default
    return UNIT_TO_UM.get(str(unit).strip().lower(), default)
