"""parallel.hlo_cost: matmul FLOPs and bytes read from HLO text, every loop iteration counted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunified.parallel import aot, hlo_cost
from tests.test_aot import needs_libtpu

LAYERS, BATCH, WIDTH = 6, 16, 64
LAYER_FLOPS = 2 * BATCH * WIDTH * WIDTH


def scanned(w, x):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()


def unrolled(w, x):
    for i in range(w.shape[0]):
        x = jnp.tanh(x @ w[i])
    return x.sum()


def args():
    return jnp.ones((LAYERS, WIDTH, WIDTH)), jnp.ones((BATCH, WIDTH))


def test_a_scanned_layer_stack_counts_every_layer_where_xla_counts_one():
    lowered = jax.jit(scanned).lower(*args())
    compiled = lowered.compile()
    assert hlo_cost.compiled_cost(compiled).flops == LAYERS * LAYER_FLOPS
    assert hlo_cost.lowered_cost(lowered).flops == LAYERS * LAYER_FLOPS  # no trip-count annotation there
    xla = compiled.cost_analysis()["flops"]
    assert xla < 2 * LAYER_FLOPS  # why this module exists: XLA sees the body once
    unrolled_cost = hlo_cost.compiled_cost(jax.jit(unrolled).lower(*args()).compile())
    assert unrolled_cost.flops == LAYERS * LAYER_FLOPS and not unrolled_cost.unknown_loops


def test_backward_through_a_scan_counts_forward_and_both_gradients():
    cost = hlo_cost.compiled_cost(jax.jit(jax.grad(scanned)).lower(*args()).compile())
    assert cost.flops == 3 * LAYERS * LAYER_FLOPS  # h·W, dh·Wᵀ, hᵀ·dh per layer


def test_bytes_of_a_loop_free_program_match_xlas():
    compiled = jax.jit(jax.grad(unrolled)).lower(*args()).compile()
    ours, xla = hlo_cost.compiled_cost(compiled).bytes_accessed, compiled.cost_analysis()["bytes accessed"]
    assert 0.8 < ours / xla < 1.25, (ours, xla)


def test_a_scan_moves_about_what_its_unrolled_form_moves_not_its_whole_buffers_per_layer():
    """The scan's weight slice and stacked outputs are read/written a layer at a time."""
    ours = hlo_cost.compiled_cost(jax.jit(scanned).lower(*args()).compile()).bytes_accessed
    flat = hlo_cost.compiled_cost(jax.jit(unrolled).lower(*args()).compile()).bytes_accessed
    whole_buffer_per_layer = LAYERS * (LAYERS * WIDTH * WIDTH * 4)
    assert 0.9 * flat <= ours < 1.25 * flat < whole_buffer_per_layer, (ours, flat)


def test_dot_general_with_batch_dims_matches_xla():
    def f(a, b):
        return jnp.einsum("bqhd,bkhd->bhqk", a, b)
    compiled = jax.jit(f).lower(jnp.ones((2, 7, 3, 5)), jnp.ones((2, 11, 3, 5))).compile()
    assert hlo_cost.compiled_cost(compiled).flops == compiled.cost_analysis()["flops"] == 2 * 2 * 3 * 7 * 11 * 5


@pytest.mark.parametrize("stride,padding,rhs_dilation", [
    (1, "SAME", 1), (2, ((1, 1), (1, 1)), 1), (1, "VALID", 2), (2, ((0, 2), (1, 0)), 1)])
def test_convolution_flops_match_xla_forward_and_both_gradients(stride, padding, rhs_dilation):
    """Padding taps and dilation holes are not work (XLA's rule); the input gradient of a strided
    conv is an lhs-dilated one."""
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), padding, rhs_dilation=(rhs_dilation,) * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x, k = jnp.ones((2, 9, 10, 3)), jnp.ones((3, 3, 3, 4))
    y = conv(x, k)
    for fn, a in ((conv, (x, k)), (lambda x, k, g: jax.vjp(conv, x, k)[1](g), (x, k, y))):
        compiled = jax.jit(fn).lower(*a).compile()
        assert hlo_cost.compiled_cost(compiled).flops == compiled.cost_analysis()["flops"] > 0


