import pytest

from ..support.project import shipped_params, short_stages, shrink, write_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The stage and latent-action job tests' project, built once per module: the shipped params.yaml with
    8-step stages and small simulator tiers of every level. Per module rather than per package: the three
    modules' jobs (~9 min of one worker together) then spread over the xdist workers, for ~25 s of tier
    building each."""
    raw = short_stages(shipped_params(), 8, batch_size=4, validate_every=4, lr=2e-3, video_lr=2e-3)
    raw["stages"]["stage1"]["offload_optimizer"] = True  # ZeRO-2 with the optimizer on the host: what fits 80 GB
    for t in raw["tiers"].values():
        t["source"]["options"] = shrink(t["source"]["options"], part_n=1)
    return write_project(tmp_path_factory.mktemp("proj"), raw)
