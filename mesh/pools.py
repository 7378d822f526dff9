"""The resource pools of the mesh: which Ray resource each pool's nodes advertise, and which pool each
deployment asks for. The one source of these names: the Helm chart's worker groups advertise them
(``workerGroups.<group>.rayResources``) and its deployments ask for them (``mesh.*.resources``), and
``tests/helm`` checks the chart against this module; the multi-node test cluster starts its nodes from
the chart's values.

A pool is a Ray custom resource rather than a node label because Serve places replicas by resources:
a replica asking for ``vision_pool: 1`` can only run on a node that advertises it.
"""

from __future__ import annotations

# Worker group (the chart's workerGroups.<group>) -> the custom resource its nodes advertise.
GROUP_RESOURCE = {
    "cpu": "cpu_pool",  # gateway, preprocess
    "encoder": "vision_pool",  # vision encoders
    "decoder": "decoder_pool",  # language decoders
}

# Deployment -> the worker group whose resource it asks for.
DEPLOYMENT_GROUP = {
    "gateway": "cpu",
    "preprocess": "cpu",
    "encoder": "encoder",
    "decoder": "decoder",
}


def resource_of(deployment: str) -> str:
    """The custom resource a deployment's replicas ask for (one unit each)."""
    return GROUP_RESOURCE[DEPLOYMENT_GROUP[deployment]]


def pool_overrides(model_index: int = 0) -> list[str]:
    """``--set`` overrides of ``internvl-mesh config render`` that place every deployment of one model in
    its pool, as the chart's values do."""
    m = f"models.{model_index}"
    return [
        f"preprocess_deployment.resources.{resource_of('preprocess')}=1",
        f"gateway_deployment.resources.{resource_of('gateway')}=1",
        f"{m}.encoder.resources.{resource_of('encoder')}=1",
        f"{m}.decoder.resources.{resource_of('decoder')}=1",
    ]
