"""The web's check that its data directory and its database belong together and are this
version's (`app.db.claim_data_dir`), with the clean-up of crash leftovers it allows: made as
the web starts or, when the database does not answer then, as soon as it does."""

from __future__ import annotations

import logging
import threading

from fastapi import HTTPException, Request
from sqlalchemy.exc import SQLAlchemyError

from app import ingest
from app.config import Settings
from app.db import StartupRefused, claim_data_dir

log = logging.getLogger(__name__)


class DataDirCheck:
    """One web process's check. Until it has passed, the reaper acts on nothing (app.reaper);
    once it has refused, the web serves no work: /api/health answers 503 with the refusal,
    and every other route 503 with it too (`refuse_work`). A web started during a database
    outage on the wrong database (or an unmigrated one) served 500s, or removed another
    database's dataset folders, once the database answered."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.passed = False
        self.tried = False  # made at least once
        self.refusal: str | None = None
        self._lock = threading.Lock()  # the start and the reaper's thread may try at once

    @property
    def pending(self) -> bool:
        return not self.passed and self.refusal is None

    def make(self) -> None:
        """Check the data directory against the database, then remove crash leftovers (only
        in this database's data directory: the clean-up removes the dataset folders the
        database does not list). Raises StartupRefused, kept in `refusal`, or what the
        driver raises when the database does not answer: then it is tried again later."""
        with self._lock:
            self.tried = True
            if not self.pending:
                if self.refusal is not None:
                    raise StartupRefused(self.refusal)
                return
            try:
                claim_data_dir(self.settings.data_dir, self.settings.sqlalchemy_url)
            except StartupRefused as exc:
                self.refusal = str(exc)
                raise
            ingest.cleanup_orphans(self.settings)
            self.passed = True


def check_at_start(check: DataDirCheck) -> None:
    """The web's first check, before it serves: raises StartupRefused; a database that does
    not answer yet is only logged (the reaper checks again until it does)."""
    try:
        check.make()
    except SQLAlchemyError as exc:
        log.warning("data directory check and clean-up wait for the database, which does "
                    "not answer: %s", str(exc).splitlines()[0])


# Still answered after a refusal: they say why (and /healthz, for monitors, that it is down).
ANSWERED_AFTER_REFUSAL = ("/api/health", "/healthz")


def refuse_work(request: Request) -> None:
    """Every route's dependency: after a refused late check, a 503 that gives the reason, as
    clear as the refused start would have been."""
    check: DataDirCheck = request.app.state.data_dir_check
    if check.refusal is not None and request.url.path not in ANSWERED_AFTER_REFUSAL:
        raise HTTPException(503, f"this web refuses to serve: {check.refusal}")
