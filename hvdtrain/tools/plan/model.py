"""The cost model of `hvdtrain plan`: pure formulas, no torch, no file, no clock.

Units: seconds, bytes, bytes per second. A link is (alpha, beta, gamma): alpha the latency of one
message step, beta the seconds per byte on the wire, gamma the seconds per byte reduced (0 unless
the reduction is slower than the link; a calibrated fit folds it into beta).

Collectives (p ranks = N nodes x L ranks per node, ranks numbered node by node):
- ring allreduce of n bytes: reduce-scatter then allgather, 2(p-1) steps each moving s = n/p
  bytes: 2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma. Each rank sends 2(p-1)/p n bytes.
  A flat ring that spans nodes crosses the node boundary once per node per direction, and
  every step waits for its slowest hop: a step costs max(alpha_intra + s beta_intra,
  alpha_inter + s beta_inter). The node's link carries 2(p-1)/p n bytes per allreduce.
- recursive doubling ("tree" below; the small-message algorithm of Open MPI and MPICH):
  ceil(log2 p) rounds, each exchanging the whole n bytes with one partner, plus 2 fold steps when
  p is not a power of two. Rounds with a partner on the same node use the intra link; in the
  ceil(log2 N) rounds across nodes all L ranks of a node send n bytes at once over the one node
  link (it carries L n per round).
- which one runs: the one with the smaller predicted time, per call. That is NCCL's rule (its
  tuner picks the algorithm and protocol with the least modelled time, src/graph/tuning.cc) and
  what Open MPI's fixed decision approximates (recursive doubling for small messages, ring or
  segmented ring for large ones).
- hierarchical allreduce (Horovod's HOROVOD_HIERARCHICAL_ALLREDUCE): intra-node reduce-scatter
  ((L-1) steps of n/L), an allreduce of each rank's n/L shard among the N nodes (L of them at
  once, sharing the node link: ring 2(N-1) alpha_inter + 2(N-1)/N n beta_inter, or recursive
  doubling, the cheaper), intra-node allgather. The node link carries the same 2(N-1)/N n bytes
  as a flat ring's 2(p-1)/p n (about n either way); hierarchy saves latency terms (2(N-1)
  instead of 2(p-1) steps across nodes) and slow intra hops, not bytes. On one node, or with
  one rank per node, it is the flat allreduce (Horovod ignores the setting on one node).
- fp16 compression (Horovod's Compression.fp16) halves the bytes on the wire and adds two passes
  over the fp32 gradient (compress, decompress).
- memory passes (fusion-buffer copies, the averaging scale, the MPI fallback's weighting pass,
  optimizer steps) cost bytes / memcpy bandwidth (memcpy busbw as `bench allreduce` reports it:
  bytes copied per second, each byte read and written once).

One training step (one rank's compute measured without communication: forward f, backward b,
optimizer o; `--samples-per-second` alone gives f:b = 1:2 of compute minus the optimizer):
- backward produces gradients in reverse `model.parameters()` order, its time split over them in
  proportion to their bytes (an assumption: backward FLOPs per parameter differ between conv and
  fully connected layers; bytes are what is known for any model without running it);
- `horovod`: gradients fused in backward order into buckets of up to the fusion threshold (a
  tensor larger than it goes alone), Horovod 0.28.1's default 128 MiB; each bucket's allreduce
  starts one cycle time (HOROVOD_CYCLE_TIME, 1 ms) after both its last gradient is ready and the
  previous bucket's allreduce finished (`fusion="bucket"`). `fusion="cycle"` simulates Horovod's
  background loop instead: every cycle it fuses whatever is ready (up to the threshold), which
  sends smaller, earlier messages when the link keeps up. Per op: the allreduce, the fusion copies
  in and out when more than one tensor is fused, the averaging scale, one tiny negotiation
  allreduce;
- `ddp`: the same overlap with DDP's buckets (bucket_cap_mb 25 MiB, the first bucket 1 MiB),
  each allreduce as soon as its bucket is full and the previous one is done; copies into and out
  of the bucket and the averaging scale;
- step = forward + max(backward end, last allreduce end) + optimizer; exposed communication =
  step - compute, so compute <= step <= compute + communication;
- `mpi` every k: no overlap; every k steps the weighting pass (unless the calibrated `hvdtrain-mpi`
  fit, which is FlatAverager.sync itself, already holds it), one allreduce of all parameters and one
  tiny allreduce: step = compute + sync / k. `hierarchy K_LOCAL,K_GLOBAL`: a host-level sync every
  K_LOCAL steps, and every K_GLOBAL the host sync, an allreduce among one rank per node and a
  broadcast within each node (hvdtrain.strategies.mpi_average.Hierarchy). The outer optimizer
  moves the same bytes as k plus OUTER_PASSES memory passes. Warm-up: the first W of S steps
  average gradients every step (flatten copy, allreduce, scale, copy back), then every k.
- straggler (one rank F times slower): synchronous strategies run at its pace (compute x F);
  time-based averaging (`sync_every_seconds` T) lets each rank step at its own pace and syncs
  every T seconds: samples/s = B ((p-1)/c + 1/(F c)) T / (T + sync).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

MIB = 1 << 20
HOROVOD_FUSION_BYTES = 128 * MIB
"""Horovod 0.28.1's HOROVOD_FUSION_THRESHOLD default: `SetTensorFusionThresholdBytes(128 * 1024 *
1024)` in horovod/common/operations.cc, since horovod/horovod#2468 (Nov 2020, "Changed default
cycle time from 5ms to 1ms and fusion threshold from 64MB to 128MB"); docs/tensor-fusion.rst still
said 64 MB until horovod/horovod#3241."""
HOROVOD_CYCLE_SECONDS = 1e-3
"""Horovod 0.28.1's HOROVOD_CYCLE_TIME default (1 ms; 5 ms before horovod/horovod#2468)."""
DDP_BUCKET_BYTES = 25 * MIB
"""torch DistributedDataParallel's bucket_cap_mb default."""
DDP_FIRST_BUCKET_BYTES = 1 * MIB
"""torch.distributed._DEFAULT_FIRST_BUCKET_BYTES: DDP's first bucket (the last layers) is small."""
SMALL_BYTES = 8
"""A negotiation or counts allreduce: a few numbers."""
OUTER_PASSES = 3
"""Memory passes of an outer-optimizer step: pseudo-gradient, momentum update, parameter update."""
OPTIMIZER_PASSES = 1.5
"""An SGD step's memory traffic in copies of the parameter bytes (read p and g, write p: 3n bytes
of traffic, a copy is 2n), used when the optimizer time is not measured."""


@dataclass(frozen=True)
class Link:
    """alpha: seconds per message step; beta: seconds per byte; gamma: seconds per byte reduced."""
    alpha: float
    beta: float
    gamma: float = 0.0

    @classmethod
    def from_gbit(cls, gbit: float, latency_us: float, efficiency: float = 1.0, gamma: float = 0.0) -> "Link":
        """A link of `gbit` Gbit/s (x `efficiency`: the share of the line rate payload gets) and
        `latency_us` per message."""
        return cls(latency_us * 1e-6, 8.0 / (gbit * 1e9 * efficiency), gamma)

    @property
    def gbit(self) -> float:
        return 8.0 / self.beta / 1e9 if self.beta > 0 else math.inf

    def floor(self, other: "Link") -> "Link":
        """The slower of two descriptions of one link, term by term (see inputs: a calibrated fit
        is what software achieves; a flag is what the wire allows; a step pays the larger)."""
        return Link(max(self.alpha, other.alpha), max(self.beta, other.beta), max(self.gamma, other.gamma))


@dataclass(frozen=True)
class Cluster:
    nodes: int
    ranks_per_node: int
    intra: Link
    inter: Link

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass(frozen=True)
class Cost:
    """One collective: seconds, bytes the busiest node link sends, the algorithm that ran."""
    seconds: float
    inter_bytes: float
    algorithm: str

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.seconds + other.seconds, self.inter_bytes + other.inter_bytes,
                    f"{self.algorithm}+{other.algorithm}")


ZERO = Cost(0.0, 0.0, "none")


# ---- collectives ---------------------------------------------------------------------------------

def ring_bytes(n: float, p: int) -> float:
    """Bytes each rank sends in a ring allreduce of n bytes over p ranks: 2(p-1)/p n."""
    return 2.0 * (p - 1) / p * n if p > 1 else 0.0


def ring_seconds(n: float, p: int, link: Link) -> float:
    """Ring allreduce over one kind of link: 2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * link.alpha + ring_bytes(n, p) * link.beta + (p - 1) / p * n * link.gamma


def tree_seconds(n: float, p: int, link: Link) -> float:
    """Recursive doubling over one kind of link: ceil(log2 p) rounds of (alpha + n beta + n gamma),
    plus 2 fold steps (alpha + n beta) when p is not a power of two."""
    if p <= 1:
        return 0.0
    rounds = math.ceil(math.log2(p))
    fold = 0 if p & (p - 1) == 0 else 2
    return rounds * (link.alpha + n * (link.beta + link.gamma)) + fold * (link.alpha + n * link.beta)


def _flat_ring(n: float, cl: Cluster) -> Cost:
    p = cl.ranks
    if p <= 1:
        return ZERO
    s = n / p
    if cl.nodes == 1:
        return Cost(ring_seconds(n, p, cl.intra), 0.0, "ring")
    hop = cl.inter.alpha + s * cl.inter.beta
    if cl.ranks_per_node > 1:
        hop = max(hop, cl.intra.alpha + s * cl.intra.beta)
    gamma = max(cl.inter.gamma, cl.intra.gamma if cl.ranks_per_node > 1 else 0.0)
    return Cost(2 * (p - 1) * hop + (p - 1) * s * gamma, ring_bytes(n, p), "ring")


def _flat_tree(n: float, cl: Cluster) -> Cost:
    p, L, N = cl.ranks, cl.ranks_per_node, cl.nodes
    if p <= 1:
        return ZERO
    intra_rounds = math.ceil(math.log2(L)) if L > 1 else 0
    inter_rounds = math.ceil(math.log2(N)) if N > 1 else 0
    fold = 0 if p & (p - 1) == 0 else 2
    seconds = intra_rounds * (cl.intra.alpha + n * (cl.intra.beta + cl.intra.gamma))
    seconds += inter_rounds * (cl.inter.alpha + L * n * cl.inter.beta + n * cl.inter.gamma)
    slow = cl.inter if N > 1 else cl.intra
    seconds += fold * (slow.alpha + n * slow.beta)
    inter_bytes = (inter_rounds * L * n + (fold * n if N > 1 else 0.0))
    return Cost(seconds, inter_bytes, "tree")


def flat_allreduce(n: float, cl: Cluster, algorithm: str = "auto") -> Cost:
    """Allreduce of n bytes over all ranks: ring or recursive doubling ("tree"), by default the
    one with the smaller predicted time (the library's choice, see the module docstring)."""
    if n <= 0 or cl.ranks <= 1:
        return ZERO
    if algorithm == "ring":
        return _flat_ring(n, cl)
    if algorithm == "tree":
        return _flat_tree(n, cl)
    return min(_flat_ring(n, cl), _flat_tree(n, cl), key=lambda c: c.seconds)


def hierarchical_allreduce(n: float, cl: Cluster) -> Cost:
    """Horovod's hierarchical allreduce: intra reduce-scatter, an allreduce of n/L per rank
    across nodes (L at once on the node link), intra allgather. Flat on one node or L = 1."""
    N, L = cl.nodes, cl.ranks_per_node
    if n <= 0 or N == 1 or L == 1:
        return flat_allreduce(n, cl)
    shard = n / L
    local = (L - 1) * (2 * (cl.intra.alpha + shard * cl.intra.beta) + shard * cl.intra.gamma)
    link = cl.inter
    ring = 2 * (N - 1) * link.alpha + ring_bytes(n, N) * link.beta + (N - 1) / N * shard * link.gamma
    rounds = math.ceil(math.log2(N))
    fold = 0 if N & (N - 1) == 0 else 2
    tree = rounds * (link.alpha + n * link.beta + shard * link.gamma) + fold * (link.alpha + n * link.beta)
    if ring <= tree:
        return Cost(local + ring, ring_bytes(n, N), "hier-ring")
    return Cost(local + tree, (rounds + fold) * n, "hier-tree")


def node_allreduce(n: float, cl: Cluster) -> Cost:
    """Allreduce among the L ranks of one node (every node at once, each on its own)."""
    return flat_allreduce(n, Cluster(1, cl.ranks_per_node, cl.intra, cl.inter))


def leaders_allreduce(n: float, cl: Cluster) -> Cost:
    """Allreduce among one rank per node (the node link is theirs alone)."""
    return flat_allreduce(n, Cluster(cl.nodes, 1, cl.intra, cl.inter))


def node_broadcast(n: float, cl: Cluster) -> Cost:
    """Broadcast of n bytes within each node: binomial tree (ceil(log2 L) rounds of n) or
    scatter + ring allgather (log2 L + L - 1 steps, 2 (L-1)/L n bytes), the cheaper."""
    L, link = cl.ranks_per_node, cl.intra
    if L <= 1 or n <= 0:
        return ZERO
    rounds = math.ceil(math.log2(L))
    binomial = rounds * (link.alpha + n * link.beta)
    scatter = (rounds + L - 1) * link.alpha + 2.0 * (L - 1) / L * n * link.beta
    return Cost(min(binomial, scatter), 0.0, "bcast")


def small_allreduce(cl: Cluster) -> Cost:
    return flat_allreduce(SMALL_BYTES, cl)


# ---- compute and the model --------------------------------------------------------------------

@dataclass(frozen=True)
class Compute:
    """One rank's step without communication, in seconds, and its batch size."""
    forward: float
    backward: float
    optimizer: float
    batch_size: int

    @property
    def step(self) -> float:
        return self.forward + self.backward + self.optimizer

    @property
    def samples_per_second(self) -> float:
        return self.batch_size / self.step

    def scaled(self, factor: float) -> "Compute":
        return replace(self, forward=self.forward * factor, backward=self.backward * factor,
                       optimizer=self.optimizer * factor)

    @classmethod
    def from_rate(cls, samples_per_second: float, batch_size: int, optimizer: float = 0.0) -> "Compute":
        """From one rank's samples/s: the optimizer step as given (at most half the step), the
        rest split forward:backward = 1:2 (backward computes two products per forward one)."""
        step = batch_size / samples_per_second
        optimizer = min(optimizer, step / 2)
        rest = step - optimizer
        return cls(rest / 3, 2 * rest / 3, optimizer, batch_size)


@dataclass(frozen=True)
class ModelShape:
    """Parameter tensors in `model.parameters()` order (element counts) and bytes per element."""
    sizes: tuple[int, ...]
    element_bytes: int = 4
    name: str = "model"

    @property
    def params(self) -> int:
        return sum(self.sizes)

    @property
    def nbytes(self) -> int:
        return self.params * self.element_bytes

    def backward_bytes(self) -> list[int]:
        """Gradient bytes in the order backward produces them (the reverse of parameters())."""
        return [s * self.element_bytes for s in reversed(self.sizes)]


@dataclass(frozen=True)
class Settings:
    """Everything that is neither the cluster nor the model: the strategies' own parameters."""
    memcpy_bytes_per_second: float = 10e9
    fusion_bytes: int = HOROVOD_FUSION_BYTES
    cycle_seconds: float = HOROVOD_CYCLE_SECONDS
    fusion: str = "bucket"            # horovod overlap policy: "bucket" or "cycle"
    ddp_bucket_bytes: int = DDP_BUCKET_BYTES
    ddp_first_bucket_bytes: int = DDP_FIRST_BUCKET_BYTES
    fp16: bool = False
    weighting_pass: bool = True       # mpi: add the weighting pass (False when the fit holds it)
    slow_rank_factor: float = 1.0


@dataclass(frozen=True)
class Prediction:
    """One strategy at one cluster size."""
    step_seconds: float          # wall seconds of one (average) step
    samples_per_second: float    # all ranks together
    exposed_comm_seconds: float  # seconds per step the step waits on communication
    inter_bytes_per_step: float  # bytes per step on one node's link (sent), averaged over k
    comm_seconds: float          # communication per step if nothing overlapped (for the bounds)


def passes(nbytes: float, count: float, s: Settings) -> float:
    return count * nbytes / s.memcpy_bytes_per_second


def ready_times(shape: ModelShape, backward: float) -> list[tuple[float, int]]:
    """(time after backward starts, bytes) of each gradient, backward split by bytes."""
    grads = shape.backward_bytes()
    total = float(sum(grads)) or 1.0
    out, done = [], 0
    for g in grads:
        done += g
        out.append((backward * done / total, g))
    return out


def buckets(grads: Sequence[tuple[float, int]], cap: int, first_cap: int | None = None) -> list[tuple[float, int, int]]:
    """Group gradients in order into buckets of at most `cap` bytes (`first_cap` for the first;
    a larger tensor goes alone): (ready time of its last gradient, bytes, tensors)."""
    out: list[tuple[float, int, int]] = []
    t, size, count = 0.0, 0, 0
    limit = first_cap if first_cap is not None else cap
    for ready, g in grads:
        if count and size + g > limit:
            out.append((t, size, count))
            size, count, limit = 0, 0, cap
        t, size, count = ready, size + g, count + 1
    if count:
        out.append((t, size, count))
    return out


OpCost = Callable[[int, int], Cost]
"""(bytes, tensors) -> the cost of one fused allreduce including its memory passes."""


def bucket_timeline(bs: Sequence[tuple[float, int, int]], op: OpCost, delay: float = 0.0) -> tuple[float, float, float]:
    """Bucket allreduces in order, each `delay` after both its gradients and the previous one are
    done. Returns (end of the last, total seconds of ops and their delays, node-link bytes)."""
    end = busy = inter = 0.0
    for ready, size, count in bs:
        c = op(size, count)
        end = max(ready, end) + delay + c.seconds
        busy += delay + c.seconds
        inter += c.inter_bytes
    return end, busy, inter


def cycle_timeline(grads: Sequence[tuple[float, int]], op: OpCost, cycle: float,
                   cap: int) -> tuple[float, float, float]:
    """Horovod's background loop: every `cycle` seconds (or when the previous cycle's work ends,
    if later) it fuses the gradients ready by then into ops of at most `cap` bytes and runs them.
    The busy seconds returned count one cycle (the wait before the first op) and the ops."""
    i, t, end, busy, inter = 0, 0.0, 0.0, cycle, 0.0
    n = len(grads)
    while i < n:
        t = max(t + cycle, end)
        if grads[i][0] > t:  # nothing ready: skip idle cycles
            t += math.ceil((grads[i][0] - t) / cycle) * cycle
        end = t
        j = i
        while j < n and grads[j][0] <= t + 1e-15:
            j += 1
        group = grads[i:j]
        i = j
        size, count = 0, 0
        for _, g in group:
            if count and size + g > cap:
                c = op(size, count)
                end += c.seconds
                busy += c.seconds
                inter += c.inter_bytes
                size, count = 0, 0
            size, count = size + g, count + 1
        if count:
            c = op(size, count)
            end += c.seconds
            busy += c.seconds
            inter += c.inter_bytes
    return end, busy, inter


def _overlapped(compute: Compute, comm_end: float, busy: float, inter: float, ranks: int,
                base: Compute) -> Prediction:
    step = compute.forward + max(compute.backward, comm_end) + compute.optimizer
    return Prediction(step, ranks * base.batch_size / step, step - compute.step, inter, busy)


def horovod(shape: ModelShape, compute: Compute, cl: Cluster, s: Settings, hierarchical: bool = False) -> Prediction:
    """Horovod: fused gradient allreduces overlapped with backward (see the module docstring)."""
    slow = compute.scaled(s.slow_rank_factor)
    if cl.ranks <= 1:
        return _overlapped(slow, 0.0, 0.0, 0.0, cl.ranks, compute)
    wire = 0.5 if s.fp16 else 1.0
    negotiate = small_allreduce(cl)

    def op(nbytes: int, count: int) -> Cost:
        ar = hierarchical_allreduce(nbytes * wire, cl) if hierarchical else flat_allreduce(nbytes * wire, cl)
        copies = (2 if count > 1 else 0) + 1 + (2 if s.fp16 else 0)
        return Cost(ar.seconds + passes(nbytes, copies, s) + negotiate.seconds, ar.inter_bytes, ar.algorithm)

    grads = ready_times(shape, slow.backward)
    if s.fusion == "cycle":
        end, busy, inter = cycle_timeline(grads, op, s.cycle_seconds, s.fusion_bytes)
    else:
        end, busy, inter = bucket_timeline(buckets(grads, s.fusion_bytes), op, s.cycle_seconds)
    return _overlapped(slow, end, busy, inter, cl.ranks, compute)


def ddp(shape: ModelShape, compute: Compute, cl: Cluster, s: Settings) -> Prediction:
    """DDP: bucket allreduces (25 MiB, the first 1 MiB) overlapped with backward."""
    slow = compute.scaled(s.slow_rank_factor)
    if cl.ranks <= 1:
        return _overlapped(slow, 0.0, 0.0, 0.0, cl.ranks, compute)

    def op(nbytes: int, count: int) -> Cost:
        ar = flat_allreduce(nbytes, cl)
        return Cost(ar.seconds + passes(nbytes, 3, s), ar.inter_bytes, ar.algorithm)

    grads = ready_times(shape, slow.backward)
    end, busy, inter = bucket_timeline(buckets(grads, s.ddp_bucket_bytes, s.ddp_first_bucket_bytes), op)
    return _overlapped(slow, end, busy, inter, cl.ranks, compute)


def mpi_sync(nbytes: float, cl: Cluster, s: Settings) -> Cost:
    """One parameter average of the MPI fallback: weighting pass, allreduce, a tiny allreduce."""
    ar = flat_allreduce(nbytes, cl)
    weight = passes(nbytes, 1, s) if s.weighting_pass else 0.0
    return Cost(weight + ar.seconds + small_allreduce(cl).seconds, ar.inter_bytes, ar.algorithm)


def hierarchy_syncs(nbytes: float, cl: Cluster, s: Settings) -> tuple[Cost, Cost]:
    """(a host-level sync, a global sync) of `--hierarchy`: the host sync runs among each node's
    ranks (skipped with one rank per node); the global one adds the node leaders' allreduce and a
    broadcast within each node (both skipped on one node)."""
    weight = passes(nbytes, 1, s) if s.weighting_pass else 0.0
    local = ZERO
    if cl.ranks_per_node > 1:
        ar = node_allreduce(nbytes, cl)
        local = Cost(weight + ar.seconds, 0.0, "host")
    glob = local
    if cl.nodes > 1:
        ar = leaders_allreduce(nbytes, cl)
        glob = local + Cost(weight + ar.seconds, ar.inter_bytes, "leaders") + node_broadcast(nbytes, cl)
    return local, glob


def _periodic(compute: Compute, per_step: float, inter: float, sync_total: float, cl: Cluster,
              base: Compute) -> Prediction:
    step = compute.step + per_step
    return Prediction(step, cl.ranks * base.batch_size / step, per_step, inter, sync_total)


def mpi(shape: ModelShape, compute: Compute, cl: Cluster, s: Settings, k: int = 1, outer: bool = False,
        warmup: int = 0, steps: int = 0) -> Prediction:
    """The MPI fallback every k steps (no overlap); `outer`: the outer optimizer's passes too;
    `warmup` W of `steps` S: W steps of gradient averaging first, the cost averaged over S."""
    slow = compute.scaled(s.slow_rank_factor)
    if cl.ranks <= 1:
        return _periodic(slow, 0.0, 0.0, 0.0, cl, compute)
    sync = mpi_sync(shape.nbytes, cl, s)
    extra = passes(shape.nbytes, OUTER_PASSES, s) if outer else 0.0
    per_step, inter = (sync.seconds + extra) / k, sync.inter_bytes / k
    if warmup > 0:
        steps = max(steps, warmup)
        ar = flat_allreduce(shape.nbytes, cl)
        warm = ar.seconds + passes(shape.nbytes, 3, s)
        per_step = (warmup * warm + (steps - warmup) * per_step) / steps
        inter = (warmup * ar.inter_bytes + (steps - warmup) * inter) / steps
    return _periodic(slow, per_step, inter, per_step, cl, compute)


def mpi_hierarchy(shape: ModelShape, compute: Compute, cl: Cluster, s: Settings, k_local: int,
                  k_global: int) -> Prediction:
    """`--hierarchy K_LOCAL,K_GLOBAL`: per step ((K_GLOBAL/K_LOCAL - 1) host syncs + 1 global) / K_GLOBAL."""
    slow = compute.scaled(s.slow_rank_factor)
    local, glob = hierarchy_syncs(shape.nbytes, cl, s)
    locals_ = k_global // k_local - 1
    per_step = (locals_ * local.seconds + glob.seconds) / k_global
    return _periodic(slow, per_step, glob.inter_bytes / k_global, per_step, cl, compute)


def mpi_timed(shape: ModelShape, compute: Compute, cl: Cluster, s: Settings, period: float) -> Prediction:
    """Time-based averaging every `period` seconds with one rank `slow_rank_factor` times slower:
    samples/s = B ((p-1)/c + 1/(F c)) T / (T + sync), c one fast rank's step."""
    c, F, p = compute.step, s.slow_rank_factor, cl.ranks
    if p <= 1:
        return Prediction(c * F, compute.batch_size / (F * c), 0.0, 0.0, 0.0)
    sync = mpi_sync(shape.nbytes, cl, s)  # includes the counts allreduce
    rate = compute.batch_size * ((p - 1) / c + 1 / (F * c)) * period / (period + sync.seconds)
    step = c * (period + sync.seconds) / period  # a fast rank's wall seconds per step
    inter = sync.inter_bytes * c / period        # fast ranks take period / c steps per sync
    return Prediction(step, rate, step - c, inter, sync.seconds * c / period)


def efficiency(pred: Prediction, compute: Compute, ranks: int) -> float:
    """Samples/s over ranks x one rank's samples/s without communication (and without straggler)."""
    return pred.samples_per_second / (ranks * compute.samples_per_second)
