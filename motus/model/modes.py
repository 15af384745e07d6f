"""The five inference modes as data: which modality is clean, generated, or kept at pure noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["clean", "generate", "noise"]


@dataclass(frozen=True)
class Mode:
    name: str
    video: Role  # the future frames; the conditioning frame is always clean
    action: Role
    description: str


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("vla", video="noise", action="generate", description="policy: observation + language -> actions"),
        Mode("wm", video="generate", action="clean", description="world model: observation + actions -> future video"),
        Mode("idm", video="clean", action="generate", description="inverse dynamics: observation + future video -> actions"),
        Mode("vgm", video="generate", action="noise", description="video generation: observation + language -> future video"),
        Mode("joint", video="generate", action="generate", description="joint prediction of future video and actions"),
    )
}


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode '{name}'; expected one of {', '.join(MODES)}") from None
