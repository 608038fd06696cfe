"""`hvdtrain plan`'s cost model against hand computations (pure: no job, no torch)."""
from __future__ import annotations

import math

import pytest

from hvdtrain.tools.plan import model as M
from hvdtrain.tools.plan import published, report
from hvdtrain.tools.plan import profile as P
from hvdtrain.tools.plan import validate as V

MB = 1e6
FAST = M.Link(0.0, 0.0)


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


# ---- collectives -----------------------------------------------------------------------------

@pytest.mark.parametrize("p", [2, 3, 4, 7, 8, 64])
def test_ring_moves_2_p_minus_1_over_p_bytes_and_pays_2_p_minus_1_latencies(p):
    n = 64 * MB
    assert close(M.ring_bytes(n, p), 2 * (p - 1) / p * n)
    assert close(M.ring_seconds(n, p, M.Link(0.0, 1e-9)), 2 * (p - 1) / p * n * 1e-9)  # bandwidth term only
    assert close(M.ring_seconds(n, p, M.Link(5e-6, 0.0)), 2 * (p - 1) * 5e-6)           # latency term only
    assert close(M.ring_seconds(n, p, M.Link(0.0, 0.0, 2e-9)), (p - 1) / p * n * 2e-9)  # reduction: reduce-scatter only
    assert M.ring_bytes(n, 1) == 0 and M.ring_seconds(n, 1, M.Link(1, 1)) == 0


def test_link_from_gbit():
    link = M.Link.from_gbit(10, 25)
    assert close(link.beta, 8 / 10e9) and close(link.alpha, 25e-6) and close(link.gbit, 10)
    assert close(M.Link.from_gbit(10, 0, efficiency=0.5).beta, 8 / 5e9)


def test_large_messages_take_the_ring_small_ones_recursive_doubling():
    link = M.Link(10e-6, 1e-9)
    one_node = M.Cluster(1, 8, link, link)
    big, small = M.flat_allreduce(64 * MB, one_node), M.flat_allreduce(8, one_node)
    assert big.algorithm == "ring" and close(big.seconds, 14 * 10e-6 + 2 * 7 / 8 * 64 * MB * 1e-9)
    assert small.algorithm == "tree" and close(small.seconds, 3 * (10e-6 + 8 * 1e-9))  # log2(8) rounds of n
    assert close(M.tree_seconds(8, 6, link), 3 * (10e-6 + 8e-9) + 2 * (10e-6 + 8e-9))  # not a power of 2: 2 folds
    assert small.seconds < M.ring_seconds(8, 8, link) and big.seconds < M.tree_seconds(64 * MB, 8, link)


def test_a_flat_ring_across_nodes_is_paced_by_its_slowest_hop():
    intra, inter = M.Link(1e-6, 1e-10), M.Link(20e-6, 8e-10)
    cl = M.Cluster(4, 2, intra, inter)
    n, p = 80 * MB, 8
    cost = M.flat_allreduce(n, cl, "ring")
    assert close(cost.seconds, 2 * (p - 1) * (20e-6 + n / p * 8e-10))
    assert close(cost.inter_bytes, 2 * (p - 1) / p * n)  # each node link: one hop out per step
    assert M.flat_allreduce(n, M.Cluster(1, 8, intra, inter)).inter_bytes == 0


def test_hierarchical_allreduce_bytes_and_time():
    intra, inter = M.Link(1e-6, 1e-10), M.Link(20e-6, 8e-10)
    N, L, n = 4, 4, 64 * MB
    cost = M.hierarchical_allreduce(n, M.Cluster(N, L, intra, inter))
    local = 2 * (L - 1) * (1e-6 + n / L * 1e-10)
    cross = 2 * (N - 1) * 20e-6 + 2 * (N - 1) / N * n * 8e-10  # L shards at once share the node link
    assert cost.algorithm == "hier-ring" and close(cost.seconds, local + cross)
    assert close(cost.inter_bytes, 2 * (N - 1) / N * n)
    flat = M.flat_allreduce(n, M.Cluster(N, L, intra, inter))
    assert cost.inter_bytes < flat.inter_bytes  # 2(N-1)/N n vs 2(p-1)/p n
    # one node or one rank per node: the flat allreduce (Horovod ignores it on one node)
    for N, L in ((1, 4), (4, 1)):
        cl = M.Cluster(N, L, intra, inter)
        assert M.hierarchical_allreduce(n, cl) == M.flat_allreduce(n, cl)


