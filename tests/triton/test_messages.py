"""The `messages` field: OpenAI's chat shape in, template-ready {"role", "content"} dicts out."""
from __future__ import annotations

import json

import pytest

from multilora.errors import InvalidParameterError
from multilora.triton.json_input import depth
from multilora.triton.messages import parse_messages


def test_text_parts_are_joined_names_kept_and_developer_is_system():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    chat = [{"role": "developer", "content": "Rules"}, {"role": "user", "name": "ana", "content": parts},
            {"role": "assistant", "content": ""}]
    assert parse_messages(json.dumps(chat)) == [{"role": "system", "content": "Rules"},
                                                {"role": "user", "content": "one\ntwo", "name": "ana"},
                                                {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("chat, needle", [
    ("not json", "is not valid JSON"),
    ("[]", 'must be a non-empty JSON list of {"role": ..., "content": ...} objects'),
    ('{"role": "user", "content": "hi"}', "must be a non-empty JSON list"),
    ('["hi"]', 'message 0 must be an object with "role" and "content", got str'),
    ('[{"role": "tool", "content": "x"}]', "message 0 has role 'tool'; allowed: system, developer, user, assistant"),
    ('[{"role": "user", "content": "x"}, {"content": "y"}]', "message 1 has role None; allowed: system"),
    ('[{"role": "user", "content": "x", "tool_calls": []}]',
     "message 0 has unknown key(s) ['tool_calls']; allowed: role, content, name"),
    ('[{"role": "user", "content": null}]', 'message 0: "content" must be a string or a list of text parts, got None'),
    ('[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]',
     'content parts must be {"type": "text", "text": "..."} (only text is supported)'),
    ('[{"role": "user", "content": "x", "name": 3}]', 'message 0: "name" must be a string'),
    (json.dumps([{"role": "user", "content": "x"}] * 1025), "at most 1024 messages, got 1025"),
    ('[{"role": "user", "content": [[[[[[[["x"]]]]]]]]}]', "JSON is nested more than 8 levels deep"),
])
def test_bad_chats_name_the_field_the_message_and_what_is_allowed(chat, needle):
    with pytest.raises(InvalidParameterError) as err:
        parse_messages(chat)
    assert err.value.field == "messages" and needle in str(err.value)


def test_depth_counts_containers_without_recursing():
    assert depth("x") == 0 and depth([]) == 1 and depth({"a": [1, {"b": []}]}) == 4
    value: list = []
    for _ in range(100_000):  # far beyond the interpreter's recursion limit
        value = [value]
    assert depth(value) == 9  # stops counting once past the limit
