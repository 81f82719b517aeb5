"""The constraints AWS checks on the server that botocore's client-side validator leaves out.

botocore's `ParamValidator` checks types, required members and minimums; AWS also refuses a string
longer than its `max` or not matching its `pattern`, a list or map with more than `max` entries, a
number above its `max` and a value outside its `enum`, all written in the same service model. This
module reads them there, so that the stand-in refuses what AWS refuses, in AWS's words:
"1 validation error detected: Value 'x' at 'trainingJobName' failed to satisfy constraint: ...".
"""

from __future__ import annotations

import functools
import re

from botocore.model import Shape

# Java's character classes in the models' patterns (the tags' keys and values, ARNs), as near as
# Python's re comes: letters, separators and numbers as word characters and white space (which lets
# a tab or a line end through, as Java's \p{Z} would not); POSIX alphanumerics, ASCII in Java too.
JAVA_CLASSES = {r"\p{L}\p{Z}\p{N}": r"\w\s", r"\p{Alnum}": "a-zA-Z0-9"}


@functools.lru_cache(maxsize=512)
def _pattern(source: str) -> re.Pattern | None:
    """The service model's (Java) pattern, whole-string; None where Python's re cannot read it."""
    translated = source
    for java, python in JAVA_CLASSES.items():
        translated = translated.replace(java, python)
    try:
        return re.compile(translated)  # Java's defaults, as Python's: `.` stops at a line end
    except re.error:
        return None


def _member_path(path: str, name: str) -> str:
    # AWS names a member by its wire name with a lower-case first letter, nested with dots.
    name = name[:1].lower() + name[1:]
    return f"{path}.{name}" if path else name


def _shown(value: object) -> str:
    text = str(value)
    return text if len(text) <= 100 else text[:97] + "..."


def violations(value: object, shape: Shape, path: str = "") -> list[str]:
    """Every constraint of `shape` (and of its members) that `value` breaks, as AWS words each."""
    found: list[str] = []
    meta = shape.metadata
    where = f"at '{path}'" if path else ""
    if shape.type_name == "structure" and isinstance(value, dict):
        for name, member in shape.members.items():
            if name in value:
                found += violations(value[name], member, _member_path(path, name))
    elif shape.type_name == "list" and isinstance(value, list):
        if "max" in meta and len(value) > meta["max"]:
            found.append(
                f"Value '{_shown(value)}' {where} failed to satisfy constraint: Member must have length "
                f"less than or equal to {meta['max']}"
            )
        for index, item in enumerate(value, start=1):
            found += violations(item, shape.member, f"{path}.{index}.member")
    elif shape.type_name == "map" and isinstance(value, dict):
        if "max" in meta and len(value) > meta["max"]:
            found.append(
                f"Value '{_shown(value)}' {where} failed to satisfy constraint: Map value must have "
                f"length less than or equal to {meta['max']}"
            )
        for key, item in value.items():
            found += violations(key, shape.key, f"{path}.key")
            found += violations(item, shape.value, f"{path}.{key}")
    elif shape.type_name == "string" and isinstance(value, str):
        if "max" in meta and len(value) > meta["max"]:
            found.append(
                f"Value '{_shown(value)}' {where} failed to satisfy constraint: Member must have length "
                f"less than or equal to {meta['max']}"
            )
        pattern = _pattern(meta["pattern"]) if "pattern" in meta else None
        if pattern is not None and not pattern.fullmatch(value):
            found.append(
                f"Value '{_shown(value)}' {where} failed to satisfy constraint: Member must satisfy "
                f"regular expression pattern: {meta['pattern']}"
            )
        if shape.enum and value not in shape.enum:
            found.append(
                f"Value '{_shown(value)}' {where} failed to satisfy constraint: Member must satisfy enum "
                f"value set: [{', '.join(shape.enum)}]"
            )
    elif (
        shape.type_name in ("integer", "long", "float", "double")
        and isinstance(value, int | float)
        and "max" in meta
        and value > meta["max"]
    ):
        found.append(
            f"Value '{value}' {where} failed to satisfy constraint: Member must have value less than "
            f"or equal to {meta['max']}"
        )
    return found


def report(params: dict, shape: Shape) -> str | None:
    """AWS's ValidationException message for `params`, or None when they meet every constraint."""
    found = violations(params, shape)
    if not found:
        return None
    count = f"{len(found)} validation error{'s' if len(found) > 1 else ''} detected"
    return f"{count}: " + "; ".join(found)