# ---- overlap and steps -----------------------------------------------------------------------

def shape(mb_per_layer=(4, 4, 8, 16, 32), element_bytes=4):
    return M.ModelShape(tuple(int(m * MB) // element_bytes for m in mb_per_layer), element_bytes, "toy")


def test_backward_order_and_byte_proportional_ready_times():
    s = shape((1, 2, 5))
    assert s.backward_bytes() == [5_000_000, 2_000_000, 1_000_000]
    ready = M.ready_times(s, 0.8)
    assert [round(t, 9) for t, _ in ready] == [0.5, 0.7, 0.8]


def test_buckets_fill_in_backward_order_and_big_tensors_go_alone():
    grads = [(0.1, 3), (0.2, 3), (0.3, 10), (0.4, 1), (0.5, 1)]
    assert M.buckets(grads, 6) == [(0.2, 6, 2), (0.3, 10, 1), (0.5, 2, 2)]
    assert M.buckets(grads, 6, first_cap=2) == [(0.1, 3, 1), (0.2, 3, 1), (0.3, 10, 1), (0.5, 2, 2)]


def test_compute_from_rate_splits_forward_backward_1_to_2():
    c = M.Compute.from_rate(200, 64, optimizer=0.02)
    assert close(c.step, 0.32) and close(c.optimizer, 0.02)
    assert close(c.backward, 2 * c.forward) and close(c.forward, 0.1)


LINKS = [(M.Link(2e-6, 1e-10), M.Link(25e-6, 8e-10)), (M.Link(1e-6, 2e-11), M.Link(5e-6, 8e-11)),
         (M.Link(1e-6, 1e-10), M.Link(100e-6, 1.6e-7))]


@pytest.mark.parametrize("fusion", ["bucket", "cycle"])
@pytest.mark.parametrize("links", LINKS)
@pytest.mark.parametrize("nodes,per_node", [(1, 2), (2, 1), (4, 4)])
def test_overlap_bounds_max_compute_comm_le_step_le_sum(fusion, links, nodes, per_node):
    cl = M.Cluster(nodes, per_node, *links)
    c = M.Compute(0.02, 0.04, 0.005, 32)
    st = M.Settings(fusion=fusion, fusion_bytes=16 * M.MIB)
    for pred in (M.horovod(shape(), c, cl, st), M.horovod(shape(), c, cl, st, hierarchical=True),
                 M.ddp(shape(), c, cl, st), M.mpi(shape(), c, cl, st, 1), M.mpi(shape(), c, cl, st, 16)):
        assert max(c.step, pred.comm_seconds) <= pred.step_seconds * (1 + 1e-12)
        assert pred.step_seconds <= (c.step + pred.comm_seconds) * (1 + 1e-12)
        assert close(pred.samples_per_second, cl.ranks * 32 / pred.step_seconds)


def test_overlap_hides_communication_that_backward_covers():
    cl = M.Cluster(2, 1, FAST, M.Link(0.0, 1e-12))  # a nearly free link
    c = M.Compute(0.02, 0.04, 0.005, 32)
    st = M.Settings(memcpy_bytes_per_second=1e15, cycle_seconds=0.0)
    assert M.horovod(shape(), c, cl, st).exposed_comm_seconds < 1e-4
    assert close(M.efficiency(M.horovod(shape(), c, cl, st), c, 2), c.step / M.horovod(shape(), c, cl, st).step_seconds)


def test_fp16_halves_the_bytes_on_the_wire():
    cl = M.Cluster(4, 1, FAST, M.Link(10e-6, 8e-10))
    c = M.Compute(0.02, 0.04, 0.005, 32)
    full = M.horovod(shape(), c, cl, M.Settings())
    half = M.horovod(shape(), c, cl, M.Settings(fp16=True))
    assert close(half.inter_bytes_per_step, full.inter_bytes_per_step / 2)
    assert close(full.inter_bytes_per_step, M.ring_bytes(shape().nbytes, 4))


def test_k_step_averaging_costs_sync_over_k():
    cl = M.Cluster(4, 2, M.Link(1e-6, 1e-10), M.Link(25e-6, 8e-10))
    c = M.Compute(0.02, 0.04, 0.005, 32)
    st = M.Settings(memcpy_bytes_per_second=10e9)
    n = shape().nbytes
    sync = M.mpi_sync(n, cl, st)
    assert close(sync.seconds, n / 10e9 + M.flat_allreduce(n, cl).seconds + M.small_allreduce(cl).seconds)
    one, sixteen = M.mpi(shape(), c, cl, st, 1), M.mpi(shape(), c, cl, st, 16)
    assert close(one.exposed_comm_seconds, sync.seconds) and close(one.step_seconds, c.step + sync.seconds)
    assert close(sixteen.exposed_comm_seconds, sync.seconds / 16)
    assert close(sixteen.inter_bytes_per_step, one.inter_bytes_per_step / 16)
    outer = M.mpi(shape(), c, cl, st, 16, outer=True)  # the same bytes as k, plus the outer step's passes
    assert outer.inter_bytes_per_step == sixteen.inter_bytes_per_step
    assert close(outer.exposed_comm_seconds, (sync.seconds + M.OUTER_PASSES * n / 10e9) / 16)
    # no weighting pass when the calibrated fit (hvdtrain-mpi) already holds it
    st2 = M.Settings(memcpy_bytes_per_second=10e9, weighting_pass=False)
    assert close(M.mpi_sync(n, cl, st) .seconds - M.mpi_sync(n, cl, st2).seconds, n / 10e9)


def test_warm_up_is_averaged_over_the_run():
    cl = M.Cluster(2, 1, FAST, M.Link(25e-6, 8e-10))
    c = M.Compute(0.02, 0.04, 0.005, 32)
    st = M.Settings()
    n = shape().nbytes
    warm = M.flat_allreduce(n, cl).seconds + 3 * n / st.memcpy_bytes_per_second
    k16 = M.mpi(shape(), c, cl, st, 16).exposed_comm_seconds
    got = M.mpi(shape(), c, cl, st, 16, warmup=100, steps=1000).exposed_comm_seconds
    assert close(got, (100 * warm + 900 * k16) / 1000)


def test_hierarchy_costs_host_syncs_and_global_syncs_per_k_global():
    intra, inter = M.Link(1e-6, 1e-10), M.Link(25e-6, 8e-10)
    cl = M.Cluster(4, 2, intra, inter)
    c = M.Compute(0.02, 0.04, 0.005, 32)
    st = M.Settings()
    n = shape().nbytes
    w = n / st.memcpy_bytes_per_second
    local = w + M.node_allreduce(n, cl).seconds
    glob = local + w + M.leaders_allreduce(n, cl).seconds + M.node_broadcast(n, cl).seconds
    pred = M.mpi_hierarchy(shape(), c, cl, st, 4, 16)
    assert close(pred.exposed_comm_seconds, (3 * local + glob) / 16)
    assert close(pred.inter_bytes_per_step, M.ring_bytes(n, 4) / 16)  # only the leaders cross nodes


def test_straggler_synchronous_runs_at_the_slow_rank_time_based_does_not():
    free = M.Cluster(4, 1, FAST, FAST)
    c = M.Compute(0.02, 0.04, 0.005, 32)
    st = M.Settings(memcpy_bytes_per_second=1e18, cycle_seconds=0.0, slow_rank_factor=2.0)
    for pred in (M.horovod(shape(), c, free, st), M.ddp(shape(), c, free, st), M.mpi(shape(), c, free, st, 1)):
        assert close(M.efficiency(pred, c, 4), 0.5, rel=1e-6)
    cl = M.Cluster(4, 1, FAST, M.Link(25e-6, 8e-10))
    st = M.Settings(slow_rank_factor=2.0)
    T, p, B, cstep = 2.0, 4, 32, c.step
    sync = M.mpi_sync(shape().nbytes, cl, st).seconds
    pred = M.mpi_timed(shape(), c, cl, st, T)
    assert close(pred.samples_per_second, B * ((p - 1) / cstep + 1 / (2.0 * cstep)) * T / (T + sync))
    assert pred.samples_per_second > M.mpi(shape(), c, cl, st, 1).samples_per_second


def test_cycle_fusion_sends_earlier_and_smaller_than_buckets():
    cl = M.Cluster(2, 1, FAST, M.Link(10e-6, 8e-10))
    c = M.Compute(0.05, 0.1, 0.005, 32)
    bucket = M.horovod(shape(), c, cl, M.Settings(fusion="bucket"))
    cycle = M.horovod(shape(), c, cl, M.Settings(fusion="cycle"))
    assert cycle.step_seconds <= bucket.step_seconds
    assert close(cycle.inter_bytes_per_step, bucket.inter_bytes_per_step)


# ---- profile fitting and links ------------------------------------------------------------------

def bench_rows(impl, p, alpha, beta, sizes=(4, 64, 1024, 1 << 16, 1 << 20, 1 << 24)):
    return [{"impl": impl, "np": p, "bytes": n, "p50_us": 1e6 * M.ring_seconds(n, p, M.Link(alpha, beta)),
             "busbw_gbps": 1.0} for n in sizes]


def test_fit_recovers_per_step_alpha_and_beta_of_a_ring():
    rows = bench_rows("mpi4py", 4, 3e-6, 2e-10) + bench_rows("hvdtrain-mpi", 4, 5e-6, 4e-10)
    rows += [{"impl": "memcpy", "np": 1, "bytes": n, "p50_us": 1.0, "busbw_gbps": g}
             for n, g in ((1 << 20, 8.0), (1 << 22, 6.0), (1 << 24, 7.0), (16, 99.0))]
    fits, memcpy = P.fit_bench(rows)
    assert math.isclose(fits["mpi4py"]["alpha_us"], 3.0, rel_tol=1e-6)
    assert math.isclose(fits["mpi4py"]["gbit"], 8 / 2e-10 / 1e9, rel_tol=1e-6)
    assert math.isclose(fits["hvdtrain-mpi"]["alpha_us"], 5.0, rel_tol=1e-6) and fits["mpi4py"]["max_rel_error"] < 1e-6
    assert memcpy == 7.0  # median busbw from 1 MiB up


def test_horovod_fit_loses_one_cycle_time():
    rows = [{**r, "p50_us": r["p50_us"] + 1e6 * M.HOROVOD_CYCLE_SECONDS}
            for r in bench_rows("horovod-mpi", 2, 4e-6, 1e-9)]
    fit = P.fit_impl(rows, "horovod-mpi")
    assert math.isclose(fit["alpha_us"], 4.0, rel_tol=1e-4) and fit["cycle_subtracted_us"] == 1000


def test_a_fit_read_at_a_size_meets_the_measured_curve_there():
    # a curve no line fits: 1 ms latency, 1 GB/s up to 1 MiB, 4x slower per byte beyond (cache)
    def t(n):
        return 1e-3 + min(n, 1 << 20) * 1e-9 + max(n - (1 << 20), 0) * 4e-9
    sizes = (4, 1024, 1 << 16, 1 << 20, 1 << 22, 1 << 24)
    rows = [{"impl": "mpi4py", "np": 2, "bytes": n, "p50_us": 1e6 * t(n), "busbw_gbps": 1.0} for n in sizes]
    fit = P.fit_impl(rows, "mpi4py")
    assert [pt[0] for pt in fit["curve"]] == list(sizes)
    for n in (1 << 22, 1 << 24, 3 << 20):  # measured sizes, and one between two (linear there)
        link = P.fit_at(fit, n)
        assert close(M.ring_seconds(n, 2, link), t(n), rel=1e-9), n
        assert close(link.alpha, fit["alpha_us"] * 1e-6)
    beyond = 1 << 26                        # beyond the largest size: the last segment's slope
    expected = t(1 << 24) + (beyond - (1 << 24)) * 4e-9
    assert close(M.ring_seconds(beyond, 2, P.fit_at(fit, beyond)), expected, rel=1e-9)
    line = P.fit_at(fit, None)              # no size: the fitted line, which misses the big sizes
    assert abs(M.ring_seconds(1 << 24, 2, line) / t(1 << 24) - 1) > 0.2
    assert close(P.fit_at({k: v for k, v in fit.items() if k != "curve"}, 1 << 24).beta, line.beta)


def test_profile_curves_are_checked(tmp_path):
    path = tmp_path / "p.json"
    prof = P.new_profile()
    prof["links"]["inter"]["mpi4py"] = {"alpha_us": 2.0, "gbit": 1.0, "curve": [[4, 1e-5], [1024, -1]]}
    P.write_profile(prof, path)
    with pytest.raises(P.ConfigError, match="curve must be"):
        P.read_profile(path)
    prof["links"]["inter"]["mpi4py"]["curve"] = [[4, 1e-5], [1024, 2e-5]]
    P.write_profile(prof, path)
    assert P.read_profile(path)["links"]["inter"]["mpi4py"]["curve"][1] == [1024, 2e-5]


def test_calibration_sizes_on_a_shaped_link_take_about_a_second():
    assert V.link_bytes(0.05) == 4 << 20          # 6.25 MB/s: 4 MiB, not 16
    assert V.link_bytes(0.2) == 16 << 20          # 25 MB/s
    assert V.link_bytes(1.0) == 16 << 20          # capped
    assert V.link_bytes(0.001) == 64 * 1024       # 125 kB/s


def test_links_flags_profile_and_the_slower_of_both():
    prof = {"links": {"intra": {"hvdtrain-mpi": {"alpha_us": 3.0, "gbit": 40.0}},
                      "inter": {"mpi4py": {"alpha_us": 50.0, "gbit": 2.0}}}}
    link, src = P.link_for("intra", "mpi", prof, P.LinkFlags())
    assert src == "profile hvdtrain-mpi" and close(link.alpha, 3e-6) and P.weighting_included("mpi", src)
    link, src = P.link_for("inter", "horovod", prof, P.LinkFlags(inter_gbit=0.2))
    assert src == "profile mpi4py + flags" and close(link.gbit, 0.2) and close(link.alpha, 50e-6)
    link, src = P.link_for("inter", "horovod", prof, P.LinkFlags(inter_gbit=100.0))
    assert close(link.gbit, 2.0)  # a profile's software ceiling stays
    link, src = P.link_for("inter", "ddp", None, P.LinkFlags())
    assert src == "default" and close(link.gbit, P.DEFAULT_LINKS["inter"][0])
    link, src = P.link_for("intra", "ddp", prof, P.LinkFlags(intra_gbit=5.0, intra_latency_us=7.0))
    assert src == "flags" and close(link.gbit, 5.0) and close(link.alpha, 7e-6)


# ---- report --------------------------------------------------------------------------------------

def rows_of(table):
    return [{"strategy": s, "nodes": n, "ranks": n, "samples_per_second": v, "efficiency": 0.5,
             "synchronous": s != "mpi k=16"} for s, n, v in table]


def test_crossovers_and_recommendations():
    rows = rows_of([("horovod", 1, 100), ("mpi k=16", 1, 90), ("horovod", 2, 150), ("mpi k=16", 2, 180),
                    ("horovod", 4, 200), ("mpi k=16", 4, 350), ("ddp", 1, 80), ("ddp", 2, 100), ("ddp", 4, 150)])
    cross = {c["strategy"]: c for c in report.node_crossovers(rows)}
    assert cross["mpi k=16"]["nodes"] == 2 and math.isclose(cross["mpi k=16"]["ratio"], 1.2)
    assert cross["ddp"]["nodes"] is None
    recs = report.recommendations(rows)
    assert [r["strategy"] for r in recs] == ["horovod", "mpi k=16", "mpi k=16"]
    assert recs[2]["synchronous"] == "horovod" and "bench convergence" in recs[2]["text"]

    def at(gbit):  # mpi k=16 wins at 2 nodes from 10 Gbit/s down
        return rows_of([("horovod", 2, 100), ("mpi k=16", 2, 120 if gbit <= 10 else 90)])
    link = report.link_crossovers(at, [100, 25, 10, 1])
    assert link[0]["inter_gbit"] == 10 and math.isclose(link[0]["ratio"], 1.2)


# ---- published check and validation grid ------------------------------------------------------

def test_published_inputs_are_the_documented_ones():
    assert sum(published.vgg16_sizes()) == 138_357_544
    assert sum(published.resnet101_sizes()) == 44_549_160
    assert sum(published.inception3_sizes()) == 23_851_784
    assert math.isclose(published.resnet101_rate(), 128.7, abs_tol=0.05)
    assert published.cluster().ranks == 512


def test_published_efficiencies_within_10_points():
    rows = {r["model"]: r for r in published.check()}
    assert set(rows) == {"Inception V3", "ResNet-101", "VGG-16"}
    for name, reported in (("Inception V3", 0.90), ("ResNet-101", 0.90), ("VGG-16", 0.68)):
        r = rows[name]
        assert r["reported_efficiency"] == reported
        assert abs(r["predicted_efficiency"] - reported) <= 0.10, (name, r["predicted_efficiency"])
        assert r["within_10_points"]


def test_validation_grid_is_6_one_host_and_24_two_host_configs():
    grid = V.grid(two_hosts=True)
    assert len([c for c in grid if c.hosts == 1]) == 6 and len([c for c in grid if c.hosts == 2]) == 24
    assert {c.strategy for c in grid} == {"horovod", "mpi k=1", "mpi k=16"}
    assert {c.link for c in grid if c.hosts == 2} == {"unshaped", "1gbit", "200mbit", "50mbit"}
    params = {m: sum(V.mlp_sizes(h)) for m, h in V.MODELS.items()}
    assert 0.9e6 < params["mlp-1M"] < 1.1e6 and 19e6 < params["mlp-20M"] < 21e6
    assert len(V.grid(two_hosts=False)) == 6 and len(V.grid(two_hosts=True, tiny=True)) == 6
    c16 = next(c for c in grid if c.k == 16)
    assert V.steps_for(c16, 10.0, tiny=False) == 32 and V.steps_for(c16, 0.001, tiny=False) % 16 == 0


def test_validation_predictions_follow_the_shaped_link():
    prof = {"links": {"intra": {"mpi4py": {"alpha_us": 2.0, "gbit": 40.0}},
                      "inter": {"mpi4py": {"alpha_us": 60.0, "gbit": 2.4}}}, "memcpy_gbps": 8.0}
    c = M.Compute(0.02, 0.04, 0.005, 64)
    rates = [V.predict(cfg, c, prof)["samples_per_second"] for cfg in V.grid(True)
             if cfg.hosts == 2 and cfg.model == "mlp-20M" and cfg.strategy == "mpi k=1"]
    assert rates == sorted(rates, reverse=True) and rates[0] > 3 * rates[-1]
