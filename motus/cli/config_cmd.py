"""`motus config`: check and inspect params.yaml and the MOTUS_* environment."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from motus.config import ConfigError, Params, Settings, config_hash, get_settings, load_params, resolved_dict

config_app = typer.Typer(
    help="Check and inspect the configuration: params.yaml and the MOTUS_* environment.",
    no_args_is_help=True,
)

ParamsOption = Annotated[
    Path | None,
    typer.Option(
        "--params",
        "-p",
        help="The params file. Default: $MOTUS_PARAMS, else ./params.yaml.",
        dir_okay=False,
    ),
]


class Format(str, Enum):
    yaml = "yaml"
    json = "json"


def _settings() -> tuple[Settings | None, list[str]]:
    try:
        return get_settings(), []
    except ConfigError as err:
        return None, str(err).splitlines()


def _params_path(given: Path | None, settings: Settings | None) -> Path:
    if given is not None:
        return given
    if settings is not None:
        return settings.params_file
    # The environment itself is broken; still find the file the way Settings would.
    return Path(os.environ.get("MOTUS_PARAMS") or os.environ.get("MOTUS_PARAMS_FILE") or "params.yaml")


def _load(given: Path | None) -> tuple[Path, Settings | None, Params | None, list[str]]:
    """Everything `validate` and `show` read, with every problem as a printable line."""
    settings, problems = _settings()
    path = _params_path(given, settings)
    params = None
    try:
        params = load_params(path)
    except ConfigError as err:
        problems.extend(str(err).splitlines())
    if params is not None:
        problems.extend(f"{path}: {line}" for line in _model_problems(params))
    return path, settings, params, problems


def _model_problems(params: Params) -> list[str]:
    """What only the model room can check: preset overrides and that local weight paths exist."""
    from motus.model.presets import config_from_params

    problems = []
    for key, value in params.model.weights.model_dump().items():
        if value is not None and not Path(value).expanduser().exists():
            problems.append(f"model.weights.{key}: '{value}' does not exist (weights are read locally, never downloaded)")
    try:
        config_from_params(params.model)
    except ValueError as err:
        problems.extend(f"model.overrides: {line.strip()}" for line in str(err).splitlines() if line.strip()
                        and not line.startswith("invalid Motus model config"))
    return problems


def _fail(problems: list[str]) -> None:
    for line in problems:
        typer.echo(line, err=True)
    noun = "problem" if len(problems) == 1 else "problems"
    typer.echo(f"invalid configuration: {len(problems)} {noun}", err=True)
    raise typer.Exit(code=1)


@config_app.command()
def validate(params: ParamsOption = None) -> None:
    """Check params.yaml and the environment; print every problem with its key path, or a summary."""
    path, _, loaded, problems = _load(params)
    if problems or loaded is None:
        _fail(problems)
    typer.echo(
        f"{path}: ok (preset {loaded.model.preset}, {len(loaded.tiers)} tiers, {len(loaded.stages)} stages, "
        f"{len(loaded.gates)} gates, {len(loaded.pools)} pools)"
    )


@config_app.command()
def show(
    params: ParamsOption = None,
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.yaml,
) -> None:
    """Print the resolved configuration (every default filled in), the environment settings and the config hash."""
    path, settings, loaded, problems = _load(params)
    if problems or loaded is None or settings is None:
        _fail(problems)
    document: dict[str, Any] = {
        "params_file": str(path),
        "config_hash": config_hash(loaded),
        "params": resolved_dict(loaded),
        # mode="json" masks SecretStr fields; there are no secrets among the settings yet.
        "settings": settings.model_dump(mode="json"),
    }
    if format is Format.json:
        typer.echo(json.dumps(document, indent=2))
    else:
        typer.echo(yaml.safe_dump(document, sort_keys=False, default_flow_style=False).rstrip())
