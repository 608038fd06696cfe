"""`hvdtrain plan --published`: the plan's model against Horovod's published 512-GPU benchmark.

Horovod's docs (docs/benchmarks.rst, https://horovod.readthedocs.io/en/stable/benchmarks_include.html):
"The above benchmark was done on 128 servers with 4 Pascal GPUs each connected by RoCE-capable
25 Gbit/s network. Horovod achieves 90% scaling efficiency for both Inception V3 and ResNet-101,
and 68% scaling efficiency for VGG-16." The run: tf_cnn_benchmarks, `--batch_size 64
--variable_update horovod`, synthetic data (the page's instructions). The figure is from April
2018 (also in Sergeev & Del Balso, arXiv:1802.05799, Feb 2018).

Every input, with its source (INPUTS, MODELS); nothing is fitted to the answer:
- single-GPU images/s, P100, batch 64, synthetic data: TensorFlow's benchmarks page
  (tensorflow.org/performance/benchmarks, tensorflow/docs_src/performance/benchmarks.md, "Details
  for NVIDIA DGX-1 (NVIDIA Tesla P100)", May 2017): InceptionV3 142, ResNet-50 219, ResNet-152 91.8,
  VGG16 154. ResNet-101 is not listed: its time per image is interpolated linearly in FLOPs
  between ResNet-50 and ResNet-152 (3.8, 7.6 and 11.3 GFLOPs per image, He et al.
  arXiv:1512.03385 Table 1): 1/219 + (7.6-3.8)/(11.3-3.8) (1/91.8 - 1/219) s -> 128.7 images/s.
  (Measured on a DGX-1's SXM2 P100s; a PCIe P100 clocks ~10% lower: a longer step hides the
  same traffic better, so the predicted efficiencies would rise slightly.)
- parameters (fp32 gradients, in layer order): VGG-16 138,357,544 and ResNet-101 44,549,160
  counted from their architectures (Simonyan & Zisserman arXiv:1409.1556 configuration D;
  He et al. Table 1, bottleneck blocks [3, 4, 23, 3], batch-norm scale and shift, no conv
  biases); Keras Applications lists 138.4M and 44.7M (its ResNet101 has conv biases).
  Inception V3: 23,851,784 (Keras Applications' InceptionV3, 23.9M): its 1000-way classifier
  (2048 x 1000 + 1000) and the rest as 94 equal conv tensors (its 94 convolutions; per-layer
  sizes matter only through where fused buffers split, since backward time is split by bytes).
- network: 25 Gbit/s per server (the page), one NIC; per-step latency 6.6 us (NCCL's own
  model for a ring step over the network with the Simple protocol that large messages use,
  hwLat[NET][RING][SIMPLE] in NVIDIA/nccl src/graph/tuning.cc).
- within a server: 4 P100s on PCIe 3.0 x16, 15.75 GB/s (8 GT/s x 16 lanes, 128b/130b), 5.7 us
  per step (hwLat[PCI][RING][SIMPLE]). The page does not name the server type, so PCIe P100s are
  an assumption (4-GPU NVLink P100 servers existed too, e.g. IBM's S822LC "Minsky"). The flat
  ring's steps are paced by the 25 Gbit/s hop, so NVLink (4 links x 20 GB/s) gives the same
  numbers (`sensitivity` below).
- Horovod of that time (v0.12, 2018): fusion threshold 64 MB and cycle time 5 ms (the defaults
  until horovod/horovod#2468), flat NCCL ring allreduce over all 512 GPUs (the page's command
  sets no hierarchical allreduce); GPU memory 732 GB/s (P100 16 GB datasheet) for the passes.
The model, settings and link rules are the ones `hvdtrain plan` uses for every plan
(model.horovod with fusion "bucket"); link efficiency 1 (no global factor).
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from hvdtrain.tools import tables
import hvdtrain.tools.plan.model as M

SOURCE_HOROVOD = ("Horovod docs/benchmarks.rst (horovod.readthedocs.io/en/stable/benchmarks_include.html): "
                  "128 servers x 4 Pascal GPUs, RoCE-capable 25 Gbit/s; 90% Inception V3, 90% ResNet-101, 68% VGG-16")
SOURCE_TF = ("TensorFlow benchmarks page, Details for NVIDIA DGX-1 (Tesla P100), training synthetic data, "
             "batch 64 per GPU, 1 GPU (tensorflow/docs_src/performance/benchmarks.md, May 2017)")
SOURCE_KERAS = "Keras Applications table (keras.io/api/applications): VGG16 138.4M, ResNet101 44.7M, InceptionV3 23.9M"
SOURCE_NCCL = "NVIDIA/nccl src/graph/tuning.cc hwLat: ring/Simple per-step latency NET 6.6 us, PCI 5.7 us"
SOURCE_RESNET_FLOPS = "He et al. 2015 (arXiv:1512.03385) Table 1: 3.8, 7.6, 11.3 GFLOPs for ResNet-50/101/152"

GPUS_PER_SERVER = 4
SERVERS = 128
BATCH = 64
INTER_GBIT, INTER_LATENCY_US = 25.0, 6.6
PCIE3_X16_GBIT = 8.0 * 16 * 128 / 130   # 126 Gbit/s = 15.75 GB/s
PCIE_LATENCY_US = 5.7
NVLINK_GBIT = 4 * 20.0 * 8              # P100 SXM2: 4 NVLink links x 20 GB/s per direction
P100_MEMORY_GBPS = 732.0
FUSION_2018_BYTES = 64 * M.MIB
CYCLE_2018_SECONDS = 5e-3

RESNET_FLOPS = {"resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3}
TF_P100_IMAGES_PER_SECOND = {"inception3": 142.0, "resnet50": 219.0, "resnet152": 91.8, "vgg16": 154.0}


def resnet101_rate() -> float:
    """ResNet-101 images/s on one P100: time per image interpolated in FLOPs (see the docstring)."""
    t50, t152 = 1 / TF_P100_IMAGES_PER_SECOND["resnet50"], 1 / TF_P100_IMAGES_PER_SECOND["resnet152"]
    lo, mid, hi = RESNET_FLOPS["resnet50"], RESNET_FLOPS["resnet101"], RESNET_FLOPS["resnet152"]
    frac = (mid - lo) / (hi - lo)
    return 1 / (t50 + frac * (t152 - t50))


def vgg16_sizes() -> tuple[int, ...]:
    """VGG-16 (configuration D) parameter tensors in forward order: conv weights and biases, fc."""
    sizes, cin = [], 3
    for cout in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512):
        sizes += [9 * cin * cout, cout]
        cin = cout
    for fin, fout in ((512 * 7 * 7, 4096), (4096, 4096), (4096, 1000)):
        sizes += [fin * fout, fout]
    return tuple(sizes)


def resnet101_sizes() -> tuple[int, ...]:
    """ResNet-101 (bottleneck blocks [3, 4, 23, 3]) tensors in forward order, BN scale + shift."""
    def conv_bn(k: int, cin: int, cout: int) -> list[int]:
        return [k * k * cin * cout, cout, cout]
    sizes = conv_bn(7, 3, 64)
    cin = 64
    for blocks, width in ((3, 64), (4, 128), (23, 256), (3, 512)):
        for b in range(blocks):
            cout = 4 * width
            sizes += conv_bn(1, cin, width) + conv_bn(3, width, width) + conv_bn(1, width, cout)
            if b == 0:
                sizes += conv_bn(1, cin, cout)  # projection shortcut
            cin = cout
    sizes += [2048 * 1000, 1000]
    return tuple(sizes)


def inception3_sizes(total: int = 23_851_784, convs: int = 94) -> tuple[int, ...]:
    """Inception V3: 94 equal conv tensors holding all but the classifier, then the classifier."""
    head = [2048 * 1000, 1000]
    body = total - sum(head)
    base, extra = divmod(body, convs)
    return tuple(base + (1 if i < extra else 0) for i in range(convs)) + tuple(head)


MODELS: dict[str, dict[str, Any]] = {
    "Inception V3": {"sizes": inception3_sizes(), "rate": TF_P100_IMAGES_PER_SECOND["inception3"], "reported": 0.90,
                     "rate_source": SOURCE_TF, "params_source": SOURCE_KERAS + " (23,851,784)"},
    "ResNet-101": {"sizes": resnet101_sizes(), "rate": resnet101_rate(), "reported": 0.90,
                   "rate_source": f"derived: {SOURCE_TF}, ResNet-50 219 and ResNet-152 91.8 interpolated by "
                                  f"{SOURCE_RESNET_FLOPS}",
                   "params_source": "counted: He et al. Table 1 bottleneck [3, 4, 23, 3] "
                                    "(Keras: 44.7M with conv biases)"},
    "VGG-16": {"sizes": vgg16_sizes(), "rate": TF_P100_IMAGES_PER_SECOND["vgg16"], "reported": 0.68,
               "rate_source": SOURCE_TF,
               "params_source": "counted: Simonyan & Zisserman configuration D (Keras: 138.4M)"},
}


def cluster(intra_gbit: float = PCIE3_X16_GBIT, link_efficiency: float = 1.0) -> M.Cluster:
    return M.Cluster(SERVERS, GPUS_PER_SERVER, M.Link.from_gbit(intra_gbit, PCIE_LATENCY_US, link_efficiency),
                     M.Link.from_gbit(INTER_GBIT, INTER_LATENCY_US, link_efficiency))


def settings(fusion: str = "bucket") -> M.Settings:
    return M.Settings(memcpy_bytes_per_second=P100_MEMORY_GBPS * 1e9, fusion_bytes=FUSION_2018_BYTES,
                      cycle_seconds=CYCLE_2018_SECONDS, fusion=fusion)


def predict(name: str, cl: M.Cluster | None = None, st: M.Settings | None = None) -> float:
    """The model's 512-GPU scaling efficiency of one benchmark model."""
    spec = MODELS[name]
    shape = M.ModelShape(spec["sizes"], 4, name)
    st = st or settings()
    cl = cl or cluster()
    compute = M.Compute.from_rate(spec["rate"], BATCH, M.OPTIMIZER_PASSES * shape.nbytes / st.memcpy_bytes_per_second)
    return M.efficiency(M.horovod(shape, compute, cl, st), compute, cl.ranks)


