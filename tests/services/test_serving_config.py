"""ServingConfig's derived engine settings."""

from services.serving_config import ServingConfig


def test_the_decode_lm_head_is_int8_on_cpus_unless_chosen() -> None:
    cpu = ServingConfig()
    assert cpu.engine_args(cpu.decode).lm_head_linear == "int8"
    assert cpu.engine_args(cpu.prefill).lm_head_linear == "dense"  # one token a prompt
    gpu = ServingConfig.model_validate({"model": {"device": "cuda:0"}})
    assert gpu.engine_args(gpu.decode).lm_head_linear == "dense"
    chosen = ServingConfig.model_validate({"decode": {"linear": "int4", "lm_head_linear": "dense"}})
    assert chosen.engine_args(chosen.decode).lm_head_linear == "dense"
    colocated = ServingConfig.model_validate({"mode": "colocated"})
    assert colocated.engine_args(colocated.decode).lm_head_linear == "int8"
