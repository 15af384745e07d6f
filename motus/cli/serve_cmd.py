"""`motus serve MODEL@ALIAS`: a policy server that follows a registry alias (see motus/serve/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve(
    target: Annotated[str, typer.Argument(help="What to serve: MODEL@ALIAS (followed: a promotion or rollback swaps "
                                               "it in), MODEL/VERSION (pinned), models:/... or an export folder.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 in a pod).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    poll: Annotated[float | None, typer.Option(min=0.05, help="Seconds between reads of the alias "
                                               "(default MOTUS_SERVE_POLL_S, 5).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests that arrive together share one forward pass, up "
                                           "to this many (1: one at a time).")] = 1,
    batch_wait_ms: Annotated[float, typer.Option(min=0, help="How long the first request of a batch waits for "
                                                 "others.")] = 0.0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (default MOTUS_SERVE_DEVICE, cpu).")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 on CUDA, fp32 on a CPU), bf16 or fp32 (default "
                                                  "MOTUS_SERVE_PRECISION, auto).")] = None,
    embodiment: Annotated[str | None, typer.Option(help="Refuse versions that act for another embodiment.")] = None,
    action_dim: Annotated[int | None, typer.Option(min=1, help="Refuse versions with another action width.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Fetched exports (default MOTUS_SERVE_CACHE_DIR or "
                                                   "~/.cache/motus/serve).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's and the follower's log level.")] = "info",
) -> None:
    """Serve a registered Stage 3 policy over HTTP (/act) and a websocket (/stream), with /healthz, /metadata and
    /metrics. It follows the alias: a newly promoted version is loaded and warmed up in the background and swapped
    in atomically; one that fails either is reported and the old one keeps serving."""
    import logging

    import uvicorn

    from ..config import get_settings
    from ..serve.app import create_app
    from ..serve.deployment import Deployment, Target
    from ..serve.served import Expectation

    settings = get_settings()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        parsed = Target.parse(target)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="TARGET") from None
    registry = None
    if parsed.path is None:
        from ..track.registry import Registry

        registry = Registry(settings.tracking_uri)
    cache = cache_dir or settings.serve_cache_dir or Path.home() / ".cache" / "motus" / "serve"
    deployment = Deployment(parsed, registry, cache_dir=Path(cache), device=device or settings.serve_device,
                            precision=precision or settings.serve_precision,
                            expect=Expectation(embodiment, action_dim), poll_s=poll or settings.serve_poll_s)
    typer.echo(f"motus serve: {parsed.uri} -> {deployment.refresh()}", err=True)
    app = create_app(deployment, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
