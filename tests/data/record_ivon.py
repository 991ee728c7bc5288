"""Records IVON trajectories of the reference implementation (ivon-opt 0.1.3) for tests/test_ivon.py.

Not part of the package and never imported by the tests: it runs in a scratch environment with the GPL reference
and torch, and writes only JSON (tests/data/ivon_<setting>.json), which the tests replay through `bmerge.optim.ivon`.

  python3 -m venv /tmp/ivon-scratch
  /tmp/ivon-scratch/bin/pip install ivon-opt torch==2.13.0 numpy
  /tmp/ivon-scratch/bin/python tests/data/record_ivon.py

Everything is float64. JAX cannot reproduce torch's random numbers, so for every step the file holds what the
update consumes — the noise n_s and the per-sample gradient g_s of each Monte-Carlo sample — and what it produces:
params, h and the momentum after the step, per parameter tensor.
"""

import json
import math
import os

import ivon
import torch

STEPS = 15
HERE = os.path.dirname(os.path.abspath(__file__))

# Small ess and beta2 so h moves within 15 steps and every term of the update is exercised; lr large enough that
# the params move visibly, so the weight-decay and debiasing terms matter too.
BASE = dict(lr=0.05, ess=20.0, hess_init=0.5, beta1=0.9, beta2=0.99, weight_decay=1e-2, mc_samples=1,
            hess_approx="price", clip_radius=float("inf"), debias=True, rescale_lr=True)
SETTINGS = {
    "defaults": {},
    "mc3_clip": dict(mc_samples=3, clip_radius=0.05),
    "norescale_nodebias": dict(rescale_lr=False, debias=False, lr=0.02),
    "gradsq": dict(hess_approx="gradsq", mc_samples=2, beta2=0.9),
}


class Net(torch.nn.Module):
  """tanh MLP 3 -> 4 -> 1 with three parameter tensors of different ranks."""

  def __init__(self):
    super().__init__()
    self.w1 = torch.nn.Parameter(0.5 * torch.randn(3, 4))
    self.b1 = torch.nn.Parameter(0.1 * torch.randn(4))
    self.w2 = torch.nn.Parameter(0.5 * torch.randn(4))

  def forward(self, x):
    return torch.tanh(x @ self.w1 + self.b1) @ self.w2


def tensors(model):
  return {name: p.detach().clone() for name, p in model.named_parameters()}


def as_list(x):
  return x.detach().cpu().tolist()


def split(flat, model):
  """The reference keeps momentum and h as one flat vector per param group; split it per tensor."""
  out, offset = {}, 0
  for name, p in model.named_parameters():
    out[name] = as_list(flat[offset:offset + p.numel()].view(p.shape))
    offset += p.numel()
  return out


def record(name, overrides, seed):
  torch.manual_seed(seed)
  hp = dict(BASE, **overrides)
  model = Net()
  x = torch.randn(32, 3)
  y = torch.sin(x.sum(1)) + 0.1 * torch.randn(32)
  opt = ivon.IVON(model.parameters(), **hp)

  # Capture the exact noise vector the reference draws (its `_sample_params` returns (param_avg, noise)).
  captured = []
  sample = opt._sample_params

  def sample_and_capture():
    param_avg, noise = sample()
    captured.append(noise.clone())
    return param_avg, noise

  opt._sample_params = sample_and_capture

  steps = []
  for t in range(STEPS):
    idx = torch.arange(8) + 8 * (t % 4)  # minibatches cycle over the 32 points
    before = tensors(model)
    noise, grads = {k: [] for k in before}, {k: [] for k in before}
    for _ in range(hp["mc_samples"]):
      opt.zero_grad(set_to_none=True)
      captured.clear()
      with opt.sampled_params(train=True):
        loss = torch.mean((model(x[idx]) - y[idx]) ** 2)
        loss.backward()
        for k, p in model.named_parameters():
          grads[k].append(as_list(p.grad))
      offset = 0
      for k, p in before.items():
        noise[k].append(as_list(captured[0][offset:offset + p.numel()].view(p.shape)))
        offset += p.numel()
    opt.step()
    group = opt.param_groups[0]
    steps.append(dict(
        params_before={k: as_list(v) for k, v in before.items()},
        noise=noise,
        grads=grads,
        params_after={k: as_list(v) for k, v in tensors(model).items()},
        hess_after=split(group["hess"], model),
        momentum_after=split(group["momentum"], model),
    ))

  hp_json = dict(hp, clip_radius=None if math.isinf(hp["clip_radius"]) else hp["clip_radius"])
  data = dict(
      setting=name,
      reference=f"ivon-opt {getattr(ivon, '__version__', '0.1.3')}, torch {torch.__version__}, float64",
      hyperparameters=hp_json,  # clip_radius null means inf
      param_names=list(before),
      steps=steps,
  )
  path = os.path.join(HERE, f"ivon_{name}.json")
  with open(path, "w") as f:
    json.dump(data, f)
  print(f"wrote {path}: {STEPS} steps, final h range "
        f"[{float(group['hess'].min()):.4g}, {float(group['hess'].max()):.4g}]")


def main():
  torch.set_default_dtype(torch.float64)
  for i, (name, overrides) in enumerate(SETTINGS.items()):
    record(name, overrides, seed=i)


if __name__ == "__main__":
  main()
