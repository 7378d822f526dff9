"""A tenant's fair-share fields in the tenants file: bounded strictly, and signed into the context."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.tenancy.config import Tenant, TenantsFile
from services.common.context import ContextSigner, RequestContext


def test_weight_and_max_kv_share_default_and_parse():
    plain = Tenant(name="acme")
    assert (plain.weight, plain.max_kv_share) == (1.0, None)
    f = TenantsFile.model_validate(
        {"tenants": [{"name": "acme", "weight": 3, "max_kv_share": 0.5}], "keys": []}
    )
    assert (f.tenants[0].weight, f.tenants[0].max_kv_share) == (3.0, 0.5)


@pytest.mark.parametrize(
    "fields",
    [{"weight": 0}, {"weight": 0.001}, {"weight": 101}, {"weight": float("nan")}, {"weight": float("inf")},
     {"max_kv_share": 0}, {"max_kv_share": 1.5}, {"wieght": 2}],
)  # fmt: skip
def test_out_of_range_or_misspelt_fields_are_refused(fields):
    with pytest.raises(ValidationError):
        Tenant(name="acme", **fields)


def test_every_tenant_file_value_signs_and_verifies():
    signer = ContextSigner(b"s" * 32)
    for weight, share in ((0.01, 0.01), (100.0, 1.0), (1.0, None), (2.5, 0.3333333333333333)):
        t = Tenant(name="acme", weight=weight, max_kv_share=share)
        ctx = signer.sign(RequestContext(tenant=t.name, weight=t.weight, max_kv_share=t.max_kv_share))
        assert signer.verify(ctx).weight == weight
