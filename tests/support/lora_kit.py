"""Helpers shared by the LoRA op tests (tests/lora, tests/cuda)."""
from __future__ import annotations

from multilora.lora.ops import LoraTarget, LoraTargets, LoraWeightTable


def whole_table(table: LoraWeightTable) -> LoraTargets:
    """One table covering all of y's columns: the op on a plain [T, h_out] output."""
    return LoraTargets([LoraTarget("all", 0, table.h_out, table)])
