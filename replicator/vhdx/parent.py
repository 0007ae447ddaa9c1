"""Differencing-disk parents (MS-VHDX §2.6.2.6.3): locate the parent file and verify the linkage.

Paths are tried in the spec's order: relative_path, volume_path, absolute_win32_path. volume_path names a
Windows volume GUID and cannot be resolved on a POSIX host; absolute_win32_path resolves when it holds a
POSIX path after the "\\\\?\\" prefix (what replicator writes on Linux) and is skipped for drive letters.
"""
from __future__ import annotations

import os
import uuid

from ..errors import ParentError, UnsupportedFeature
from .structures import VHDX_LOCATOR_TYPE, ParentLocator

WIN32_PREFIX = "\\\\?\\"


def parse_linkage(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value.strip().strip("{}"))
    except ValueError:
        return None


def format_linkage(guid: uuid.UUID) -> str:
    return "{" + str(guid).lower() + "}"


def candidate_paths(child_path: str, locator: ParentLocator) -> list[str]:
    if locator.locator_type != VHDX_LOCATOR_TYPE:
        raise UnsupportedFeature("parent locator", None, f"locator type {locator.locator_type} is not the VHDX "
                                 "locator", child_path)
    out = []
    rel = locator.entries.get("relative_path")
    if rel:
        out.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(child_path)),
                                                 rel.replace("\\", "/"))))
    absolute = locator.entries.get("absolute_win32_path", "")
    if absolute.startswith(WIN32_PREFIX) and absolute[len(WIN32_PREFIX):].startswith("/"):
        out.append(absolute[len(WIN32_PREFIX):])
    return out


def resolve_parent(child_path: str, locator: ParentLocator) -> str:
    candidates = candidate_paths(child_path, locator)
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ParentError(f"{child_path}: parent disk not found (tried: {', '.join(candidates) or 'no usable path'})")


def check_linkage(child_path: str, parent_path: str, locator: ParentLocator, parent_data_write_guid: uuid.UUID):
    """The parent's DataWriteGuid must equal parent_linkage or parent_linkage2, else it changed under us."""
    links = [parse_linkage(locator.entries[k]) for k in ("parent_linkage", "parent_linkage2")
             if k in locator.entries]
    if not links or links[0] is None:
        raise ParentError(f"{child_path}: parent locator has no valid parent_linkage")
    if parent_data_write_guid not in links:
        raise ParentError(
            f"{child_path}: parent {parent_path} has DataWriteGuid {parent_data_write_guid}, but the child was "
            f"made from {links[0]}: the parent was modified after the child was created")


def make_locator(child_path: str, parent_path: str, parent_data_write_guid: uuid.UUID) -> ParentLocator:
    parent_abs = os.path.abspath(parent_path)
    rel = os.path.relpath(parent_abs, os.path.dirname(os.path.abspath(child_path)))
    return ParentLocator(VHDX_LOCATOR_TYPE, {
        "parent_linkage": format_linkage(parent_data_write_guid),
        "relative_path": rel.replace("/", "\\"),
        "absolute_win32_path": WIN32_PREFIX + parent_abs,
    })
