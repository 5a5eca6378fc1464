"""What one worker process serves with: the typed object every route handler receives.

service.service builds it once per worker (settings, model repository, pipeline, admission,
body limits, balancer, drain) and hands it to the app (:func:`attach`); handlers get it as an
argument instead of reaching into ``app.state``. Only type names are imported here, so the
routes that mention it load no model stack in BentoML's supervising process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.admission import Admission
    from service.balancing import Balancer
    from service.lifecycle import Drain
    from service.pipeline import Pipeline
    from service.repository import ModelRepository
    from service.settings import Settings
    from service.uploads import Limits


@dataclass
class Worker:
    """One worker's serving state; see the module docstring."""

    settings: Settings
    repo: ModelRepository
    pipeline: Pipeline
    admission: Admission
    limits: Limits
    balancer: Balancer | None
    drain: Drain

    def is_ready(self) -> bool:
        """Every model loaded and warmed up, and not shutting down."""
        return self.repo.ready and not self.drain.draining


def attach(app: Any, worker: Worker) -> None:
    """Make ``worker`` the one the routes of ``app`` (a Starlette/FastAPI app) serve with."""
    app.state.worker = worker


def worker_of(app: Any) -> Worker:
    """The worker :func:`attach` gave ``app``."""
    worker: Worker = app.state.worker
    return worker