def check(link_efficiency: float = 1.0) -> list[dict[str, Any]]:
    """One row per benchmark model: inputs, reported and predicted efficiency, the miss in
    points, and the prediction under the two assumptions that could go either way."""
    rows = []
    for name, spec in MODELS.items():
        eff = predict(name, cluster(link_efficiency=link_efficiency))
        rows.append({
            "model": name, "params": sum(spec["sizes"]), "single_gpu_images_per_second": spec["rate"],
            "reported_efficiency": spec["reported"], "predicted_efficiency": eff,
            "miss_points": 100 * (eff - spec["reported"]), "within_10_points": abs(eff - spec["reported"]) <= 0.10,
            "sensitivity": {"fusion_cycle": predict(name, cluster(link_efficiency=link_efficiency), settings("cycle")),
                            "nvlink_intra": predict(name, cluster(NVLINK_GBIT, link_efficiency))},
            "rate_source": spec["rate_source"], "params_source": spec["params_source"]})
    return rows


def inputs() -> dict[str, Any]:
    return {"servers": SERVERS, "gpus_per_server": GPUS_PER_SERVER, "batch_per_gpu": BATCH,
            "inter": {"gbit": INTER_GBIT, "latency_us": INTER_LATENCY_US, "source": f"{SOURCE_HOROVOD}; {SOURCE_NCCL}"},
            "intra": {"gbit": PCIE3_X16_GBIT, "latency_us": PCIE_LATENCY_US,
                      "source": "PCIe 3.0 x16 (15.75 GB/s); " + SOURCE_NCCL},
            "fusion_bytes": FUSION_2018_BYTES, "cycle_seconds": CYCLE_2018_SECONDS,
            "memory_gbps": P100_MEMORY_GBPS, "reported_source": SOURCE_HOROVOD}


