"""The rows the state database hands out and takes in (plain frozen dataclasses).

In a module of their own so that the state machine (:mod:`dicom_node.state`) and its parts
(:mod:`dicom_node.delivery_queue`, :mod:`dicom_node.audit_trail`) share them without
importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["InstanceRow", "DeliveryRow", "NewDelivery", "OutputRecord", "INSTANCE_COLS"]

INSTANCE_COLS = ("id, called_ae, calling_ae, sop_uid, sop_class, study_uid, series_uid, route, path, size, "
                 "state, received_at, error")


@dataclass(frozen=True)
class InstanceRow:
    id: int
    called_ae: str
    calling_ae: str
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    route: str | None  # the route's name
    path: str
    size: int
    state: str
    received_at: float
    error: str | None


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    instance_id: int
    destination: str
    kind: str
    sop_uid: str
    path: str
    attempts: int


@dataclass(frozen=True)
class NewDelivery:
    destination: str
    kind: str  # "output" or "original"
    sop_uid: str
    path: str


@dataclass(frozen=True)
class OutputRecord:
    """What the audit trail keeps of one output (``outputs`` table)."""

    source_sop_uid: str
    output_sop_uid: str
    model: str
    model_version: str
    model_digest: str
    device_uid: str
    verdict: str
    reasons: list[str]
    scores: dict[str, Any]
    thresholds: dict[str, Any]
    action: str
    output_version: int = 1  # 2, 3...: re-translated by dicom-node reprocess
    requested_by: str | None = None  # who asked for that reprocess
