"""The multi-device, multi-process runtime of training: sharded state, batches, processes.

Partitioning rules for the parameters of :mod:`jaxnll.train.model` (FSDP over ``data``, the
head and embedding split along the vocabulary over ``model``), placing and fetching arrays
across processes, and joining a :func:`jax.distributed.initialize` job.  The loss side of
scaling out (meshes, vocabulary-parallel losses) is :mod:`jaxnll.parallel`.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxnll.parallel import BATCH_SPEC, DATA, MODEL

# ----------------------------------------------------------------------------- sharded state

#: Matrices with at least this many elements are split FSDP-style over the data axis.
FSDP_MIN_SIZE = 2**14


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def partition_spec(
  path: Sequence,
  shape: Sequence[int],
  mesh: Mesh,
  *,
  data_axis: str = DATA,
  model_axis: str = MODEL,
  min_size: int = FSDP_MIN_SIZE,
) -> tuple[str | None, ...]:
  """The partitioning of one parameter (or its optimizer moments) of a :mod:`jaxnll.train.model`.

  * the token embedding ``[V, D]`` (``.../embedding``) and an untied head kernel ``[D, V]``
    (``.../head/kernel``): the vocabulary split over ``model_axis`` — the vocabulary-parallel
    loss reads the head in exactly this layout — and the other dimension over ``data_axis``;
  * every other matrix of at least ``min_size`` elements: FSDP-style, its largest dimension
    that the ``data_axis`` size divides split over ``data_axis``;
  * vectors, scalars and small matrices: replicated.

  A dimension is only split if the axis is in the mesh, has more than one device and divides
  it.

  Examples:
    >>> import jax
    >>> mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))  # only its shape is read
    >>> partition_spec(("model", "embed", "embedding"), (264, 128), mesh)
    ('model', 'data')
    >>> partition_spec(("model", "blocks", 0, "mlp", "up", "kernel"), (128, 384), mesh)
    (None, 'data')
    >>> partition_spec(("model", "final_norm", "scale"), (128,), mesh)
    (None,)
  """
  keys = [_key(k) for k in path]
  spec: list[str | None] = [None] * len(shape)

  def fits(axis, dim):
    size = mesh.shape.get(axis, 1)
    return size > 1 and shape[dim] % size == 0

  vocab_dim = None
  if keys and keys[-1] == "embedding" and len(shape) == 2:
    vocab_dim = 0
  elif len(keys) >= 2 and keys[-2:] == ["head", "kernel"] and len(shape) == 2:
    vocab_dim = 1
  if vocab_dim is not None:
    if fits(model_axis, vocab_dim):
      spec[vocab_dim] = model_axis
    if fits(data_axis, 1 - vocab_dim):
      spec[1 - vocab_dim] = data_axis
  elif len(shape) >= 2 and math.prod(shape) >= min_size:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if fits(data_axis, dim):
        spec[dim] = data_axis
        break
  return tuple(spec)


def annotate_partitioning(module, mesh: Mesh, **rules):
  """Writes Flax partitioning metadata (``out_sharding``) on every variable of ``module``.

  Works on a model or on a whole training state (a :class:`jaxnll.train.Trainer`: the
  optimizer's moments get the layout of their parameter, since the rules read the path's end).
  ``rules``: keyword arguments of :func:`partition_spec`.  Returns ``module``.
  """
  from flax import nnx

  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Variable):
      shape = np.shape(node.get_value())
      node.set_metadata(out_sharding=partition_spec(path, shape, mesh, **rules))
  return module


def state_shardings(state, mesh: Mesh):
  """:class:`jax.sharding.NamedSharding` for each leaf of an ``nnx`` state, from its
  partitioning metadata (replicated where there is none)."""
  from flax import nnx

  return nnx.get_named_sharding(state, mesh)


def place(tree, shardings):
  """Puts host (or single-device) arrays on ``shardings``; with several processes each one
  transfers only the shards of its own devices (every process must pass the same values)."""

  def put(x, sharding):
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def abstract(tree, shardings):
  """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (a restore target for orbax: the
  checkpoint is read straight into this layout, whatever layout wrote it)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
  )


# ----------------------------------------------------------------------------- batches


def process_rows(mesh: Mesh, rows: int, spec=BATCH_SPEC, *, axis: int = 1) -> slice:
  """The rows (along batch ``axis``) of a global batch that this process's devices hold."""
  shape = [1] * (len(spec) if len(spec) > axis else axis + 1)
  shape[axis] = rows
  index = NamedSharding(mesh, spec).addressable_devices_indices_map(tuple(shape))
  starts = [idx[axis].start or 0 for idx in index.values()]
  stops = [rows if idx[axis].stop is None else idx[axis].stop for idx in index.values()]
  return slice(min(starts), max(stops))


