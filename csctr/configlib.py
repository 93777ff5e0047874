"""Typed config args, big_vision style: `--config=configs/x.py:key=value,...`.

A config file's `get_config(arg)` builds its ConfigDict and then applies the
arg string last (`apply_arg`), so an arg always wins over what the file sets
and every field has one default: the value the config files give it. Values
are parsed by the type of that default, strictly:

  bool     true | false | 1 | 0 (any case); anything else is an error, not
           False (`use_image=flase` must not silently train without images)
  int      int('8'); float: float('1e-3'); str: as written
  tuple    `(32,32,64)` or `[32,32,64]`, elements typed like the default's
           elements; a bare `16` is the 1-tuple (16,). Commas inside
           brackets do not separate args: `mlp_dims=(128,64),head=dcnv2`.

Keys are dotted paths of any leaf (`data.image_size=64`); the leaves at the
top level and in the `model` section also go by their bare name
(`attention=cbam` is `model.attention=cbam`). An unknown key is an error
that lists the valid ones.

`parse_arg(arg, **defaults)` is the same parser for a hand-written spec, as in
big_vision: it returns a ConfigDict with every key of `defaults`, replaced by
the arg's value where given.
"""

from __future__ import annotations

from typing import Any, Iterator

import ml_collections

# Sections whose fields are also reachable by their bare name.
SHORT_SECTIONS = ("model",)
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def split_arg(arg: str | None) -> Iterator[tuple[str, str]]:
  """Yields (key, raw value) of 'k=v,k=v', commas inside brackets kept."""
  depth, start, items = 0, 0, []
  text = arg or ""
  for i, ch in enumerate(text):
    if ch in "([":
      depth += 1
    elif ch in ")]":
      depth -= 1
    if depth < 0:
      raise ValueError(f"config arg {text!r}: unbalanced {ch!r}")
    if ch == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"config arg {text!r}: unbalanced brackets")
  items.append(text[start:])
  for item in items:
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    # A bare name is a boolean switch, as in big_vision (`:use_image`).
    yield key.strip(), (value.strip() if sep else "true")


def parse_value(name: str, text: str, default: Any) -> Any:
  """`text` as the type of `default`; ValueError naming `name` otherwise."""
  if isinstance(default, (tuple, list)):
    return _parse_tuple(name, text, default)
  try:
    if isinstance(default, bool):
      return _BOOLS[text.lower()]
    if isinstance(default, (int, float, str)):
      return type(default)(text)
  except (KeyError, ValueError):
    kind = ("true/false/1/0" if isinstance(default, bool)
            else type(default).__name__)
    raise ValueError(f"config arg {name}={text!r}: want {kind} "
                     f"(default {default!r})") from None
  raise TypeError(f"config arg {name}: cannot parse into a field of type "
                  f"{type(default).__name__}")


def _parse_tuple(name: str, text: str, default: tuple[Any, ...]) -> tuple:
  inner = text.strip()
  if inner[:1] in ("(", "["):
    if inner[-1:] != {"(": ")", "[": "]"}[inner[0]]:
      raise ValueError(f"config arg {name}={text!r}: unbalanced brackets")
    inner = inner[1:-1]
  parts = [p.strip() for p in inner.split(",") if p.strip()]
  kinds = {type(x) for x in default}
  if len(kinds) > 1:
    raise TypeError(f"config arg {name}: mixed-type tuple default {default}")
  elem = default[0] if default else ""
  return tuple(parse_value(name, p, elem) for p in parts)


def parse_items(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
  """The keys `arg` names, each parsed as the type of its default.

  Raises:
    ValueError: an unknown or repeated key (the message lists the valid
      ones), or a value that does not parse as its default's type.
  """
  values = {}
  for key, text in split_arg(arg):
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; valid keys: "
                       f"{', '.join(sorted(defaults))}")
    if key in values:
      raise ValueError(f"config arg {key!r} given twice in {arg!r}")
    values[key] = parse_value(key, text, defaults[key])
  return values


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """big_vision's parse_arg: typed values for the keys of `defaults`.

  Args:
    arg: 'key=value,key=value' (None or '' keeps every default).
    **defaults: each accepted key with its default; the default's type is the
      value's type.

  Returns:
    A ConfigDict with one entry per key of `defaults`.
  """
  return ml_collections.ConfigDict({**defaults,
                                    **parse_items(arg, defaults)})


def _leaves(config: ml_collections.ConfigDict,
            prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def arg_keys(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Every key an arg may use -> the dotted path of the field it sets."""
  keys = {}
  for path, _ in _leaves(config):
    keys[path] = path
    section, _, name = path.rpartition(".")
    if section in ("", *SHORT_SECTIONS) and name != path:
      if name in keys and keys[name] != path:
        raise ValueError(f"config field {name!r} is ambiguous: {keys[name]} "
                         f"and {path}")
      keys[name] = path
  return keys


def set_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """config['a']['b'] = value for path 'a.b'."""
  *parents, name = path.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value


def get_path(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def apply_arg(config: ml_collections.ConfigDict,
              arg: str | None) -> ml_collections.ConfigDict:
  """Sets the fields named in `arg` (see the module docstring); returns config.

  Only the fields the arg names change, so a config file applies its arg
  last and the arg wins over the file's own settings.
  """
  keys = arg_keys(config)
  defaults = {key: get_path(config, path) for key, path in keys.items()}
  values = parse_items(arg, defaults)
  paths = [keys[key] for key in values]
  if len(set(paths)) != len(paths):
    raise ValueError(f"config arg {arg!r} sets one field twice")
  for key, value in values.items():
    set_path(config, keys[key], value)
  return config
