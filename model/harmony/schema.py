"""Function-tool parameters: JSON schema -> the TypeScript-like text that harmony puts in
the developer message, as openai-harmony writes it (its quirks included: nested objects
indent their fields but not their closing brace, property titles become two comment
lines, `integer` reads `number`)."""

from __future__ import annotations

import json
import math
from typing import Any

JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class SchemaError(ValueError):
    """A tool's parameter schema is not a well-formed JSON schema."""


def check_schema(schema: Any, path: str = "") -> None:
    """Reject what cannot be a JSON schema, naming the path inside the schema
    (`properties.loc.type: 'strng' is not a JSON-schema type`)."""

    def fail(key: str, problem: str) -> SchemaError:
        where = ".".join(p for p in (path, key) if p)
        return SchemaError(f"{where}: {problem}" if where else problem)

    if not isinstance(schema, dict):
        raise fail("", f"a schema is a JSON object, got {json.dumps(schema)[:60]}")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if kind is not None and (not kinds or not all(isinstance(k, str) for k in kinds)):
        raise fail("type", f"expected a type name or a list of them, got {kind!r}")
    for k in kinds:
        if k not in JSON_TYPES:
            raise fail("type", f"{k!r} is not a JSON-schema type ({', '.join(JSON_TYPES)})")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise fail("properties", "expected an object of property schemas")
        for name, sub in props.items():
            check_schema(sub, ".".join(p for p in (path, "properties", name) if p))
    required = schema.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(r, str) for r in required)
    ):
        raise fail("required", "expected a list of property names")
    items = schema.get("items")
    if items is not None and not isinstance(items, bool):
        check_schema(items, ".".join(p for p in (path, "items") if p))
    enum = schema.get("enum")
    if enum is not None and not (isinstance(enum, list) and enum):
        raise fail("enum", "expected a non-empty list of values")
    for key in ("oneOf", "anyOf", "allOf"):
        variants = schema.get(key)
        if variants is None:
            continue
        if not isinstance(variants, list) or not variants:
            raise fail(key, "expected a non-empty list of schemas")
        for i, sub in enumerate(variants):
            check_schema(sub, f"{'.'.join(p for p in (path, key) if p)}[{i}]")
    for key in ("description", "title"):
        if key in schema and not isinstance(schema[key], str):
            raise fail(key, "expected a string")


def to_typescript(schema: Any, indent: str = "") -> str:
    if not isinstance(schema, dict):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | " + _nullable(variant, to_typescript(variant, indent + "   "))
            comments = []
            if isinstance(_get(variant, "description"), str):
                comments.append(variant["description"])
            if _has(variant, "default"):
                default = variant["default"]
                if isinstance(default, str) and not _is_enum(variant):
                    comments.append(f'default: "{default}"')
                else:
                    comments.append(f"default: {json_text(default)}")
            if comments:
                out += " // " + " ".join(comments)
        return out

    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        if names:
            return " | ".join(names)
    if not isinstance(kind, str):
        return "any"
    if kind == "object":
        return _object(schema, indent)
    if kind == "string":
        enum = schema.get("enum")
        values = [f'"{v}"' for v in enum if isinstance(v, str)] if isinstance(enum, list) else []
        return " | ".join(values) if values else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        return f"{to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _object(schema: dict[str, Any], indent: str) -> str:
    out = ""
    if isinstance(schema.get("description"), str):
        out += f"{indent}// {schema['description']}\n"
    out += "{\n"
    props = schema.get("properties")
    if isinstance(props, dict):
        required = schema.get("required")
        required = (
            {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
        )
        for key, val in props.items():
            mark = "" if key in required else "?"
            if isinstance(_get(val, "title"), str):
                out += f"{indent}// {val['title']}\n{indent}//\n"
            if not _has(val, "oneOf") and isinstance(_get(val, "description"), str):
                out += f"{indent}// {val['description']}\n"
            examples = _get(val, "examples")
            if isinstance(examples, list) and examples:
                out += f"{indent}// Examples:\n"
                out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
            one_of = _get(val, "oneOf")
            if isinstance(one_of, list):
                out += _one_of_property(key, mark, val, one_of, indent)
                continue
            out += f"{indent}{key}{mark}: "
            out += _nullable(val, to_typescript(val, indent + "    ")) + ","
            if not _has(val, "oneOf") and _has(val, "default"):
                out += " // " + _default_comment(val)
            out += "\n"
    return out + f"{indent}}}"


def _one_of_property(
    key: str, mark: str, prop: dict[str, Any], variants: list[Any], indent: str
) -> str:
    out = ""
    desc = prop.get("description") if isinstance(prop.get("description"), str) else None
    first_desc = _get(variants[0], "description") if variants else None
    above = False
    if desc is not None and first_desc != desc:
        out += f"{indent}// {desc}\n"
        above = True
    if "default" in prop:
        out += f"{indent}// {_default_comment(prop)}\n"
    out += f"{indent}{key}{mark}:\n"
    for i, variant in enumerate(variants):
        out += f"{indent} | " + _nullable(variant, to_typescript(variant, indent + "   "))
        comments = []
        variant_desc = _get(variant, "description")
        if not (i == 0 and above) and isinstance(variant_desc, str) and variant_desc != desc:
            comments.append(variant_desc)
        if _has(variant, "default"):
            comments.append(_default_comment(variant))
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    return out + f"{indent},\n"


def _default_comment(schema: dict[str, Any]) -> str:
    default = schema["default"]
    if isinstance(default, str):
        return f'default: "{default}"' if not _is_enum(schema) else f"default: {default}"
    return f"default: {json_text(default)}"


def _nullable(schema: Any, text: str) -> str:
    if _get(schema, "nullable") is True and "null" not in text:
        return f"{text} | null"
    return text


def _is_enum(schema: Any) -> bool:
    enum = _get(schema, "enum")
    return isinstance(enum, list) and bool(enum)


def _get(schema: Any, key: str) -> Any:
    return schema.get(key) if isinstance(schema, dict) else None


def _has(schema: Any, key: str) -> bool:
    return isinstance(schema, dict) and key in schema


def json_text(value: Any) -> str:
    """Compact JSON as Rust's serde_json prints it (no spaces, non-ASCII kept, floats in
    the shortest form that reads back)."""
    if isinstance(value, float) and math.isfinite(value):
        return _float_text(value)
    if isinstance(value, list):
        return "[" + ",".join(json_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json_text(str(k))}:{json_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _float_text(value: float) -> str:
    # ryu's layout: digits d1..dn with the decimal point after position kk.
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    mantissa, _, exp = repr(abs(value)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0") or "0"
    kk = len(whole.lstrip("0")) + int(exp or 0)
    if whole.strip("0") == "":  # 0.000ddd
        kk = -(len(frac) - len(frac.lstrip("0"))) + int(exp or 0)
    digits = digits.rstrip("0") or "0"
    n = len(digits)
    if digits == "0":
        return sign + "0.0"
    if n <= kk <= 16:
        return sign + digits + "0" * (kk - n) + ".0"
    if 0 < kk <= 16:
        return sign + digits[:kk] + "." + digits[kk:]
    if -5 < kk <= 0:
        return sign + "0." + "0" * -kk + digits
    head = digits[0] + ("." + digits[1:] if n > 1 else "")
    return f"{sign}{head}e{kk - 1}"
