"""One config-section parser for the jobs built on the edit job (see docs/architecture.md).

A recipe's config file is the edit job's config plus one section of its own (``catalog``,
``pairs``, and the judging and dataset jobs to come). The section is split off the raw mapping,
validated into the recipe's typed object (its errors prefixed with the section name, checked before
the edit job's sections so they are the ones shown), and the rest goes to the edit job's own
:func:`~step1x_batch.job.config.parse_config`. ``--set`` overrides reach both
(``pairs.variants=4``), because they are applied to the raw mapping first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Mapping, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from step1x_batch.job.config import ConfigError, JobConfig, parse_config, read_raw_config

__all__ = ["RecipeSection", "local_path", "require_one_storage"]

S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class RecipeSection(Generic[S]):
    """A recipe's own section: its key in the config file and the model that validates it."""

    name: str
    schema: type[S]

    def parse(self, raw: Any, base_dir: str | os.PathLike | None = None) -> tuple[JobConfig, S]:
        """Validate a raw mapping: this section by ``schema``, every other by ``parse_config``."""
        rest, section = self.split(raw)
        value = self.validate(section)
        job = parse_config(rest, base_dir)
        require_one_storage(job)
        return job, value

    def load(self, path: str, overrides: Sequence[str] = ()) -> tuple[JobConfig, S]:
        """Read a YAML config, apply ``--set`` overrides (this section's too), validate."""
        return self.parse(read_raw_config(path, overrides))

    def split(self, raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the edit job's sections, this section); a missing or null section is empty."""
        if not isinstance(raw, dict):
            raise ConfigError("invalid config: the top level must be a mapping")
        rest = dict(raw)
        section = rest.pop(self.name, None) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{self.name}: must be a mapping")
        return rest, section

    def validate(self, section: dict[str, Any]) -> S:
        """The typed section; every problem on one line of its own, ``<name>.<key>: <message>``."""
        try:
            return self.schema.model_validate(section)
        except ValidationError as e:
            raise self._error(e) from None

    def required_columns(self, settings: Mapping[str, str | None]) -> dict[str, tuple[str, ...]]:
        """The pre-flight's required manifest columns, keyed by the setting that names each
        (``{"pairs.image_column": ("image_uri",)}``), so a refusal says what to change; a setting
        left null names no column."""
        return {f"{self.name}.{key}": (column,) for key, column in settings.items() if column}

    def _error(self, err: ValidationError) -> ConfigError:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"{self.name}.{loc}: {e['msg']}" if loc else f"{self.name}: {e['msg']}")
        return ConfigError("invalid config:\n  " + "\n  ".join(lines))


def require_one_storage(job: JobConfig) -> None:
    """A recipe writes its work manifest under ``output.uri`` and the edit job reads it back with
    ``input.storage``: one storage for both."""
    if job.output.storage is not None and job.output.storage != job.input.storage:
        raise ConfigError(
            "output.storage: the work manifest is written under output.uri and read back with "
            "input.storage; use one storage for both (leave output.storage unset)"
        )


def local_path(uri: str, base_dir: str | os.PathLike | None) -> str:
    """A file a section names (``pairs.templates``): a local path made absolute against the
    config's folder (the working directory when none), a URI with a scheme as it is."""
    if "://" in uri:
        return uri
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return str((base / os.path.expanduser(uri)).resolve())


def one_instruction_source(data: Any, template_key: str) -> Any:
    """A recipe section's instructions come from a column or from templates, never both; neither
    given: the ``instruction`` column. For a ``mode="before"`` model validator."""
    if isinstance(data, dict):
        if data.get(template_key) and data.get("instruction_column"):
            raise ValueError(f"give either instruction_column or {template_key}, not both")
        if not data.get(template_key) and not data.get("instruction_column"):
            data = {**data, "instruction_column": "instruction"}
    return data
