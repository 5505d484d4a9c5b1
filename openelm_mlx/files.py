"""Files and names that a user or a checkpoint gives, read without trusting them: regular files
only (a FIFO or a device is refused by stat, never opened), sizes capped before reading, strict
JSON, and JSON fields checked against a small table of rules, so that every broken or hostile
file fails with one line naming the file and the field."""

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Callable, Dict, Optional

from .errors import OpenELMError

# A checkpoint's JSON files are kilobytes (the 290-entry index of a 3B model: about 25 KB).
MAX_JSON_BYTES = 16 * 1024**2
# A Hugging Face repo id: owner/name, each part starting with a letter, digit or underscore.
REPO_ID = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")
KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def is_repo_id(text: str) -> bool:
    """Whether `text` has the shape of a Hub repo id (`owner/name`); './x', '~/x', '/x', 'a/b/c'
    and 'x' are paths."""
    return bool(REPO_ID.match(text)) and ".." not in text


def regular_file(path: Path) -> int:
    """The size of `path` once stat (following links, as the Hub cache makes them) says it is a
    regular file: a FIFO would hang a reader, a device never ends, a folder is no file."""
    try:
        mode = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise OpenELMError(f"{path} is a broken link (to {os.readlink(path)}): download the file again") from None
        raise OpenELMError(f"no file at {path}") from None
    except OSError as e:
        raise OpenELMError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode.st_mode):
        kind = next((name for test, name in KINDS if test(mode.st_mode)), "not a regular file")
        raise OpenELMError(f"{path} is {kind}, not a regular file: replace it with the real file")
    return mode.st_size


def open_regular(path: Path):
    """`path` opened for binary reading, after regular_file(); the check is repeated on the open
    file, and O_NONBLOCK keeps the open itself from hanging if a FIFO was swapped in between."""
    regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise OpenELMError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OpenELMError(f"{path} changed into a non-regular file while being opened")
    return os.fdopen(fd, "rb")


def read_bytes(path: Path, max_bytes: int) -> bytes:
    size = regular_file(path)
    if size > max_bytes:
        raise OpenELMError(f"{path} is {size:,} bytes, more than the {max_bytes:,} such a file can hold")
    with open_regular(path) as f:
        return f.read(max_bytes + 1)


def read_text(path: Path) -> str:
    """A text file a user gives (`--text`): a regular file of UTF-8 text, else one line saying
    where the first byte that is not UTF-8 is."""
    regular_file(path)
    with open_regular(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OpenELMError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): save it as UTF-8"
        ) from None


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES, fix: str = "download or write it again"):
    return parse_json(read_bytes(path, max_bytes), path, fix)


def parse_json(data: bytes, source, fix: str = "download or write it again") -> object:
    """JSON as the checkpoint formats define it: UTF-8, no NaN or Infinity (Python's json takes
    them), no number beyond float range, no duplicate keys, nesting within Python's stack. `fix`:
    what the error tells the user to do."""

    def fail(why):
        raise OpenELMError(f"{source} {why}: {fix}") from None

    if not data.strip():
        fail("is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        fail(f"is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique_keys)
    except RecursionError:
        fail("nests JSON too deeply")
    except json.JSONDecodeError as e:
        fail(f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except ValueError as e:  # the hooks below, or an integer of more than 4300 digits
        fail(f"is not valid JSON ({e})")


def json_text(value) -> str:
    """`value` as strict JSON for the commands' --json output: an inf or NaN (a diverged loss, a
    non-finite logit) is null, since Python's NaN and Infinity are not JSON that other readers parse.
    Paths are strings."""

    def strict(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): strict(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [strict(x) for x in v]
        return str(v) if isinstance(v, Path) else v

    return json.dumps(strict(value), indent=2, allow_nan=False)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of a number")
    return value


def _unique_keys(pairs) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key '{key}' appears twice")
        out[key] = value
    return out


# Rules for JSON fields: each takes a value and says what is wrong with it (and what it got), or None.
Rule = Callable[[object], Optional[str]]


def rule(ok: Callable[[object], bool], needs: str) -> Rule:
    return lambda v: None if ok(v) else f"{needs}, got {shown(v)}"


def integer(low: int, high: int, why: str = "") -> Rule:
    # type(), not isinstance: bool is an int subclass, and JSON's true is no count
    return rule(lambda v: type(v) is int and low <= v <= high, f"must be an integer from {low} to {high:,}{why}")


def number(low: float, high: float) -> Rule:
    """A number above `low` and at most `high` (parse_json has refused NaN and infinities)."""
    return rule(
        lambda v: type(v) in (int, float) and low < v <= high, f"must be a number above {low} and at most {high:g}"
    )


def each(item: Rule) -> Rule:
    """A list whose every item follows `item`."""

    def check(v):
        if not isinstance(v, list):
            return f"must be a list, got {shown(v)}"
        return next((f"item {i} {item(x)}" for i, x in enumerate(v) if item(x)), None)

    return check


def one_of(*choices) -> Rule:
    needs = "must be one of " + ", ".join(json.dumps(c) for c in choices)
    return rule(lambda v: any(type(v) is type(c) and v == c for c in choices), needs)


boolean = rule(lambda v: type(v) is bool, "must be true or false")
text = rule(lambda v: isinstance(v, str), "must be a string")
obj = rule(lambda v: isinstance(v, dict), "must be an object")


def optional(inner: Rule) -> Rule:
    return lambda v: None if v is None else inner(v)


def field_problem(values: dict, rules: Dict[str, Rule], prefix: str = "") -> Optional[str]:
    """The first field of `values` that breaks its rule, described with the value it holds."""
    for name, check in rules.items():
        problem = check(values[name]) if name in values else None
        if problem:
            return f"field '{prefix}{name}' {problem}"
    return None


def shown(value) -> str:
    """A JSON value as an error shows it: short, with its JSON type."""
    kinds = {bool: "a boolean", str: "a string", list: "a list", dict: "an object", float: "a number"}
    body = json.dumps(value)
    body = body if len(body) <= 40 else body[:37] + "..."
    return f"{body} ({kinds[type(value)]})" if type(value) in kinds else body
