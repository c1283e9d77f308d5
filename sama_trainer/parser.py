"""``SAMAParser``: command lines over dataclasses with YAML config files (as TRL's ``TrlParser``).

``--config a.yaml --config b.yaml`` merges the files in order (later files win), their values become defaults, and
every other flag overrides them. A file may start from other files with a top-level ``config:`` entry (a path or a
list, relative to the file), read before its own values. A top-level ``env:`` mapping in a file is exported to
``os.environ``. Unknown keys in a file are an error that lists the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterable
from typing import Any

import yaml
from transformers import HfArgumentParser


__all__ = ["SAMAParser", "load_config_files"]


def load_config_files(paths: Iterable[str], valid: set[str] | None = None) -> dict[str, Any]:
    """Merge YAML mappings in order (later files win); export each file's ``env:`` mapping to ``os.environ``."""
    return _merge_config_files(paths, valid, including=())


def _merge_config_files(paths: Iterable[str], valid: set[str] | None, including: tuple[str, ...]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of option -> value")
        bases = config.pop("config", None) or []
        if bases:
            bases = [bases] if isinstance(bases, str) else list(bases)
            bases = [os.path.join(os.path.dirname(os.path.abspath(path)), b) for b in bases]
            looped = [b for b in bases if os.path.abspath(b) in including + (os.path.abspath(path),)]
            if looped:
                raise ValueError(f"{path}: config files include each other in a loop ({looped[0]})")
            merged.update(_merge_config_files(bases, valid, including + (os.path.abspath(path),)))
        for key, value in (config.pop("env", None) or {}).items():
            os.environ[str(key)] = str(value)
        if valid is not None:
            unknown = sorted(set(config) - valid)
            if unknown:
                raise ValueError(f"{path}: unknown option(s) {unknown}; run with --help for the valid ones")
        merged.update(config)
    return merged


class SAMAParser(HfArgumentParser):
    """``HfArgumentParser`` that also reads ``--config`` YAML files (see the module docstring).

    Example::

        parser = SAMAParser((ScriptArguments, SAMAConfig))
        script_args, training_args = parser.parse_args_and_config()
    """

    def __init__(self, dataclass_types: Any, **kwargs: Any):
        types = dataclass_types if isinstance(dataclass_types, (list, tuple)) else [dataclass_types]
        for dc in types:
            if any(f.name == "config" for f in dataclasses.fields(dc)):
                raise ValueError(f"{dc.__name__} has a field named 'config', which SAMAParser reserves for YAML files")
        super().__init__(types, **kwargs)
        self.add_argument(
            "--config",
            action="append",
            default=[],
            metavar="FILE",
            help="YAML file of option values (repeatable: later files win; flags override them).",
        )

    def _field_names(self) -> set[str]:
        return {f.name for dc in self.dataclass_types for f in dataclasses.fields(dc) if f.init}

    def parse_args_and_config(self, args: list[str] | None = None) -> tuple[Any, ...]:
        """Parse ``args`` (default ``sys.argv[1:]``) into one instance per dataclass, ``--config`` files first."""
        args = sys.argv[1:] if args is None else list(args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", action="append", default=[])
        known, _ = pre.parse_known_args(args)
        self.set_defaults(**load_config_files(known.config, self._field_names()))
        return self.parse_args_into_dataclasses(args)

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **kwargs):
        """As ``HfArgumentParser``'s, without the ``--config`` values (read by :meth:`parse_args_and_config`)."""
        *outputs, remaining = super().parse_args_into_dataclasses(args, return_remaining_strings=True, **kwargs)
        outputs = [o for o in outputs if not (isinstance(o, argparse.Namespace) and set(vars(o)) <= {"config"})]
        if return_remaining_strings:
            return (*outputs, remaining)
        if remaining:
            raise ValueError(f"unknown argument(s) {remaining}; run with --help for the valid ones")
        return tuple(outputs)
