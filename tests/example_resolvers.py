"""Resolvers the tests name in their configs (`resolver = "example_resolvers:..."`)."""

from __future__ import annotations

from typing import Any

from pgconcord.resolver import PARK, ConflictVersion, Park


def larger_quantity(first: ConflictVersion, second: ConflictVersion) -> dict[str, Any]:
    """The order with the larger quantity, whoever wrote it last."""
    return max(first.row, second.row, key=lambda row: (row["quantity"], row["note"]))


def union_of_tags(first: ConflictVersion, second: ConflictVersion) -> dict[str, Any]:
    """Tags from both sides; the rest from the later write."""
    tags = sorted(set(first.row["tags"].split(",")) | set(second.row["tags"].split(",")))
    return {**first.row, "tags": ",".join(tag for tag in tags if tag)}


def ask_a_person(first: ConflictVersion, second: ConflictVersion) -> Park:
    return PARK
