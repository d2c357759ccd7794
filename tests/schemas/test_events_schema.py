"""The JSON Schema producers validate against is the one the msgspec types make, and the
README's example event passes it (and a broken one does not)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from schemas.events import json_schema

ROOT = Path(__file__).resolve().parents[2]


def test_the_checked_in_schema_is_generated_from_the_types():
    on_disk = json.loads((ROOT / "schemas" / "cloudevent.schema.json").read_text())
    assert on_disk == json_schema(), "regenerate: python -m schemas.events > schemas/cloudevent.schema.json"


def readme_example() -> dict[str, object]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## The input event.*?```json\n(.*?)```", text, re.S)
    assert block, "the README shows an example input event under '## The input event'"
    example: dict[str, object] = json.loads(block.group(1))
    return example


def test_the_readme_example_is_a_valid_event():
    jsonschema.validate(readme_example(), json_schema(), format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("broken", [{"subject": ""}, {"specversion": "0.3"}, {"time": "yesterday"}, {"id": "x" * 257}])
def test_a_broken_event_fails_the_schema(broken):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**readme_example(), **broken}, json_schema(), format_checker=jsonschema.FormatChecker())