def global_batch(batch: dict, mesh: Mesh, spec=BATCH_SPEC, *, axis: int = 1) -> dict:
  """A global batch (host arrays of the *global* shape, e.g. ``[K, B/K, T]``) as arrays
  sharded by ``spec``: each process feeds only its slice of the rows
  (:func:`process_rows`), as ``jax.make_array_from_process_local_data`` expects."""
  sharding = NamedSharding(mesh, spec)
  out = {}
  for name, x in batch.items():
    x = np.asarray(x)
    if jax.process_count() == 1:
      out[name] = jax.device_put(x, sharding)
      continue
    mine = process_rows(mesh, x.shape[axis], spec, axis=axis)
    local = x[(slice(None),) * axis + (mine,)]
    out[name] = jax.make_array_from_process_local_data(sharding, local, x.shape)
  return out


def fetch(tree):
  """Host NumPy copies of (possibly multi-process) arrays: the full value on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


# ----------------------------------------------------------------------------- processes

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto: bool = False,
  local_device_ids: Sequence[int] | None = None,
  timeout: int = 300,
) -> bool:
  """Joins this process to a multi-process JAX job (:func:`jax.distributed.initialize`).

  The coordinator address, process count and process id come from the arguments, else from
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``; with ``auto``
  (and none of them) JAX detects them itself on Cloud TPU slices, SLURM, Open MPI and other
  clusters it knows.  CPU processes exchange collectives through gloo.  Must run before
  anything touches a device.

  Returns:
    True if a multi-process job was joined, False for a single process (nothing to do).
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if not explicit and not auto:
    return False
  if num_processes == 1 and not auto:
    return False
  if explicit and (coordinator is None or num_processes is None or process_id is None):
    raise ValueError(
      "a multi-process run needs the coordinator address, the process count and this "
      f"process's id (got {coordinator!r}, {num_processes!r}, {process_id!r}); pass all three "
      f"or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}"
    )
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator,
    num_processes=num_processes,
    process_id=process_id,
    local_device_ids=local_device_ids,
    initialization_timeout=timeout,
  )
  return True


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (a no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- stopping


class StopRequest:
  """SIGINT and SIGTERM as a request to stop at the next safe point (a context manager).

  Inside the ``with`` block the handlers of both signals only record the first signal: they
  never raise into the code that runs, so a step, its record and its checkpoint are never cut
  in the middle; the run loop asks :meth:`requested` between steps. Once the loop runs
  (:attr:`patient` set), a second signal (Ctrl-C twice, or SIGTERM again) only says on stderr
  that the step in flight and the checkpoint of the committed step are being finished (about a
  second); a third raises :class:`KeyboardInterrupt` at once (the previous checkpoint then
  stays; an unfinished one is never read back). Before the loop runs (set-up, compilation)
  nothing is at stake and a second signal raises at once. Outside the main thread (no signal
  handlers there) nothing is installed. The previous handlers come back on exit.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self.count = 0
    """Signals received so far."""
    self.patient = False
    """Set by the run loop: a second signal waits for the committed step's checkpoint."""
    self._agreed = False
    self._previous: dict = {}

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    self.count += 1
    if self.count == 1:
      self.signum = signum
      return
    if self.count == 2 and self.patient:
      name = signal.Signals(signum).name
      # os.write: print() could re-enter a write the interrupted code is doing.
      os.write(
        2,
        f"jaxnll: {name} again: finishing the step in flight and saving its checkpoint "
        "(about a second); once more to quit at once (the previous checkpoint stays)\n".encode(),
      )
      return
    raise KeyboardInterrupt

  @property
  def aborting(self) -> bool:
    """Whether a signal asked to quit at once (no new checkpoint is started)."""
    return self.count >= 3 or (self.count >= 2 and not self.patient)

  def requested(self) -> bool:
    """Whether to stop now. With several processes every process must call it at the same
    point: they agree (one collective) so that all stop after the same step."""
    local = self.signum is not None
    if jax.process_count() > 1 and not self._agreed:
      from jax.experimental import multihost_utils

      local = bool(np.any(multihost_utils.process_allgather(np.int32(local))))
    self._agreed = self._agreed or local
    return self._agreed

  @property
  def name(self) -> str | None:
    """``"SIGINT"`` / ``"SIGTERM"`` once stopping (``"signal"``: another process's), else None."""
    if self.signum is not None:
      return signal.Signals(self.signum).name
    return "signal" if self._agreed else None
