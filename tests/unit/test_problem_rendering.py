"""marshmallow's nested error dicts become a flat list naming each field."""

from __future__ import annotations

from handlers.problems import flatten_messages


def test_nested_errors_get_dotted_paths_and_list_indexes() -> None:
    messages = {
        "input": {
            "background": {"generate": {"model_type": ["Must be one of: realistic."]}},
            "enhancements": {1: ["Must be one of: denoise."]},
            "_schema": ["Ask for something."],
        },
        "metadata": {"k": {"value": ["Longer than maximum length 500."]}},
    }
    assert flatten_messages(messages) == [
        {"field": "input.background.generate.model_type", "message": "Must be one of: realistic."},
        {"field": "input.enhancements.1", "message": "Must be one of: denoise."},
        {"field": "input", "message": "Ask for something."},
        {"field": "metadata.k.value", "message": "Longer than maximum length 500."},
    ]
