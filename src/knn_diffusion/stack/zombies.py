"""Flow runs whose process died with its worker (a dead machine or container): Prefect marks them Crashed,
and the pipeline runs a crashed stage run again on a live worker (``flows/remote.py``, ``CRASH_RETRIES``).

A deployment's flow run sends a heartbeat event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds.
A process worker starts each flow run in a session of its own, but a dead machine or container takes
both down, and then nothing reports the run's end: it stays Running for ever. Prefect's answer for a
self-hosted server is an automation (docs: "How to detect and respond to zombie flows"): no heartbeat
and no final state within ``within`` seconds of the last heartbeat, and the run is marked Crashed.
(Proposing Failed instead, for the flow's own ``retries``, does not work: the server turns it into an
in-process retry, which workers leave to the process that is gone.)
"""

from __future__ import annotations

from datetime import timedelta

ZOMBIE_AUTOMATION = "knn-diffusion: crash flow runs whose heartbeats stopped"
HEARTBEAT_SECONDS = 30  # Prefect's minimum; its default is 180
HEARTBEAT_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}  # for the workers' flow runs
_FINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def zombie_automation(within: float = 3 * HEARTBEAT_SECONDS):
    """The automation: a deployment's flow run with no heartbeat and no final state for ``within`` seconds
    after a heartbeat is marked Crashed."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="A flow run whose process died sends no heartbeat and never ends by itself.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in _FINAL)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "deployment"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {within:.0f} s: the "
                                    "process running this flow run died (its worker or machine)")],
    )


def ensure_zombie_automation(api_url: str, within: float = 3 * HEARTBEAT_SECONDS) -> str:
    """Create the automation on the Prefect server at ``api_url`` unless one of that name exists (idempotent);
    returns its id."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if found:
            return str(found[0].id)
        return str(client.create_automation(zombie_automation(within)))
