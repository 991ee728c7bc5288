"""The grid axis is sharded across devices and the results equal the single-device ones."""

import textwrap

import jax
import numpy as np
from conftest import run_python

# Inputs and the computations, run once in a 4-device subprocess and once here on one device.
SETUP = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import bmerge
    from bmerge import em
    from bmerge import grid
    from bmerge import merge
    rng = np.random.default_rng(0)
    t, k = 3, 4
    means = {"w": rng.normal(size=(t, k, 5, 3)).astype(np.float32), "b": rng.normal(size=(t, k, 3)).astype(np.float32)}
    precs = jax.tree.map(lambda x: np.exp(rng.normal(size=x.shape)).astype(np.float32), means)
    mix = bmerge.Mixture(bmerge.DiagGaussian(means, precs), rng.normal(size=(t, k)).astype(np.float32))
    diag = jax.tree.map(lambda x: x[:, 0], mix.components)
    alphas = grid.simplex(3, 0.05).astype(np.float32)  # G = 231, not a multiple of 4: padding is exercised
    evaluate = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]))
    # Full-covariance components (P = 6): the kernels that loop over chunks of alphas.
    u = rng.normal(size=(t, k, 6, 6)).astype(np.float32)
    full_mix = bmerge.Mixture(bmerge.FullGaussian(rng.normal(size=(t, k, 6)).astype(np.float32),
                                                  np.eye(6, dtype=np.float32) + u @ np.swapaxes(u, -1, -2) / 6),
                              rng.normal(size=(t, k)).astype(np.float32))
    full = jax.tree.map(lambda x: x[:, 0], full_mix.components)

    def compute():
      return {
          "hessian": merge.hessian_weighted(diag, alphas),
          "simple": merge.simple_average(diag.mean, alphas),
          "mixture": em.find_modes(mix, alphas, 6).params,
          "full_hessian": merge.hessian_weighted(full, alphas, chunk_size=16),
          "full_mixture": em.find_modes(full_mix, alphas, 6, chunk_size=16).params,
          # Chunks of 10 alphas, padded to 12 and split across the devices by the chunk driver.
          "preview": bmerge.preview(merge.hessian_weighted, diag, alphas, evaluate, np.ones((2, 5), np.float32),
                                    chunk_size=10, progress=False),
      }
""")

# Where arrays live, for the 4-device subprocesses (run_python(..., devices=4)): which rows of axis 0 each device
# holds, and a spy on the compiled merge-and-evaluate call of `bmerge.preview` that keeps every chunk's output (a
# jax.Array still on the devices).
PLACEMENT = textwrap.dedent("""
    import os
    import jax

    def rows_by_device(x):  # {device id: (first row, end row)} of axis 0, for every device holding a piece of x
      return {s.device.id: s.index[0].indices(x.shape[0])[:2] for s in x.addressable_shards}

    def split_rows(mesh, n):  # n rows split along the mesh's first ("grid") axis, copied along its other axes
      grid_rows = mesh.devices.reshape(mesh.devices.shape[0], -1)
      per = n // grid_rows.shape[0]
      return {d.id: (i * per, (i + 1) * per) for i, row in enumerate(grid_rows) for d in row}

    import bmerge.grid.evaluate
    chunk_outputs = []
    real_fused = bmerge.grid.evaluate._fused
    def fused_spy(*args):
      out = real_fused(*args)
      chunk_outputs.extend(jax.tree.leaves(out))
      return out
    bmerge.grid.evaluate._fused = fused_spy