COLUMNS = [("model", "model", "{}"), ("params", "params", "{:,}"),
           ("1-GPU img/s", "single_gpu_images_per_second", "{:.1f}"),
           ("reported", "reported_pct", "{:.0f}%"), ("predicted", "predicted_pct", "{:.1f}%"),
           ("miss (points)", "miss_points", "{:+.1f}"), ("fusion=cycle", "cycle_pct", "{:.1f}%"),
           ("NVLink", "nvlink_pct", "{:.1f}%")]


def format_check(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    shown = [{**r, "reported_pct": 100 * r["reported_efficiency"], "predicted_pct": 100 * r["predicted_efficiency"],
              "cycle_pct": 100 * r["sensitivity"]["fusion_cycle"], "nvlink_pct": 100 * r["sensitivity"]["nvlink_intra"]}
             for r in rows]
    return tables.format_table(COLUMNS, shown, markdown)


def main_published(args: argparse.Namespace) -> int:
    rows = check(args.link_efficiency)
    print(f"[plan] Horovod's 512-GPU benchmark: {SERVERS} servers x {GPUS_PER_SERVER} P100, {INTER_GBIT:g} Gbit/s "
          f"between servers, PCIe 3.0 x16 inside, batch {BATCH}/GPU; fusion 64 MiB, cycle 5 ms (Horovod 2018)")
    print(format_check(rows, args.markdown))
    worst = max(abs(r["miss_points"]) for r in rows)
    print(f"\nworst miss {worst:.1f} points ({'within' if worst <= 10 else 'outside'} the 10-point goal)")
    if args.json or args.out:
        import json
        from pathlib import Path

        from hvdtrain.tools.plan.report import write_file
        path = Path(args.json) if args.json else Path(args.out) / "published.json"
        write_file(path, json.dumps({"inputs": inputs(), "rows": rows}, indent=1) + "\n")
        print(f"[plan] wrote {path}")
    return 0 if not math.isnan(worst) else 1
