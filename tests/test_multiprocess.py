"""Multi-process training: `jaxnll train` as two cooperating processes on loopback.

Two processes with two CPU devices each join one JAX job (``jax.distributed``, gloo
collectives) and train on a ``data=2,model=2`` mesh, each feeding its half of every global
batch; their losses must equal those of one process with one device, and their checkpoint
(written once) must restore onto a different device count.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from conftest import xla_flags
from flax import nnx

from jaxnll import cli, parallel, train
from jaxnll.train import data as data_lib
from jaxnll.train import loop, runtime

TIMEOUT_S = 120  # a guard against a hung collective; the test takes far less
ARGS = [
  "--d-model", "16", "--layers", "1", "--batch-size", "8", "--pack", "--fused",
  "--steps", "3", "--eval-every", "0", "--table-rows", "0", "--no-progress",
]  # fmt: skip


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(argv_per_process, env, cwd):
  procs = []
  try:
    for argv in argv_per_process:
      procs.append(
        subprocess.Popen(
          [sys.executable, "-m", "jaxnll.cli", *argv],
          env=env,
          cwd=cwd,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
          start_new_session=True,  # its own process group: killed as a whole on failure
        )
      )
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    for p in procs:
      out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      outputs.append(out)
    return [p.returncode for p in procs], outputs
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _losses(run_dir):
  return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_two_processes_give_the_single_process_losses(tmp_path):
  data = str(tmp_path / "small.jsonl")
  data_lib.write_jsonl(data_lib.embedded_examples("all")[::70], data)  # 50 samples
  multi = str(tmp_path / "multi")
  port = _free_port()
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=xla_flags(2),
    PYTHONUNBUFFERED="1",
  )
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  common = ["train", "--data", data, "--out", multi, *ARGS, "--mesh", "data=2,model=2"]
  distributed = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
  codes, outputs = _launch(
    [[*common, *distributed, "--process-id", str(i)] for i in range(2)], env, str(tmp_path)
  )
  assert codes == [0, 0], "\n\n".join(outputs)
  assert "4 device(s) (mesh data=2,model=2, 2 processes)" in outputs[0], outputs[0]
  assert outputs[1].strip() == "" or "held-out" not in outputs[1]  # only process 0 reports

  # The same run in this process, on one device.
  single = str(tmp_path / "single")
  one = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  args = cli.build_parser().parse_args(["train", "--data", data, "--out", single, *ARGS])
  config = _config(args)
  train.fit(config, single, progress=False, log=lambda s: None, mesh=one)
  np.testing.assert_allclose(_losses(multi), _losses(single), rtol=2e-6)
  assert len(_losses(multi)) == 3

  # The two-process checkpoint restores onto another device count (here 8 devices, sharded
  # data=4,model=2) and holds the single-process parameters.
  restored = []
  for run_dir, mesh in ((multi, parallel.make_mesh("data=4,model=2")), (single, one)):
    trainer = train.build_trainer(config)
    runtime.annotate_partitioning(trainer, mesh)
    _, state = nnx.split(trainer)
    target = runtime.abstract(state, runtime.state_shardings(state, mesh))
    step, state = train.restore_state(os.path.join(run_dir, "checkpoints"), target)
    assert step == 3
    restored.append(state)
  embedding = restored[0]["model"]["embed"]["embedding"][...]
  assert embedding.sharding.spec == jax.sharding.PartitionSpec("model", "data")
  for got, want in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(restored[1]), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)


def _config(args):
  """The RunConfig that `jaxnll train` builds from ``args`` (same code path as the CLI)."""
  captured = {}
  real_fit = loop.fit
  try:
    loop.fit = lambda config, *a, **k: captured.setdefault("config", config)
    cli._run_train(args)
  finally:
    loop.fit = real_fit
  return captured["config"]
