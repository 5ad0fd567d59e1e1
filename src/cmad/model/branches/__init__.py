"""The registry of branches: name -> class. Adding a branch is a file here plus one line."""
from __future__ import annotations

from cmad.model.branch import Branch
from cmad.model.branches.align import AlignBranch
from cmad.model.branches.banks import GeomBank, JointBank, RGBBank, XYZBank
from cmad.model.branches.mapping import MappingBranch

REGISTRY: dict[str, type[Branch]] = {b.name: b for b in (
    AlignBranch,
    JointBank,
    RGBBank,
    XYZBank,
    GeomBank,
    MappingBranch,
)}


def branch_class(name: str) -> type[Branch]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown branch {name!r}; known: {sorted(REGISTRY)}") from None
