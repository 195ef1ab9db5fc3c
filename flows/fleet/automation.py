"""The zombie-run automation: Prefect marks a shard run Crashed when it has been silent for ``ZOMBIE_SECONDS``.

Silence is counted from the run's ``Running`` event (emitted by the server, so that a machine lost before its run's
first heartbeat reached the server is caught too) or its last heartbeat (sent by the flow-run process every
``HEARTBEAT_SECONDS``), whichever came last (Prefect's documented zombie-run detection). Only runs tagged
``SHARD_TAG`` are watched: other flow runs on the same server (the coordinator's manifest runs, a team's other
flows) send heartbeats every 180 s by default and must not be marked Crashed by a 90 s rule. ``harmonize deploy``
creates it (``ensure_zombie_automation``); the fan-out checks it is in place (``zombie_automation_problem``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from .settings import AUTOMATION_NAME, SHARD_TAG, ZOMBIE_SECONDS


def zombie_trigger(seconds: float = ZOMBIE_SECONDS) -> Any:
    """Return the automation's trigger: a shard run silent for ``seconds`` since ``Running`` or its last heartbeat."""
    return EventTrigger(
        after={"prefect.flow-run.heartbeat", "prefect.flow-run.Running"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                             "prefect.resource.id": f"prefect.tag.{SHARD_TAG}"}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=timedelta(seconds=seconds))


def ensure_zombie_automation(seconds: float = ZOMBIE_SECONDS) -> Any:
    """Create or update the automation marking shard runs Crashed after ``seconds`` of silence; return it."""
    trigger = zombie_trigger(seconds)
    action = ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"no heartbeat for {seconds:.0f} s: the worker or its machine is gone")
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:
        return Automation(name=AUTOMATION_NAME, trigger=trigger, actions=[action]).create()
    existing.trigger, existing.actions, existing.enabled = trigger, [action], True
    existing.update()
    return existing


def zombie_automation_problem() -> str | None:
    """Return why a lost worker's shard would go unnoticed on this server (automation missing, disabled or out of
    date), or ``None`` when the automation ``harmonize deploy`` creates is in place."""
    try:
        automation = Automation.read(name=AUTOMATION_NAME)
    except ValueError:
        return f"the automation {AUTOMATION_NAME!r} is missing"
    if not automation.enabled:
        return f"the automation {AUTOMATION_NAME!r} is disabled"
    want, have = zombie_trigger(), automation.trigger
    if (getattr(have, "after", None), getattr(have, "expect", None), getattr(have, "match_related", None)) != (
            want.after, want.expect, want.match_related):
        return f"the automation {AUTOMATION_NAME!r} is out of date"
    return None
