"""Reading spec files: loading, ``--set`` overrides, error messages that name the file and the key,
hashing, and TOML output (the schema itself is :mod:`recsys.spec.schema`).

Example:
    >>> spec = load_spec("specs/quickstart.toml", overrides=["train.batch_size=4096"])
    >>> spec.train.batch_size, len(spec_hash(spec))
    (4096, 16)
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from recsys.errors import RunError, SpecError
from recsys.models.archs import ARCHS, DEFAULT_ARCH
from recsys.spec.schema import DataSource, Spec
from recsys.validation import KeyedError


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> Spec:
    """Read, override and validate a spec file; raise SpecError naming file and key on any problem."""
    path = Path(path)
    raw = read_raw_spec(path)
    for item in overrides:
        apply_override(raw, item, str(path))
    spec = validate_spec(raw, str(path))
    check_paths(spec, str(path))
    return spec


def load_run_spec(run_dir: str | Path) -> Spec:
    """The resolved spec a run directory was trained with (its ``spec.toml``); a RunError if the
    directory holds none.

    Example:
        >>> load_run_spec("runs/quickstart-demo").model.arch
        'dcn'
    """
    path = Path(run_dir) / "spec.toml"
    if not path.is_file():
        raise RunError(str(run_dir), "not a run directory (spec.toml is missing)")
    return validate_spec(read_raw_spec(path), str(path))


def read_raw_spec(path: str | Path) -> dict[str, Any]:
    """A spec file's TOML as a dict, not yet validated (SpecError if it is not TOML text)."""
    path = Path(path)
    try:
        return tomllib.loads(read_spec_text(path))
    except tomllib.TOMLDecodeError as e:
        raise SpecError(str(path), [f"not valid TOML: {e}"]) from None


def read_spec_text(path: Path) -> str:
    """The text of a spec file, or a one-problem SpecError saying why the file is not one (missing,
    a directory, unreadable, binary, or text in another encoding than UTF-8).

    tomllib needs str and ``Path.read_text`` decodes with the locale's codec, so a binary or
    UTF-16 file would otherwise fail with a UnicodeDecodeError traceback or a misleading TOML
    syntax error on line 1.
    """
    file = str(path)
    if path.is_dir():
        raise SpecError(file, ["is a directory, not a spec file"])
    if not path.exists():  # (a dangling symlink included)
        raise SpecError(file, ["spec file not found"])
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(file, [f"cannot read: {(e.strerror or str(e)).lower()}"]) from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Windows editors): harmless
        data = data[3:]
    problem = _not_utf8_text(data)
    if problem:
        raise SpecError(file, [problem])
    if not data.strip():
        raise SpecError(file, ["empty file, not a spec"])
    return data.decode("utf-8")


