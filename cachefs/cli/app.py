"""The `cachefs` group itself: logging and the config file."""

from __future__ import annotations

import logging

import click

from cachefs.cli.common import fail
from cachefs.config import CONFIG_PATHS, load_config
from cachefs.errors import InvalidArgument


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CACHEFS"}
)
@click.option("--log-level", default="WARNING", show_default=True, help="DEBUG, INFO, WARNING...")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help=f"TOML file of option defaults (default: the first of {', '.join(CONFIG_PATHS)})",
)
@click.version_option(package_name="cachefs")
@click.pass_context
def main(ctx: click.Context, log_level: str, config_path: str | None) -> None:
    """cachefs: a distributed read cache for deep-learning training data.

    Every option can come from the config file ([COMMAND] tables, option names with
    underscores) or from CACHEFS_<COMMAND>_<OPTION> environment variables; the command line
    wins over the environment, which wins over the file.
    """
    try:
        ctx.default_map = load_config(config_path)
    except InvalidArgument as exc:
        fail(exc.message, 2)
    if ctx.get_parameter_source("log_level") == click.core.ParameterSource.DEFAULT:
        log_level = ctx.default_map.get("log_level", log_level)  # the file's top-level key
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
