"""Property-based API tests from the OpenAPI document: no 5xx, and every response matches the document."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from pictor.serve.settings import Limits

KEY = "schema-test-key"


@pytest.fixture(scope="module")
def api_schema(live_server: Any) -> Any:
    # Small limits keep every valid generation request cheap; a long queue keeps 429s out of the way.
    live = live_server(
        api_key=KEY, queue_size=1000, limits=Limits(max_pixels=32 * 32, max_steps=4, max_images=2)
    )
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    schema.config.update(headers={"Authorization": f"Bearer {KEY}"})
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_matches_its_openapi_document(case: Any) -> None:
    # Not checked: "positive data acceptance". The document cannot express every rule (width*height under
    # the pixel limit, sizes a multiple of the latent patch), so some schema-valid requests are a correct 400.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
