from __future__ import annotations

from kasched.service.apidoc import markdown
from kasched.service.openapi import schema
from kasched.service.routes import ROUTES
from tests.conftest import ROOT


def test_api_reference_is_current() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == markdown(schema(ROUTES)), (
        "docs/api.md is stale: python -m kasched.service.apidoc > docs/api.md"
    )
