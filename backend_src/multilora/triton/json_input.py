"""JSON text inside a request field (`sampling_parameters`, `messages`), parsed with bounded nesting,
and text that must be Unicode.

Python's json module recurses once per level and raises RecursionError (an internal error, had it
escaped) near the interpreter's recursion limit; a field nested 1,000 deep did exactly that. Here
any nesting deeper than the field could ever need is refused by name, whether json.loads gave up
or not. So are the two other things json.loads lets through or raises on as a plain ValueError:
an integer of more than 4300 digits (Python's int-str conversion limit), and a `\\ud800`-`\\udfff`
escape that is not half of a surrogate pair, which gives a string no tokenizer or UTF-8 encoder
takes (it used to end as an internal error in the tokenizer).
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any

from ..errors import InvalidParameterError

MAX_JSON_DEPTH = 8  # the deepest legitimate field, messages, needs 4 (list, message, parts, part)
MAX_SCHEMA_DEPTH = 64  # response_format: a JSON schema nests two levels per level of the output
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")  # the only way JSON text makes one


def parse_json(field: str, text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The value of JSON `text`, or InvalidParameterError naming `field`."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        too_deep = True
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(field, f"is not valid JSON ({exc})") from None
    except ValueError:  # int("1" * 5001): past sys.get_int_max_str_digits()
        raise InvalidParameterError(field, f"holds an integer of more than {sys.get_int_max_str_digits()} digits; "
                                           "no field takes one that large") from None
    else:
        too_deep = depth(value, max_depth) > max_depth
    if too_deep:
        raise InvalidParameterError(field, f"JSON is nested more than {max_depth} levels deep")
    if _SURROGATE_ESCAPE.search(text):
        for string in _strings(value):
            check_unicode(field, string)
    return value


def check_unicode(field: str, text: str) -> str:
    """`text`, or InvalidParameterError naming `field` when it holds a lone UTF-16 surrogate."""
    found = _SURROGATE.search(text)
    if found is not None:
        raise InvalidParameterError(field, f"contains a lone UTF-16 surrogate ({ascii(found.group())[1:-1]} at "
                                           f"character {found.start()}); text must be valid Unicode (an escape "
                                           "from \\ud800 to \\udfff is only valid as half of a surrogate pair)")
    return text


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


def _strings(value: Any) -> list[str]:
    """Every string in a parsed JSON value (of bounded depth), keys included."""
    strings, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, dict):
            strings.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return strings
