"""The XLA:CPU options the project's entry points set, and that a user's own choice wins."""

import os
import subprocess
import sys

from jaxunified import cpu_flags


def test_merged_adds_missing_options_and_keeps_the_users():
    assert cpu_flags.merged("") == "--xla_cpu_experimental_ynn_fusion_type="
    assert cpu_flags.merged("--xla_force_host_platform_device_count=8") == (
        "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=")
    mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert cpu_flags.merged(mine) == mine


def _apply_in_fresh_process(env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(env_overrides)
    code = "from jaxunified import cpu_flags; import os; print(cpu_flags.apply(), repr(os.environ.get('XLA_FLAGS')))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_apply_sets_the_flags_for_cpu_runs_only():
    assert _apply_in_fresh_process({"JAX_PLATFORMS": "cpu"}) == "True '--xla_cpu_experimental_ynn_fusion_type='"
    assert _apply_in_fresh_process({"JAX_PLATFORMS": "tpu"}) == "False None"
    user = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert _apply_in_fresh_process({"XLA_FLAGS": user}) == f"False '{user}'"


def test_this_test_process_runs_with_them():
    # conftest applied them before JAX started, so every test measures the configuration users get
    assert "--xla_cpu_experimental_ynn_fusion_type=" in os.environ["XLA_FLAGS"]
