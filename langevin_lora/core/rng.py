"""Explicit per-device noise generators (never the global RNG).

One :class:`torch.Generator` per device, all seeded from one integer. Under data parallelism
every replica must draw identical noise for the same tensor, so an unseeded stream takes its
seed from rank 0 when ``torch.distributed`` is initialised. States are saved and restored so a
resumed run continues bitwise identically.

Large CPU draws are split into :data:`CPU_STREAMS` fixed chunks, each filled by its own generator,
on up to ``torch.get_num_threads()`` threads: torch's CPU generator fills a tensor on one thread
(under a lock), which would make the noise the serial bottleneck of a step whose arithmetic runs
on every core. The chunking depends only on the size of the draw, never on the thread count, so
results are identical on any machine.
"""
from __future__ import annotations

import hashlib
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from langevin_lora._validation import check_int
from langevin_lora.core.sharding import any_marked, spec_of

#: CPU draws of at least this many numbers are split into :data:`CPU_STREAMS` chunks.
PARALLEL_MIN_NUMEL = 1 << 18
#: Number of independent generators (streams) per CPU device for large draws.
CPU_STREAMS = 8

_POOL: tuple[ThreadPoolExecutor, int] | None = None   # (pool, its number of workers)


def _stream_seed(seed: int, stream: int) -> int:
    """Seed of stream ``stream`` >= 1, derived from ``seed`` by a hash (decorrelated streams)."""
    digest = hashlib.blake2b(f"langevin-lora:{seed}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1   # torch seeds are < 2**64; keep it non-negative


def _broadcast_seed(seed: int) -> int:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        t = torch.tensor([seed], dtype=torch.int64, device=device)
        dist.broadcast(t, src=0)
        seed = int(t.item())
    return seed


class NoiseGenerators:
    """A lazily built ``torch.Generator`` per device, seeded from ``seed``.

    Args:
        seed: non-negative integer. ``None`` draws one from the operating system's entropy,
            shared from rank 0 when ``torch.distributed`` is initialised.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = check_int("seed", seed, low=0, allow_none=True)
        self._initial_seed = self.seed
        self._generators: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, torch.Tensor] = {}

    def _ensure_seed(self) -> int:
        if self.seed is None:
            self.seed = _broadcast_seed(secrets.randbits(62))
        return self.seed

    def get(self, device: torch.device | str, stream: int = 0) -> torch.Generator:
        """The generator of ``device``; ``stream`` >= 1 are the extra CPU streams of large draws."""
        key = str(torch.device(device)) + (f"#{stream}" if stream else "")
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=str(torch.device(device)))
            seed = self._ensure_seed()
            gen.manual_seed(_stream_seed(seed, stream) if stream else seed)
            if key in self._pending_states:
                gen.set_state(self._pending_states.pop(key))
            self._generators[key] = gen
        return gen

    def reset(self) -> None:
        """Back to the constructor's seed (a new OS seed if it was ``None``), as if just built."""
        self.seed = self._initial_seed
        self._generators.clear()
        self._pending_states = {}

    def state_dict(self) -> dict[str, Any]:
        states = {key: gen.get_state() for key, gen in self._generators.items()}
        states.update({k: v for k, v in self._pending_states.items() if k not in states})
        return {"seed": self.seed, "states": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self._generators.clear()
        # Restored lazily: the device of a state is only known when a tensor asks for it.
        self._pending_states = {k: v.clone() for k, v in state["states"].items()}


class NoiseBuffer:
    """Storage reused by :func:`draw_standard_normal` from one step to the next.

    The per-tensor views of each (device, dtype) bucket are built once for a given list of tensors
    (identified by their ``id`` and shape) and refilled in place at every draw, so a step with
    hundreds of adapter tensors pays one ``normal_`` per bucket and no per-tensor Python work. The
    views returned by a draw are valid until the next draw through the same buffer: a sampler
    consumes its noise within the step. The numbers are those of a fresh draw (``torch.randn`` is
    ``empty().normal_()`` on every backend), so using a buffer never changes a chain.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._flats: list[tuple[torch.Tensor, torch.device]] = []
        self._views: list[torch.Tensor] = []

    def views(self, tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> tuple[list, list[torch.Tensor]]:
        specs = [spec_of(t) for t in tensors] if any_marked() else [None] * len(tensors)
        key = tuple((id(t), t.shape, dt, id(s)) for t, dt, s in zip(tensors, dtypes, specs))
        if key != self._key:
            self._flats, self._views = _plan(tensors, dtypes, specs)
            self._key = key
        return self._flats, self._views


def _plan(tensors: list[torch.Tensor], dtypes: list[torch.dtype], specs: list) -> tuple[list, list[torch.Tensor]]:
    """One flat buffer per (device, dtype) bucket, in order of first appearance, and a view of it
    shaped like each tensor (tensors of a bucket are laid out in their order). A local shard
    (:func:`langevin_lora.core.sharding.spec_of`) takes the room of its *unsharded* tensor, and its view is
    its slice of that room: every rank draws what one device would and keeps its shard's numbers."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (t, dt) in enumerate(zip(tensors, dtypes)):
        buckets.setdefault((t.device, dt), []).append(i)
    flats, out = [], [None] * len(tensors)
    for (device, dtype), idx in buckets.items():
        shapes = [tensors[i].shape if specs[i] is None else specs[i].global_shape for i in idx]
        sizes = [s.numel() for s in shapes]
        flat = torch.empty(sum(sizes), device=device, dtype=dtype)
        flats.append((flat, device))
        for i, chunk, shape in zip(idx, torch.split(flat, sizes), shapes):
            view = chunk.view(shape)
            out[i] = view if specs[i] is None else view[specs[i].slices]
    return flats, out  # type: ignore[return-value]


def draw_standard_normal(tensors: list[torch.Tensor], generators: NoiseGenerators,
                         dtypes: list[torch.dtype] | None = None,
                         buffer: NoiseBuffer | None = None) -> list[torch.Tensor]:
    """One :math:`N(0, I)` draw shaped like each tensor.

    A local shard of a sharded parameter (:mod:`langevin_lora.core.sharding`) receives its slice of the draw
    its unsharded tensor would receive, so the chain is the same on one device, under DDP and under FSDP.

    Tensors are drawn in order, one fill per (device, dtype) bucket, then split, so the
    single-tensor and foreach update paths consume the same noise and a bucket costs one kernel
    launch instead of one per tensor. With a :class:`NoiseBuffer` the storage and views are reused
    (valid until its next draw); without one, every call returns fresh tensors.
    """
    dtypes = dtypes or [t.dtype for t in tensors]
    flats, views = (buffer or NoiseBuffer()).views(tensors, dtypes)
    for flat, device in flats:
        _fill_standard_normal(flat, generators, device)
    return list(views)


def _fill_standard_normal(flat: torch.Tensor, generators: NoiseGenerators, device: torch.device) -> None:
    if device.type != "cpu" or flat.numel() < PARALLEL_MIN_NUMEL:
        flat.normal_(generator=generators.get(device))
        return
    chunks = torch.tensor_split(flat, CPU_STREAMS)
    gens = [generators.get(device, k) for k in range(CPU_STREAMS)]
    workers = min(CPU_STREAMS, torch.get_num_threads())
    if workers == 1:
        for chunk, gen in zip(chunks, gens):
            chunk.normal_(generator=gen)
    else:   # torch releases the GIL inside normal_, and each stream has its own lock
        global _POOL
        if _POOL is None or _POOL[1] < workers:   # torch.set_num_threads was raised: grow the pool
            if _POOL is not None:
                _POOL[0].shutdown(wait=False)
            _POOL = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="langevin-noise"), workers)
        list(_POOL[0].map(lambda cg: cg[0].normal_(generator=cg[1]), zip(chunks, gens)))
