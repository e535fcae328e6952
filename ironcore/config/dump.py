"""Write a Config back out: as a plain dict (for checkpoints and loggers) or as commented YAML."""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass
from typing import Any, Optional

import yaml

from ironcore.config.loader import EXTRA_RESOLVERS
from ironcore.config.schema import Config


class _Dumper(yaml.SafeDumper):
    """Quotes strings such as ``'1e-5'`` or ``'None'`` that the config loader would read as non-strings."""


for _tag, _regexp, _first in EXTRA_RESOLVERS:
    _Dumper.add_implicit_resolver(_tag, _regexp, _first)


def to_dict(cfg: Config) -> dict:
    """All groups as plain, YAML-able values (nested dicts, lists, scalars)."""
    return asdict(cfg)


def yaml_value(value: Any) -> str:
    """One value as inline YAML (flow style for lists and mappings), e.g. ``1.0e-05``, ``[0.9, 0.1]``."""
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    return text[:-3].strip() if text.endswith("\n...") else text


def _lines(obj: Any, prefix: str, indent: str, provenance: Optional[dict[str, str]]) -> list[tuple[str, str]]:
    rows = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}"
        if is_dataclass(value):
            rows.append((f"{indent}{f.name}:", ""))
            rows.extend(_lines(value, key, indent + "  ", provenance))
        else:
            rows.append((f"{indent}{f.name}: {yaml_value(value)}", provenance.get(key, "") if provenance else ""))
    return rows


def to_yaml(cfg: Config, provenance: Optional[dict[str, str]] = None) -> str:
    """The config as YAML that ``load_config`` reads back to the same values; with ``provenance``,
    each key carries a ``# source`` comment (file:line, override, default or derived)."""
    out = []
    for group in fields(cfg):
        rows = _lines(getattr(cfg, group.name), group.name, "  ", provenance)
        width = min(max(len(text) for text, _ in rows), 40)  # a long value must not push every comment
        out.append(f"{group.name}:")
        out.extend(f"{text.ljust(width)}  # {source}" if source else text for text, source in rows)
    return "\n".join(out) + "\n"
