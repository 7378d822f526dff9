"""The chart's pools are mesh/pools.py's: each worker group advertises its pool's resource, and each
deployment asks for the resource of its group, in the values and in the rendered RayService."""

from mesh.pools import DEPLOYMENT_GROUP, GROUP_RESOURCE, resource_of
from tests.helm import chartkit


def test_values_name_the_pools_of_mesh_pools():
    values = chartkit.chart_values()
    groups = values["workerGroups"]
    for group, resource in GROUP_RESOURCE.items():
        assert resource in groups[group]["rayResources"], (group, groups[group]["rayResources"])
    mesh = values["mesh"]
    asked = {
        "preprocess": mesh["preprocessDeployment"]["resources"],
        "gateway": mesh["gatewayDeployment"]["resources"],
        "encoder": mesh["modelDefaults"]["encoder"]["resources"],
        "decoder": mesh["modelDefaults"]["decoder"]["resources"],
    }
    assert set(asked) == set(DEPLOYMENT_GROUP)
    for deployment, resources in asked.items():
        assert resources == {resource_of(deployment): 1}, deployment


def test_rendered_groups_advertise_what_rendered_replicas_ask_for(rendered):
    docs = rendered("defaults")
    cluster = chartkit.rayservice(docs)["spec"]["rayClusterConfig"]
    advertised = {g["groupName"]: set(g.get("resources") or {}) for g in cluster["workerGroupSpecs"]}
    assert advertised == {group: {resource} for group, resource in GROUP_RESOURCE.items()}
    apps = {a["name"].split("-")[0]: a for a in chartkit.serve_config(docs)["applications"]}
    for deployment in DEPLOYMENT_GROUP:
        actor = apps[deployment]["args"]["deployment_options"]["ray_actor_options"]
        assert set(actor["resources"]) == {resource_of(deployment)}, deployment
