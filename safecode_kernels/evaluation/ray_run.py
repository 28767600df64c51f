"""The generation run of an evaluation spread over Ray workers (``safecode-kernels eval --ray``),
with the same ``generations.jsonl`` as :func:`.run.run_eval` in one process.

:func:`run_eval_ray` is the driver. It checks the arguments and the run folder exactly as
:func:`.run.run_eval` does (``run.json``, the folder lock, the samples already done), cuts the
pending samples into batches of ``batch_size`` as :func:`.run.run_eval` does, and makes of them
a Ray Data data set, one row per batch. ``map_batches`` sends the rows to a fixed pool of
``workers`` :class:`GenerateBatches` actors; each actor loads the model once (the ``load``
callable, run on the worker) and turns each batch into its lines with
:func:`.run.batch_runner`, the code :func:`.run.run_eval` runs. The driver appends the lines of
each batch to ``generations.jsonl`` as the batches stream back (one synced write per batch, in
the order they finish), so resuming, ``score`` and ``report`` work unchanged. Each line also
records the worker that wrote it: ``"worker": {"node": <Ray node id>, "host": <host name>,
"pid": <process id>}``. Through Ray Client (``ray://``), where Ray Data does not run, the data
set runs in a :class:`_ClusterDriver` actor on the cluster, which passes the lines back.

The answers equal those of the single-process run whatever worker gets whatever batch: decoding
is greedy and each sample's noised image has its own seed (:func:`.run.sample_seed`).

Failures:

- A worker process that dies (killed, out of memory, a crashed node) is restarted by Ray and its
  batch is given again (``max_restarts``, ``max_task_retries``); a batch that kills its worker
  more than ``max_task_retries`` times stops the run (:class:`RayRunError`).
- A sample that fails on its own (an unreadable image, its judge answer, the decoder) is a line
  with its ``error``, as in the single-process run.
- What stops the single-process run stops this one, raised on the driver with its own type: a
  judge that is down (``JudgeError``), a model that does not load on a worker, too many failures
  in a row (:class:`.run.RunAborted`). The batches written before stay.
- The driver dying (``kill -9``) loses at most the batches in flight (one being generated per
  worker, and any finished but not yet written): the same command resumes and generates them.
  Ctrl-C stops once the next batch is written.

Ray is imported only here, and only when a run starts: without it, :func:`import_ray` raises an
``ImportError`` naming the extra to install (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import pickle
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from .run import (
    _check_arguments,
    _folder_lock,
    _loop,
    _open_run,
    batch_runner,
    check_recipe,
)
from .samples import Sample

#: How to install what ``--ray`` needs.
RAY_EXTRA = 'pip install -e ".[ray]"'
#: The object store of a Ray instance started here: the rows are batches of sample references
#: (the workers read the images themselves), so a small store is plenty.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
#: Seconds the whole pool of workers may take to start (load the model) before the run fails.
POOL_START_TIMEOUT_S = 600


class RayRunError(RuntimeError):
    """Ray could not finish the run: a batch whose worker kept dying, a lost cluster, a worker
    error that could not be sent back whole (the message holds its traceback)."""


def import_ray():
    """The ``ray`` module with Ray Data; ``ImportError`` naming the extra when it is missing."""
    try:
        import ray
        import ray.data  # noqa: F401 - the data library is a part of the extra
    except ImportError as err:
        raise ImportError(
            f"running on Ray needs Ray Data, an optional extra: {RAY_EXTRA} "
            f"(or pip install 'ray[data]'); import failed: {err}"
        ) from err
    return ray


# ----- the worker -------------------------------------------------------------------------------
class GenerateBatches:
    """The Ray Data actor of :func:`run_eval_ray`: one per worker process, for the whole run.

    ``__init__`` calls ``load()`` (on the worker), which returns ``(model, processor)`` or
    ``(model, processor, judge)``, and builds :func:`.run.batch_runner` on it. ``__call__`` takes
    a Ray Data batch ``{"samples": [JSON list of Sample.to_dict(), ...]}`` (each row one batch of
    the run) and returns ``{"records": [JSON list of lines, ...], "fatal": [b"" or the pickled
    exception that stops the run, ...]}``. Samples whose image lives in a hub data set
    (``hf://...``) are taken from ``reopen()``, called once on the worker.

    An error while loading is kept and returned with every batch, so that the driver raises it
    with its type (a Ray actor that fails in its constructor would only be reported as dead).
    """

    def __init__(self, load: Callable, settings: dict, noise_std: float, reopen: Callable | None = None):
        self.worker = _worker_identity()
        self.runner = self.failure = self._hub = None
        self._reopen = reopen
        try:
            loaded = tuple(load())
            if len(loaded) not in (2, 3):
                raise TypeError(
                    f"load() must return (model, processor) or (model, processor, judge), got {len(loaded)} values"
                )
            model, processor, judge = (*loaded, None)[:3]
            self.runner = batch_runner(model, processor, settings, judge, noise_std)
        except Exception as err:  # noqa: BLE001 - reported on the driver with the first batch
            self.failure = err

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        records, fatal = [], []
        for text in batch["samples"]:
            try:
                if self.failure is not None:
                    raise self.failure
                lines = self.runner.run([self._sample(d) for d in json.loads(text)])
                records.append(
                    json.dumps([{**line, "worker": self.worker} for line in lines], ensure_ascii=False, allow_nan=False)
                )
                fatal.append(b"")
            except Exception as err:  # noqa: BLE001 - what stops the run, sent to the driver whole
                records.append("[]")
                fatal.append(_pack_error(err, self.worker))
        return {"records": np.array(records, dtype=object), "fatal": np.array(fatal, dtype=object)}

    def _sample(self, d: dict) -> Sample:
        sample = Sample.from_dict(d)
        if not sample.image.startswith("hf://") or self._reopen is None:
            return sample
        if self._hub is None:  # the hub data set, opened on this worker
            self._hub = {s.id: s for s in self._reopen()}
        return self._hub.get(sample.id, sample)  # an id it lacks: that sample's image error


def _worker_identity() -> dict:
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return {"node": node, "host": socket.gethostname(), "pid": os.getpid()}


def _pack_error(err: BaseException, worker: dict) -> bytes:
    """``err`` for the driver: its class (by reference), ``args`` and attributes, with where it
    happened and its traceback. Rebuilt without calling ``__init__``, so that exception classes
    with required arguments (``JudgeHTTPError(message, status)``) keep their type."""
    try:
        state = pickle.dumps((type(err), err.args, dict(vars(err))))
        pickle.loads(state)  # the driver can rebuild it only if this works here
    except Exception:  # noqa: BLE001 - an attribute that does not pickle: sent as text
        state = None
    return pickle.dumps(
        {
            "state": state,
            "summary": f"{type(err).__name__}: {err}",
            "where": f"on Ray worker {worker['host']} pid {worker['pid']}",
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
        }
    )


def _unpack_error(data: bytes) -> BaseException:
    """The exception :func:`_pack_error` sent (a :class:`RayRunError` holding its text when it
    cannot be rebuilt), with notes naming the worker and holding its traceback there."""
    info = pickle.loads(data)
    try:
        cls, args, attrs = pickle.loads(info["state"])
        err = cls.__new__(cls, *args)
        err.args = args
        err.__dict__.update(attrs)
    except Exception:  # noqa: BLE001
        err = RayRunError(f"{info['summary']} ({info['where']})")
    if hasattr(err, "add_note"):  # Python 3.11+
        err.add_note(info["where"])
        err.add_note(f"traceback there:\n{info['traceback'].rstrip()}")
    return err


# ----- the driver -------------------------------------------------------------------------------
def run_eval_ray(
    load: Callable,
    samples: Sequence[Sample],
    out_dir,
    *,
    workers: int = 1,
    address: str | None = None,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    method: str = "safecode",
    recipe: str = "paper",
    verdict: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    seed: int = 0,
    steer_steps: int = 5,
    noise_std: float = 0.1,
    config: dict | None = None,
    progress: bool = True,
    retry_errors: bool = False,
    max_consecutive_errors: int = 16,
    reopen: Callable | None = None,
    max_restarts: int = -1,
    max_task_retries: int = 3,
) -> dict:
    """:func:`.run.run_eval` on a pool of ``workers`` Ray actors (see the module doc).

    Args:
        load: a picklable callable without arguments, run once on each worker, returning
            ``(model, processor)`` or ``(model, processor, judge)`` (the judge is asked with
            ``verdict="auto"``). What it reads (a model folder) must be readable on every worker.
        samples, out_dir, method, recipe, verdict, batch_size, max_new_tokens, seed, steer_steps,
            noise_std, config, progress, retry_errors, max_consecutive_errors: as
            :func:`.run.run_eval`; ``run.json`` is the same, so a folder may be resumed with or
            without Ray. With ``verdict="auto"``, ``config["judge"]`` should describe the judge
            that ``load`` makes (it is what ``run.json`` records).
        workers: actors in the pool, each with ``gpus_per_worker`` GPUs and ``cpus_per_worker``
            CPUs reserved (fractions allowed, as Ray takes them).
        address: ``None``: the Ray session already open in this process, else a new local Ray
            instance sized for the pool (``workers * cpus_per_worker`` CPUs; it is shut down at the
            end); ``"auto"`` or ``"ray://host:port"``: join that cluster. An open session is used
            as it is, whatever ``address``.
        reopen: a picklable callable without arguments returning the samples again, called once
            on a worker that meets a sample whose image lives in a hub data set (``hf://``,
            HADES and MSTS); needed for such samples.
        max_restarts, max_task_retries: how often Ray restarts a dead worker (-1: always) and
            gives its batch again, per batch.

    Returns the summary of :func:`.run.run_eval`; ``workers`` counts the distinct worker
    processes that wrote lines.

    Raises what :func:`.run.run_eval` raises (the errors of a worker with their own type, a note
    naming the worker), ``ImportError`` without Ray (naming the extra), :class:`RayRunError`
    when Ray cannot finish the run.
    """
    samples = list(samples)
    settings = _check_arguments(
        samples, method, recipe, verdict, batch_size, max_new_tokens, seed, steer_steps, max_consecutive_errors, config
    )
    _check_pool(workers, gpus_per_worker, cpus_per_worker, max_restarts, max_task_retries)
    if not callable(load):
        raise TypeError(f"load must be a callable returning (model, processor[, judge]), got {type(load).__name__}")
    if reopen is None and any(s.image.startswith("hf://") for s in samples):
        raise ValueError(
            "these samples read their images from a hub data set: give reopen, a callable that loads "
            "them again on a worker (e.g. functools.partial(load_benchmark, name, root, split=...))"
        )
    check_recipe(recipe)
    ray = import_ray()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out_dir):
        pending = _open_run(out_dir, samples, settings, None, noise_std, batch_size, config, retry_errors)
        if not pending:
            nothing = (lines for lines in ())
            return _loop(nothing, samples, 0, out_dir, progress, max_consecutive_errors, settings["method"])
        # One row per batch, cut as run_eval cuts them: the samples as JSON (the workers read the images).
        rows = [
            {"samples": json.dumps([s.to_dict() for s in pending[first : first + batch_size]], ensure_ascii=False)}
            for first in range(0, len(pending), batch_size)
        ]
        actor_kwargs = dict(load=load, settings=settings, noise_std=noise_std, reopen=reopen)
        pool = dict(
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
        )
        with _session(ray, address, workers, gpus_per_worker, cpus_per_worker):
            stream = _through_the_cluster if _is_ray_client(ray) else _stream
            batches = stream(ray, rows, actor_kwargs, pool)
            try:
                return _loop(
                    batches, samples, len(pending), out_dir, progress, max_consecutive_errors, settings["method"]
                )
            except ray.exceptions.RayError as err:
                raise RayRunError(
                    f"Ray could not finish the run: {_first_line(err)} (the batches written so far "
                    f"are saved in {out_dir}; the same command resumes)"
                ) from err


def _check_pool(workers, gpus_per_worker, cpus_per_worker, max_restarts, max_task_retries) -> None:
    for name, value, low, kinds in (
        ("workers", workers, 1, int),
        ("max_restarts", max_restarts, -1, int),
        ("max_task_retries", max_task_retries, -1, int),
        ("gpus_per_worker", gpus_per_worker, 0, (int, float)),
    ):
        if isinstance(value, bool) or not isinstance(value, kinds) or not value >= low:
            raise ValueError(f"{name} must be {'an int' if kinds is int else 'a number'} >= {low}, got {value!r}")
    if isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, (int, float)) or not cpus_per_worker > 0:
        raise ValueError(f"cpus_per_worker must be a number > 0, got {cpus_per_worker!r}")


@contextlib.contextmanager
def _session(ray, address, workers, gpus_per_worker, cpus_per_worker):
    """The Ray session of the run: the open one, a cluster's, or a local one sized for the pool."""
    if ray.is_initialized():
        yield
        return
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            address="local",
            num_cpus=math.ceil(workers * cpus_per_worker),
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    else:  # a cluster's own settings apply
        _join(ray, address)
    try:
        if address is None and gpus_per_worker:
            have, need = ray.cluster_resources().get("GPU", 0), workers * gpus_per_worker
            if have < need:
                raise ValueError(
                    f"{workers} workers with {gpus_per_worker:g} GPU(s) each need {need:g} GPUs; "
                    f"this machine has {have:g}"
                )
        yield
    finally:
        ray.shutdown()


def _join(ray, address: str, attempts: int = 3) -> None:
    """``ray.init(address)``; through Ray Client, tried again after a failed connection (its
    server sometimes fails to start the process that serves a new client)."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address)
            return
        except ConnectionError:
            if not address.startswith("ray://") or attempt == attempts:
                raise
            time.sleep(2.0 * attempt)


def _stream(ray, rows: list[dict], actor_kwargs: dict, pool: dict):
    """Yield the lines of each row's batch as the pool of :class:`GenerateBatches` finishes it;
    closing the generator stops the data set (the batches in flight are dropped)."""
    data = ray.data.from_items(rows, override_num_blocks=len(rows))  # one block, one task, per batch
    # A fixed pool, one batch in flight per actor: the driver dying loses at most one per worker.
    compute = ray.data.ActorPoolStrategy(size=pool["workers"], max_tasks_in_flight_per_actor=1)
    with warnings.catch_warnings():  # see _restart_args
        warnings.filterwarnings("ignore", message=r".*ray_remote_args.* deprecated")
        data = data.map_batches(
            GenerateBatches,
            batch_size=1,
            batch_format="numpy",
            compute=compute,
            fn_constructor_kwargs=actor_kwargs,
            num_cpus=pool["cpus_per_worker"],
            num_gpus=pool["gpus_per_worker"] or None,
            **_restart_args(data.map_batches, pool["max_restarts"], pool["max_task_retries"]),
        )
    data.context.enable_progress_bars = False  # the run's own bar counts the samples
    # The whole pool loads the model before the first batch is given out, so that the batches
    # spread over all workers (and a cluster too small for the pool fails instead of waiting).
    data.context.wait_for_min_actors_s = POOL_START_TIMEOUT_S
    iterator = iter(data.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))
    try:
        for out in iterator:
            for records, fatal in zip(out["records"], out["fatal"]):
                if fatal:
                    raise _unpack_error(fatal)
                yield json.loads(records)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _is_ray_client(ray) -> bool:
    try:
        from ray.util.client import ray as client
    except ImportError:
        return False
    return client.is_connected()


class _ClusterDriver:
    """Runs :func:`_stream` on the cluster for a driver connected through Ray Client
    (``ray://``), where Ray Data does not run: the client asks for one batch's lines at a time
    and writes them itself. It dies with the client's connection, and the data set with it."""

    def __init__(self, rows: list[dict], actor_kwargs: dict, pool: dict):
        import ray

        self._batches = _stream(ray, rows, actor_kwargs, pool)

    def next_batch(self):
        """``("lines", [...])``, ``("done", None)``, or ``("error", packed exception)``."""
        try:
            return "lines", next(self._batches)
        except StopIteration:
            return "done", None
        except Exception as err:  # noqa: BLE001 - sent whole, as a worker's errors are
            return "error", _pack_error(err, _worker_identity())


def _through_the_cluster(ray, rows: list[dict], actor_kwargs: dict, pool: dict):
    """:func:`_stream` for a Ray Client driver: the data set runs in a :class:`_ClusterDriver`
    actor on the cluster (no CPU reserved), and each batch's lines come back here."""
    driver = ray.remote(num_cpus=0)(_ClusterDriver).remote(rows, actor_kwargs, pool)
    try:
        while True:
            kind, value = ray.get(driver.next_batch.remote())
            if kind == "done":
                return
            if kind == "error":
                raise _unpack_error(value)
            yield value
    finally:
        ray.kill(driver)


def _restart_args(map_batches, max_restarts: int, max_task_retries: int) -> dict:
    """``max_restarts`` and ``max_task_retries`` for the actors, where ``map_batches`` takes them.

    Ray Data restarts its actors and gives their batches again by default (both unbounded); these
    bound it. Ray 2.60 deprecates Ray's remote options as keywords of ``map_batches`` (removal
    announced for 2.64) with no other way to give these two: where it takes no such keywords,
    Ray Data's defaults apply."""
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(map_batches).parameters.values()):
        return {}
    args = {"max_restarts": max_restarts}
    if max_restarts != 0:
        args["max_task_retries"] = max_task_retries
    return args


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


__all__ = ["LOCAL_OBJECT_STORE_BYTES", "RAY_EXTRA", "GenerateBatches", "RayRunError", "import_ray", "run_eval_ray"]