# the byte order marks of the encodings a spec is most often saved in by mistake (UTF-32 first:
# its little-endian mark starts with UTF-16's)
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
         (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def _not_utf8_text(data: bytes) -> str | None:
    """Why ``data`` is not UTF-8 text (None when it is)."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return f"not UTF-8 text (looks like {encoding}); save it as UTF-8"
    head = data[:4096]
    # UTF-16 without a mark: ASCII text has a NUL in every other byte, all on one side
    evens, odds = head[0::2], head[1::2]
    for nuls, others in ((odds, evens), (evens, odds)):
        if len(head) >= 2 and nuls.count(0) >= 0.3 * len(nuls) and others.count(0) == 0:
            return "not UTF-8 text (looks like UTF-16); save it as UTF-8"
    # control characters other than tab, newlines and form feed do not occur in text
    controls = sum(1 for b in head if (b < 0x20 and b not in b"\t\n\r\f") or b == 0x7f)
    if controls > max(2, len(head) // 50):
        return "binary file, not a TOML spec"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte 0x{data[e.start]:02x} at {_position(data, e.start)}); " \
               "save it as UTF-8"
    nul = data.find(b"\0")
    if nul >= 0:
        return f"binary file, not a TOML spec (NUL byte at {_position(data, nul)})"
    return None


def _position(data: bytes, offset: int) -> str:
    """``line L, column C`` (1-based, columns in bytes) of a byte offset."""
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"line {line}, column {column}"


def check_paths(spec: Spec, file: str = "<spec>") -> None:
    """Files a spec needs before anything runs: a prepared dataset, or the raw input to prepare.
    (Synthetic data is generated into data.path, which need not exist yet.)"""
    problems = []
    if spec.data.source == DataSource.PARQUET and not (Path(spec.data.path) / "dataset.json"
                                                       ).is_file():
        problems.append(f"data.path: no prepared dataset at '{spec.data.path}' (dataset.json "
                        "not found); run `recsys data prepare` or `recsys data synth` first")
    if spec.data.prepare is not None and not Path(spec.data.prepare.input).exists():
        problems.append(f"data.prepare.input: raw data not found at '{spec.data.prepare.input}'")
    if problems:
        raise SpecError(file, problems)


def validate_spec(raw: Mapping[str, Any], file: str = "<spec>") -> Spec:
    try:
        return Spec.model_validate_json(json.dumps(raw))
    except ValidationError as e:
        raise SpecError(file, [_describe(err, raw) for err in e.errors()]) from None


def only_arch_sections(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` without the model sections that belong to other archs than ``model.arch`` only
    (for variants that switch the arch of a base spec; any other unknown key stays, to be
    reported).

    Example:
        >>> only_arch_sections({"model": {"arch": "mlp", "dcn": {"num_layers": 2}}})
        {'model': {'arch': 'mlp'}}
    """
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("arch", DEFAULT_ARCH) not in ARCHS:
        return raw
    own = ARCHS[model.get("arch", DEFAULT_ARCH)].model.model_fields
    sections = {k for a in ARCHS.values() for k in a.model.model_fields}
    kept = {k: v for k, v in model.items() if k in own or k not in sections}
    return {**raw, "model": kept}


def apply_override(raw: dict[str, Any], item: str, file: str = "<spec>") -> None:
    """Apply ``a.b.c=value`` to the raw TOML dict. The value is read as a TOML literal
    (``4096``, ``true``, ``[1, 2]``, ``"x"``); anything that is not one is taken as a string."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(file, [f"--set '{item}': expected KEY.PATH=VALUE"])
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _step(node, part, ".".join(parts[: i + 1]), item, file)
    last = parts[-1]
    if isinstance(node, list):
        raise SpecError(file, [f"--set '{item}': '{'.'.join(parts[:-1])}' is a list; "
                               "name an entry and a key in it"])
    if not isinstance(node, dict):
        raise SpecError(file, [f"--set '{item}': '{'.'.join(parts[:-1])}' is a value, "
                               "not a section"])
    node[last] = value


def _step(node: Any, part: str, where: str, item: str, file: str) -> Any:
    if isinstance(node, list):
        for entry in node:
            if isinstance(entry, dict) and entry.get("name") == part:
                return entry
        if part.isdigit() and int(part) < len(node):
            return node[int(part)]
        names = [e.get("name") for e in node if isinstance(e, dict)]
        raise SpecError(file, [f"--set '{item}': no entry '{part}' in {where.rsplit('.', 1)[0]} "
                               f"(names: {names})"])
    if not isinstance(node, dict):
        raise SpecError(file, [f"--set '{item}': '{where}' is a value, not a section"])
    return node.setdefault(part, {})


def _describe(err: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    loc = list(err["loc"])
    ctx = err.get("ctx") or {}
    arch = None
    if len(loc) >= 2 and loc[0] == "model" and loc[1] in ARCHS:  # the union's tag, not a key
        arch = str(loc[1])
        del loc[1]
    key = _key_path(loc, raw)
    if isinstance(ctx.get("error"), KeyedError):  # a check that knows its key below loc
        inner = ctx["error"]
        return f"{key + '.' if key else ''}{inner.key}: {inner}"

    if err["type"] == "union_tag_invalid":
        return f"{key}.arch: unknown arch {ctx.get('tag')!r}; expected one of: " \
               f"{', '.join(sorted(ARCHS))}"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], arch)
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        if arch is not None and len(loc) == 2:
            owners = [a for a, d in sorted(ARCHS.items()) if loc[1] in d.model.model_fields]
            if owners:
                return f"{key}: unknown key for arch '{arch}' (a [{key}] section belongs to " \
                       f"arch {', '.join(owners)}){hint}"
            hint = f" for arch '{arch}'{hint}"
        return f"{key}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
        return f"{key or '(top level)'}: {msg}"
    return f"{key}: {msg[0].lower() + msg[1:]}, got {err.get('input')!r}"


def _key_path(loc: Sequence[Any], raw: Mapping[str, Any]) -> str:
    """('features', 'fields', 2, 'oov') -> 'features.fields[user_id].oov' (entries by name)."""
    out: list[str] = []
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and part < len(node) \
                and isinstance(node[part], dict) else None
            out[-1] += f"[{name}]" if name else f"[{part}]"
        else:
            out.append(str(part))
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(out)


def _allowed_keys(loc: Sequence[Any], arch: str | None = None) -> list[str]:
    model: Any = Spec
    for i, part in enumerate(loc):
        if isinstance(part, int):
            continue
        if i == 0 and part == "model" and arch is not None:
            model = ARCHS[arch].model
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def spec_hash(spec: Spec) -> str:
    """A stable 16-hex-digit hash of the resolved spec (defaults included, key order ignored)."""
    canon = json.dumps(spec_to_dict(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def dump_toml(spec: Spec) -> str:
    """The resolved spec as TOML (what a run directory stores)."""
    return _to_toml(spec_to_dict(spec))


def _to_toml(d: Mapping[str, Any], prefix: str = "") -> str:
    # TOML has no null: a None is left out, which reads back as the field's default. Every field
    # that may be None therefore has None as its default (test_spec_show_round_trips checks).
    scalars, tables, arrays = [], [], []
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            scalars.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(scalars) + ("\n" if scalars else "")
    for k, v in tables:
        name = f"{prefix}{k}"
        out += f"\n[{name}]\n" + _to_toml(v, name + ".")
    for k, items in arrays:
        name = f"{prefix}{k}"
        for item in items:
            out += f"\n[[{name}]]\n" + _to_toml(item, name + ".")
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
