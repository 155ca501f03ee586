"""Several processes, one mesh: joining the job, host data to global arrays and back, and the host channel
that carries process 0's decisions to the others.

In a job of several processes (one per host, or one per GPU) every process runs the same program over a
mesh of every process's devices (``jax.devices()``); each one holds and computes only its own devices'
shards. Host data a program reads must then be the same on every process, and the arrays it returns are
read back on each of them.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

_JOINED: Optional[tuple] = None  # (coordinator_address, num_processes, process_id) this process joined


def check_distributed_args(coordinator_address, num_processes, process_id) -> None:
    """Raise ValueError naming the first unusable value: all three are given together, the address is
    host:port, 0 <= process_id < num_processes."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    missing = [k for k, v in given.items() if v is None]
    if missing and len(missing) < 3:
        raise ValueError(f"a job of several processes needs coordinator_address, num_processes and process_id "
                         f"together; {', '.join(missing)} missing")
    if len(missing) == 3:
        return
    host, sep, port = str(coordinator_address).rpartition(":")
    if not isinstance(coordinator_address, str) or not sep or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address must be host:port (process 0's address, e.g. 10.0.0.1:1234), "
                         f"got {coordinator_address!r}")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be an integer in [0, {num_processes}) for num_processes={num_processes}, "
                         f"got {process_id!r}")


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join a job of ``num_processes`` processes (``jax.distributed.initialize``); process 0 also runs the
    coordinator at ``coordinator_address``. Must run before anything touches a device. Calling it again with
    the same values does nothing; other values raise ValueError (a process belongs to one job)."""
    global _JOINED
    check_distributed_args(coordinator_address, num_processes, process_id)
    wanted = (coordinator_address, num_processes, process_id)
    if _JOINED is not None or jax.distributed.is_initialized():
        joined = _JOINED or (None, jax.process_count(), jax.process_index())
        if joined[1:] != wanted[1:] or joined[0] not in (None, wanted[0]):
            raise ValueError(f"this process already joined a job as process {joined[2]} of {joined[1]}"
                             + (f" at {joined[0]}" if joined[0] else "") + f"; it cannot join {wanted}")
        _JOINED = wanted
        return
    # CPU devices of different processes talk through gloo (JAX's default since 0.4.3x, None before); only
    # the CPU client reads it, so it is harmless on GPU hosts.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The preemption service (checkpoint-on-preemption sync points, which serving does not use) would catch
    # SIGTERM, the signal a server is stopped with.
    if hasattr(jax.config, "jax_enable_preemption_service"):
        jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    except RuntimeError as e:
        if "before" in str(e):  # JAX's devices are in use already
            raise ValueError("jax.distributed must be initialised before anything touches a device: build the "
                             "engine (or call sharding.distributed.initialize) before any other JAX call in this "
                             f"process ({e})") from e
        raise
    _JOINED = wanted


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def put(x, sharding) -> jax.Array:
    """Host data -> an array placed by ``sharding`` (a Sharding or a Device). With devices of other processes
    in ``sharding``, ``x`` must be the same on every process; each one builds only its own devices' shards
    (``jax.device_put`` would first compare every process's copy, a collective on every call)."""
    if (not isinstance(sharding, jax.sharding.Sharding) or sharding.is_fully_addressable
            or (isinstance(x, jax.Array) and not x.is_fully_addressable)):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def fetch(x: jax.Array) -> np.ndarray:
    """An array as numpy on this process. An array split over other processes' devices is gathered first:
    a collective, so every process reads the same arrays in the same order."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def smallest(value: int) -> int:
    """The smallest of every process's ``value``: a collective, so every process calls it at the same point."""
    from jax.experimental import multihost_utils
    return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int32))))


class HostBroadcast:
    """Messages (bytes) from process 0 to every other process, received in the order sent.

    Through the coordinator's key-value store rather than a device collective: a collective queues behind
    the step running on the device, so the host would wait for that step and lose its one-step lead. One
    ``HostBroadcast`` per ``name``; every process makes the same calls (process 0 ``send``, the others
    ``receive``)."""

    # Messages kept before process 0 deletes those every process has read (they acknowledge every ACK_EVERY).
    ACK_EVERY = 32

    def __init__(self, name: str):
        from jax._src import distributed  # the coordinator's client; there is no public handle to it

        self._client = getattr(getattr(distributed, "global_state", None), "client", None)
        if self._client is None:
            raise ValueError("HostBroadcast needs jax.distributed to be initialised (sharding.distributed.initialize)")
        self._prefix = f"slora_jax/{name}/"
        self._seq = 0
        self._deleted = 0  # process 0: messages below this are gone
        self._pid, self._n = jax.process_index(), jax.process_count()

    @property
    def is_source(self) -> bool:
        return self._pid == 0

    def send(self, data: bytes) -> None:
        assert self.is_source, "only process 0 sends"
        self._client.key_value_set_bytes(f"{self._prefix}{self._seq}", data)
        self._seq += 1
        if self._seq % self.ACK_EVERY == 0:
            self._forget_read()

    def receive(self, poll_s: float = 60.0) -> bytes:
        """The next message; waits for it as long as it takes (process 0 may be idle for hours between
        requests). Raises when the coordinator is gone."""
        key = f"{self._prefix}{self._seq}"
        while True:
            try:
                data = self._client.blocking_key_value_get_bytes(key, int(poll_s * 1000))
                break
            except Exception as e:  # noqa: BLE001 - the client raises one runtime error type for all failures
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
        self._seq += 1
        if self._seq % self.ACK_EVERY == 0:
            self._client.key_value_set(f"{self._prefix}read/{self._pid}", str(self._seq), allow_overwrite=True)
        return data

    def _forget_read(self) -> None:
        """Delete the messages every other process has acknowledged reading (the store would grow without end)."""
        upto = self._seq
        for pid in range(1, self._n):
            try:
                upto = min(upto, int(self._client.key_value_try_get(f"{self._prefix}read/{pid}")))
            except Exception:  # noqa: BLE001 - not acknowledged anything yet
                return
        for seq in range(self._deleted, upto):
            self._client.key_value_delete(f"{self._prefix}{seq}")
        self._deleted = max(self._deleted, upto)

