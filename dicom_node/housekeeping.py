"""The housekeeper: the spool and the state database do not grow without bound.

Why a loop of its own, once a minute: an aborted transfer leaves a partial file in the spool's
tmp/, and finished rows, kept to recognise re-sent duplicates, would pile up forever; neither is
urgent, and neither may slow down receiving, translating or delivering.
"""
from __future__ import annotations

import logging
import threading

from dicom_node.config import NodeConfig
from dicom_node.loops import Loop
from dicom_node.spool import Spool
from dicom_node.state import StateDB

__all__ = ["Housekeeper"]

log = logging.getLogger("dicom_node.housekeeping")


class Housekeeper(Loop):
    """Once a minute: sweep partial files of aborted transfers from the spool's tmp/, and
    forget finished rows older than ``FORGET_AFTER`` (the database stays small)."""

    INTERVAL = 60.0
    FORGET_AFTER = 30 * 86400.0  # duplicates re-sent within 30 days are recognised
    WAIT_FIRST = True
    logger = log

    config: NodeConfig

    def __init__(self, config: NodeConfig, spool: Spool, db: StateDB, stop: threading.Event) -> None:
        super().__init__("housekeeper", stop, config=config)
        self.spool, self.db = spool, db
        self.error_pause = self.INTERVAL  # housekeeping is never urgent: the next round tries again

    @property
    def max_age(self) -> float:
        """Seconds after which a file in tmp/ is a leftover: no association can still be writing it."""
        node = self.config.node
        return 2 * max(node.network_timeout, node.dimse_timeout, node.acse_timeout) + 60

    def idle_seconds(self) -> float:
        return self.INTERVAL

    def step(self) -> bool:
        removed = self.spool.sweep_tmp(self.max_age)
        forgotten = self.db.forget_older_than(self.FORGET_AFTER)
        self.spool.sweep_previews(self.FORGET_AFTER)
        if removed:
            log.info("removed %d partial file(s) of aborted transfers from the spool", removed)
        if forgotten:
            log.info("forgot %d instance(s) finished more than %d days ago", forgotten, self.FORGET_AFTER // 86400)
        return False
