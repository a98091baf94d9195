"""The YAML reader of configs and ``--set`` values: the safe loader, stricter and more familiar.

Two differences from ``yaml.safe_load``:

* a key given twice in one mapping is refused (YAML keeps the last one without a word, so a
  second ``training:`` section would replace the first whole);
* numbers in exponent notation without a decimal point or with an unsigned exponent
  (``1e-3``, ``5E4``, ``1.0e3``) are numbers, as in YAML 1.2, JSON and Python. PyYAML follows
  YAML 1.1 and reads them as strings, so ``lr: 1e-3`` would be refused as "not a number".
"""

from __future__ import annotations

import re
import typing
from typing import Any

import yaml

EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class RepeatedKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping."""

    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark):
        super().__init__(problem=f"key '{key}' is given twice (first at line {first.line + 1})", problem_mark=again)
        self.key = key


class StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing a repeated key and reading every exponent notation as a float."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the base class says what is wrong with such a key
            if key in seen:
                raise RepeatedKey(key, seen[key], key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


# Added after YAML 1.1's own float pattern, so every plain scalar that one reads keeps its meaning.
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse ``text`` with :class:`StrictLoader`.

    Raises:
        RepeatedKey: a mapping gives a key twice.
        yaml.YAMLError: ``text`` is not valid YAML.
    """
    return yaml.load(text, Loader=StrictLoader)
