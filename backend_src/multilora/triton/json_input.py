"""JSON text inside a request field (`sampling_parameters`, `messages`), parsed with bounded nesting.

Python's json module recurses once per level and raises RecursionError (an internal error, had it
escaped) near the interpreter's recursion limit; a field nested 1,000 deep did exactly that. Here
any nesting deeper than the field could ever need is refused by name, whether json.loads gave up
or not.
"""
from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidParameterError

MAX_JSON_DEPTH = 8  # the deepest legitimate field, messages, needs 4 (list, message, parts, part)
MAX_SCHEMA_DEPTH = 64  # response_format: a JSON schema nests two levels per level of the output


def parse_json(field: str, text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The value of JSON `text`, or InvalidParameterError naming `field`."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        too_deep = True
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(field, f"is not valid JSON ({exc})") from None
    else:
        too_deep = depth(value, max_depth) > max_depth
    if too_deep:
        raise InvalidParameterError(field, f"JSON is nested more than {max_depth} levels deep")
    return value


def depth(value: Any, max_depth: int = MAX_JSON_DEPTH) -> int:
    """Levels of lists and objects in a parsed JSON value (a scalar is 0), without recursing."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level + 1)
        if level + 1 > max_depth:
            break  # deep enough to refuse; no need to walk the rest
        stack.extend((child, level + 1) for child in children)
    return deepest
