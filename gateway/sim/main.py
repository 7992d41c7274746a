"""``maas sim``: flags, settings and the process. No secrets, so its settings stand alone (no pepper)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Annotated, Literal

import uvloop
from aiohttp import web
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway import logs
from gateway.settings import add_flags, load, split_csv, warn_misspelt_variables
from gateway.sim.server import SimConfig, build_app

log = logging.getLogger("maas.sim")


class _SimFlags(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAAS_", extra="forbid", frozen=True)

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="port of the OpenAI API")
    max_model_len: int = Field(6144, ge=16, description="context length: prompt + completion tokens")
    ttft_ms: float = Field(0.0, ge=0, le=600_000, description="time to first token, milliseconds")
    tokens_per_second: float = Field(0.0, ge=0, description="tokens per second per stream (0: no pacing)")
    embedding_dimensions: int = Field(32, ge=1, le=8192, description="length of embedding vectors")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest accepted request body")
    log_format: Literal["json", "text"] = Field("json", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")


class SimSettings(_SimFlags):
    served_model_name: Annotated[tuple[str, ...], NoDecode] = Field(
        ("sim-model",), description="model names to serve (repeatable flag; comma-separated variable)"
    )

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _split(cls, value: object) -> tuple[str, ...]:
        names = split_csv(value) if isinstance(value, str | list | tuple) else ()
        if not names:
            raise ValueError("at least one served model name is required")
        return names


def configure(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, _SimFlags)
    parser.add_argument(
        "--served-model-name",
        dest="served_model_name",
        action="append",
        default=None,
        help="model name to serve, repeatable [env MAAS_SERVED_MODEL_NAME, comma-separated, default sim-model]",
    )


def config_of(settings: SimSettings) -> SimConfig:
    return SimConfig(
        served=settings.served_model_name,
        max_model_len=settings.max_model_len,
        ttft_ms=settings.ttft_ms,
        tokens_per_second=settings.tokens_per_second,
        embedding_dimensions=settings.embedding_dimensions,
        max_body_bytes=settings.max_body_bytes,
    )


async def serve(settings: SimSettings) -> None:
    runner = web.AppRunner(build_app(config_of(settings)), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    await site.start()
    log.info(
        "maas sim listening",
        extra={"port": settings.port, "models": list(settings.served_model_name), "ttft_ms": settings.ttft_ms},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    settings = load(SimSettings, args)
    logs.setup(fmt=settings.log_format, level=settings.log_level)
    warn_misspelt_variables(SimSettings)
    uvloop.run(serve(settings))
    return 0
