"""The DeepSpeed config both train modules build their engine from."""

import pytest

from motus.train.engine import deepspeed_config


def test_the_engine_config_of_a_job():
    cfg = deepspeed_config("stages.stage1", batch_size=8, world=2, grad_clip=1.0, zero_stage=2)
    assert cfg["train_batch_size"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_optimization"] == {"stage": 2}
    assert "bf16" not in cfg and "fp16" not in cfg  # bf16 is autocast over fp32 master weights, never a cast
    off = deepspeed_config("stages.stage1", batch_size=8, world=2, grad_clip=1.0, zero_stage=2,
                           offload_optimizer=True, pin_memory=True)
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert off["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ValueError, match=r"latent_action.batch_size=6 must be divisible by the 4 processes"):
        deepspeed_config("latent_action", batch_size=6, world=4, grad_clip=1.0, zero_stage=1)
