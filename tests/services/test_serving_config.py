"""ServingConfig's derived engine settings."""

from pathlib import Path

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


def test_a_pool_section_that_leaves_linear_out_keeps_its_pools_format(tmp_path: Path) -> None:
    path = tmp_path / "serving.yaml"
    path.write_text("prefill:\n  torch_threads: 1\ndecode:\n  torch_threads: 2\n")
    config = ServingConfig.from_yaml(path)
    assert (config.prefill.linear, config.prefill.torch_threads) == ("fp8", 1)
    assert (config.decode.linear, config.decode.torch_threads) == ("int4", 2)
    chosen = ServingConfig.model_validate({"prefill": {"linear": "dense"}})
    assert (chosen.prefill.linear, chosen.decode.linear) == ("dense", "int4")
