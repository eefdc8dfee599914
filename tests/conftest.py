"""Every test sees 8 fake CPU devices and the project's XLA:CPU options; this must run before JAX
initialises its backends."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxunified import cpu_flags  # noqa: E402

cpu_flags.apply()

import pathlib  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same tiny train/init programs in several Trainers (resume, sharding);
# the persistent cache turns every repeat into a load. The non-partitionable threefry compiles
# random init about 3× faster on CPU; tests only need a fixed stream, not the production one.
# The environment carries it to the train.py subprocesses too (resume, preemption, multi-host),
# which otherwise compile the same tiny programs afresh in every run.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
    "JAXUNIFIED_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "jaxunified_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_threefry_partitionable", False)

GOLDEN = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden vectors not found at {GOLDEN}; ../shared must sit beside the repo")
    return GOLDEN