""")

SCRIPT = PLACEMENT + SETUP + textwrap.dedent("""
    assert jax.device_count() == 4, jax.devices()
    seen = []
    real = bmerge.grid.evaluate._sharding.shard_rows
    def spy(x, mesh):
      y, g = real(x, mesh)
      if not isinstance(y, jax.core.Tracer):  # the chunk driver's call, not the merge rule's inside the jit
        seen.append(len(y.sharding.device_set))
      return y, g
    bmerge.grid.evaluate._sharding.shard_rows = spy
    # The full-covariance kernels loop over chunks of alphas; each device must loop over its own quarter of the
    # (padded) grid, not over all of it: the rows each traced loop sees.
    rows_seen = []
    real_map = bmerge.merge._fullcov._map_chunks
    def map_spy(fn, size, *rows):
      rows_seen.append(rows[0].shape[0])
      return real_map(fn, size, *rows)
    bmerge.merge._fullcov._map_chunks = map_spy
    out = compute()
    assert seen and set(seen) == {4}, seen
    # 232 / 4 = 58 alphas per device (hessian_weighted, the mixture EM), and 12 / 4 = 3 of the T K = 12 component
    # log-determinants.
    assert sorted(set(rows_seen)) == [3, 58], rows_seen
    # Inside the user's own shard_map (a data-parallel loop) the rule maps over that device's rows as they are.
    from jax.sharding import Mesh, PartitionSpec
    data_mesh = Mesh(np.asarray(jax.devices()), ("data",))
    inner = jax.jit(jax.shard_map(lambda a: merge.hessian_weighted(full, a, chunk_size=16), mesh=data_mesh,
                                  in_specs=PartitionSpec("data"), out_specs=PartitionSpec("data")))
    np.testing.assert_allclose(inner(alphas[:228]), out["full_hessian"][:228], rtol=1e-6, atol=1e-6)
    # The preview: every chunk of 12 alphas came back split 3 rows a device, in the devices' order; the result is
    # gathered on the host.
    mesh = bmerge._sharding.grid_mesh()
    assert len(chunk_outputs) == 20 and all(x.shape == (12,) for x in chunk_outputs), [x.shape for x in chunk_outputs]
    for x in chunk_outputs:
      assert rows_by_device(x) == split_rows(mesh, 12) == {0: (0, 3), 1: (3, 6), 2: (6, 9), 3: (9, 12)}, x.sharding
    assert isinstance(out["preview"], np.ndarray) and out["preview"].shape == (231,)
    # The merge rules on a grid the devices divide (228 alphas): each device holds its own 57 rows of every output.
    for name, tree in {"hessian": merge.hessian_weighted(diag, alphas[:228]),
                       "simple": merge.simple_average(diag.mean, alphas[:228]),
                       "mixture": em.find_modes(mix, alphas[:228], 6).params}.items():
      for leaf in jax.tree.leaves(tree):
        assert rows_by_device(leaf) == split_rows(mesh, 228), (name, leaf.sharding)
    # On 231 alphas the padding is sliced off, and a 4-way split of 231 rows is not an array JAX can hold: every
    # device holds the whole result.
    for name, tree in out.items():
      for leaf in jax.tree.leaves(tree) if name != "preview" else []:
        assert rows_by_device(leaf) == {d.id: (0, 231) for d in jax.devices()}, (name, leaf.sharding)
    np.savez(os.environ["OUT"], **{f"{n}_{i}": np.asarray(l) for n, tr in out.items()
                                    for i, l in enumerate(jax.tree.leaves(tr))})