def test_a_loop_whose_count_is_data_dependent_is_named_and_counted_once():
    def f(x):
        return jax.lax.while_loop(lambda c: c[1].sum() < 100.0, lambda c: (c[0] + 1, c[1] @ c[1]), (0, x))[1]
    cost = hlo_cost.compiled_cost(jax.jit(f).lower(jnp.ones((8, 8))).compile())
    assert cost.flops == 2 * 8 * 8 * 8 and len(cost.unknown_loops) == 1


def test_trip_count_is_read_from_the_condition_with_the_bodys_step():
    text = """HloModule m

body {
  p = (s32[], f32[4,4]{1,0}) parameter(0)
  i = s32[] get-tuple-element(p), index=0
  two = s32[] constant(2)
  next = s32[] add(i, two)
  x = f32[4,4]{1,0} get-tuple-element(p), index=1
  y = f32[4,4]{1,0} dot(x, x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT t = (s32[], f32[4,4]{1,0}) tuple(next, y)
}

cond {
  p = (s32[], f32[4,4]{1,0}) parameter(0)
  i = s32[] get-tuple-element(p), index=0
  n = s32[] constant(9)
  ROOT lt = pred[] compare(i, n), direction=LT
}

ENTRY main {
  zero = s32[] constant(0)
  x = f32[4,4]{1,0} parameter(0)
  init = (s32[], f32[4,4]{1,0}) tuple(zero, x)
  ROOT w = (s32[], f32[4,4]{1,0}) while(init), condition=cond, body=body
}
"""
    assert hlo_cost.program_cost(text).flops == 5 * 2 * 4 * 4 * 4  # i = 0, 2, 4, 6, 8


def test_text_it_cannot_read_falls_back_to_xlas_figures_with_a_note():
    class Stage:
        def as_text(self):
            return "not HLO"

        def cost_analysis(self):
            return {"flops": 7.0, "bytes accessed": 9.0}
    cost = hlo_cost.compiled_cost(Stage())
    assert (cost.flops, cost.bytes_accessed) == (7.0, 9.0) and "XLA's cost analysis" in cost.note


def test_a_loop_from_a_nonzero_start_or_on_a_float_counter():
    def from_four(x):
        return jax.lax.fori_loop(4, 10, lambda i, h: h @ h, x)
    x = jnp.ones((8, 8))
    lowered = jax.jit(from_four).lower(x)
    assert hlo_cost.lowered_cost(lowered).flops == hlo_cost.compiled_cost(lowered.compile()).flops == 6 * 2 * 8 ** 3

    def float_counter(x):
        return jax.lax.while_loop(lambda c: c[0] < 2.5, lambda c: (c[0] + 1.0, c[1] @ c[1]), (0.0, x))[1]
    cost = hlo_cost.lowered_cost(jax.jit(float_counter).lower(x))
    assert cost.unknown_loops and cost.flops == 2 * 8 ** 3  # not read as 2 trips: named, counted once


@needs_libtpu
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_tpu_compiled_scan_counts_every_layer_per_device():
    """The TPU compiler writes its dots as convolutions and its loops without a trip-count note."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices, _, _ = aot.resolve_devices("v5e:2x2", 1)
    mesh = Mesh(np.array(devices).reshape(-1), ("data",))
    w = jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.float32, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    compiled = jax.jit(jax.grad(scanned)).lower(w, x).compile()
    cost = hlo_cost.compiled_cost(compiled)
    assert cost.flops == 3 * LAYERS * LAYER_FLOPS / 4 and not cost.unknown_loops
    assert compiled.cost_analysis()["flops"] < cost.flops / 2


@needs_libtpu
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_tpu_collectives_inside_the_layer_scan_count_once_per_layer():
    """FSDP-sharded weights are gathered inside the scan: a step runs that gather at every layer."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices, _, _ = aot.resolve_devices("v5e:2x2", 1)
    mesh = Mesh(np.array(devices).reshape(-1), ("data",))
    w = jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.float32, sharding=NamedSharding(mesh, P(None, "data")))
    x = jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    compiled = jax.jit(jax.grad(scanned)).lower(w, x).compile()
    # once forward, once for the backward pass (the TPU compiler splits each async gather over three
    # fusions that share its channel: one gather, not three)
    assert hlo_cost.compiled_cost(compiled).collectives["all-gather"] == 2 * LAYERS
