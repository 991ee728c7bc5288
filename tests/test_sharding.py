"""The grid axis is sharded across devices and the results equal the single-device ones."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

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

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
""") + SETUP + textwrap.dedent("""
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
    for name, tree in out.items():
      if name == "preview":
        continue
      for leaf in jax.tree.leaves(tree):
        assert leaf.shape[0] == 231, (name, leaf.shape)
        assert len(leaf.sharding.device_set) == 4, (name, leaf.sharding)
    np.savez(os.environ["OUT"], **{f"{n}_{i}": np.asarray(l) for n, tr in out.items()
                                    for i, l in enumerate(jax.tree.leaves(tr))})
""")


def test_grid_sharded_over_four_devices_equals_single_device(tmp_path):
  out = tmp_path / "sharded.npz"
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=dict(os.environ, OUT=str(out)), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
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

MODEL_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
""") + MODEL_SETUP + textwrap.dedent("""
    from jax.sharding import Mesh
    assert jax.device_count() == 4
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("grid", "model"))
    placed = []
    real = bmerge.grid.evaluate._sharding.shard_params
    def spy(tree, m):
      out = real(tree, m)
      placed.extend(str(leaf.sharding.spec) for leaf in jax.tree.leaves(out))
      return out
    bmerge.grid.evaluate._sharding.shard_params = spy
    out = bmerge.preview(merge.hessian_weighted, q, alphas, evaluate, x, chunk_size=8, mesh=mesh, progress=False)
    # Every weight matrix is split along "model" (each device holds half of it); b2 (3 entries) is replicated.
    assert sum("model" in s for s in placed) == 6, placed
    np.save(os.environ["OUT"], out)
""")


def test_preview_with_params_sharded_across_a_model_axis_equals_one_device(tmp_path):
  out = tmp_path / "model_sharded.npy"
  proc = subprocess.run([sys.executable, "-c", MODEL_SCRIPT], env=dict(os.environ, OUT=str(out)),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  scope = {}
  exec(MODEL_SETUP, scope)
  single = scope["bmerge"].preview(scope["merge"].hessian_weighted, scope["q"], scope["alphas"], scope["evaluate"],
                                   scope["x"], chunk_size=8, progress=False)
  np.testing.assert_allclose(np.load(out), single, rtol=1e-5, atol=1e-6)