""")


def test_grid_sharded_over_four_devices_equals_single_device(tmp_path):
  out = tmp_path / "sharded.npz"
  run_python(SCRIPT, devices=4, OUT=str(out))
  sharded = np.load(out)
  scope = {}
  exec(SETUP, scope)
  single = scope["compute"]()
  assert len(sharded.files) == sum(len(jax.tree.leaves(tree)) for tree in single.values())
  for name, tree in single.items():
    for i, leaf in enumerate(jax.tree.leaves(tree)):
      tol = 1e-5 if name == "preview" else 1e-6  # the preview sums 10 tanh values per alpha
      np.testing.assert_allclose(sharded[f"{name}_{i}"], leaf, rtol=tol, atol=tol)


MODEL_SETUP = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import bmerge
    from bmerge import grid
    from bmerge import merge
    rng = np.random.default_rng(1)
    t = 3
    # A two-layer network whose weight matrices have axes the "model" mesh axis (size 2) divides.
    mean = {"w1": rng.normal(size=(t, 6, 8)).astype(np.float32), "b1": rng.normal(size=(t, 8)).astype(np.float32),
            "w2": rng.normal(size=(t, 8, 4)).astype(np.float32), "b2": rng.normal(size=(t, 3)).astype(np.float32)}
    prec = jax.tree.map(lambda x: np.exp(rng.normal(size=x.shape)).astype(np.float32), mean)
    q = bmerge.DiagGaussian(mean, prec)
    x = rng.normal(size=(10, 6)).astype(np.float32)
    alphas = grid.simplex(3, 0.1)  # G = 66
    def evaluate(p, x):
      hidden = jnp.tanh(x @ p["w1"] + p["b1"])
      return jnp.mean(hidden @ p["w2"], axis=0)[:3] + p["b2"]
""")

MODEL_SCRIPT = PLACEMENT + MODEL_SETUP + textwrap.dedent("""
    from jax.sharding import Mesh
    assert jax.device_count() == 4
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("grid", "model"))
    placed = {}
    real = bmerge.grid.evaluate._sharding.shard_params
    def spy(tree, m):
      out = real(tree, m)
      placed.update({jax.tree_util.keystr(k): tuple(leaf.sharding.spec) for k, leaf in
                     jax.tree_util.tree_leaves_with_path(out)})
      return out
    bmerge.grid.evaluate._sharding.shard_params = spy
    merged_specs = {}  # the placement of each merged leaf inside the compiled chunk
    def rule(posteriors, chunk):
      merged = merge.hessian_weighted(posteriors, chunk)
      for name, leaf in merged.items():
        jax.debug.inspect_array_sharding(leaf, callback=lambda s, name=name: merged_specs.__setitem__(name, s.spec))
      return merged
    out = bmerge.preview(rule, q, alphas, evaluate, x, chunk_size=8, mesh=mesh, progress=False)
    strip = lambda spec: tuple(spec)[:max([i + 1 for i, a in enumerate(spec) if a is not None] + [0])]
    # Every weight matrix is split along "model" (each device holds half of it); b2 (3 entries) is replicated.
    assert sum("model" in spec for spec in placed.values()) == 6, placed
    # Each merged leaf keeps that split and adds the grid: [C, ...] split along "grid", then as its posterior.
    for name, spec in merged_specs.items():
      assert strip(spec) == strip(("grid",) + placed[f".mean['{name}']"][1:]), (name, spec, placed)
    assert set(merged_specs) == {"w1", "b1", "w2", "b2"} and "model" in merged_specs["w1"]
    # The metrics of every chunk of 8 alphas: 4 rows on each grid row of the mesh, the same rows on both of its
    # "model" devices; the result is gathered on the host.
    assert len(chunk_outputs) == 9 and all(y.shape == (8, 3) for y in chunk_outputs)
    for y in chunk_outputs:
      assert rows_by_device(y) == split_rows(mesh, 8) == {0: (0, 4), 1: (0, 4), 2: (4, 8), 3: (4, 8)}, y.sharding
    assert isinstance(out, np.ndarray) and out.shape == (66, 3)
    np.save(os.environ["OUT"], out)
""")


def test_preview_with_params_sharded_across_a_model_axis_equals_one_device(tmp_path):
  out = tmp_path / "model_sharded.npy"
  run_python(MODEL_SCRIPT, devices=4, OUT=str(out))
  scope = {}
  exec(MODEL_SETUP, scope)
  single = scope["bmerge"].preview(scope["merge"].hessian_weighted, scope["q"], scope["alphas"], scope["evaluate"],
                                   scope["x"], chunk_size=8, progress=False)
  np.testing.assert_allclose(np.load(out), single, rtol=1e-5, atol=1e-6)
