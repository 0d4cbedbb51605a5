"""``mtnlg plan``: options, the text table, JSON and the optional PNG."""
from __future__ import annotations

import argparse
import json
import sys

from mtnlg.errors import UserError
from mtnlg.plan.cluster import DEFAULT_CALIBRATION, GPUS, Calibration, make_cluster
from mtnlg.plan.cost import GPU_PROFILES, DeviceProfile
from mtnlg.plan.layout import ATTENTION, RECOMPUTE, SCHEDULES, Layout
from mtnlg.plan.memory import STATE_BYTES, model_state_bytes, reduces_per_step
from mtnlg.plan.planner import plan_layout, search_layouts


def add_arguments(p: argparse.ArgumentParser) -> None:
    c = DEFAULT_CALIBRATION
    p.add_argument("--config", help="model/training TOML (e.g. configs/mtnlg-530b.toml); default: built-in defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.n_layers=96 (repeatable)")
    g = p.add_argument_group("cluster")
    g.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS), help="GPU preset (default a100-80gb)")
    g.add_argument("--gpus", type=int, help="total GPUs (a multiple of --gpus-per-node beyond one node)")
    g.add_argument("--nodes", type=int, help="number of nodes (instead of --gpus)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (preset: 8)")
    g.add_argument("--gpu-memory-gb", type=float, help="GPU memory in GB (overrides the preset)")
    g.add_argument("--peak-tflops", type=float, help="dense 16-bit peak TFLOP/s per GPU (overrides the preset)")
    g.add_argument("--nvlink-gbps", type=float, help="intra-node bandwidth per GPU per direction, GB/s")
    g.add_argument("--ib-gbps", type=float, help="inter-node bandwidth per GPU per direction, GB/s")
    g.add_argument("--hbm-gbps", type=float, help="GPU memory bandwidth, GB/s (optimizer step)")
    g.add_argument("--compute-efficiency", type=float, default=None,
                   help="flat model: this fraction of peak FLOP/s for all compute (default: the per-operation "
                        f"cost model with the GPU's device profile; {c.compute_efficiency} is the old constant)")
    g.add_argument("--device-profile", metavar="JSON",
                   help="device profile for the per-operation cost model (from --calibrate); default: the GPU "
                        "preset's datasheet profile")
    g.add_argument("--link-efficiency", type=float, default=c.link_efficiency,
                   help=f"achievable fraction of link bandwidth (default {c.link_efficiency})")
    g.add_argument("--reserved-gb", type=float, default=c.reserved_gb,
                   help=f"GPU memory unavailable to the model: context, NCCL, fragmentation (default {c.reserved_gb})")
    g = p.add_argument_group("layout (omit --tp/--pp to search)")
    g.add_argument("--tp", type=int, help="tensor-parallel degree; omitted: searched")
    g.add_argument("--pp", type=int, help="pipeline-parallel degree; omitted: searched")
    g.add_argument("--global-batch", type=int, help="sequences per iteration (default: train.global_batch)")
    g.add_argument("--micro-batch", type=int,
                   help="sequences per micro-batch (default: train.micro_batch; searched over 1,2,4,8 when searching)")
    g.add_argument("--schedule", default="1f1b", choices=SCHEDULES, help="pipeline schedule (default 1f1b)")
    g.add_argument("--virtual-stages", type=int, default=1, help="model chunks per stage for --schedule interleaved or zb")
    g.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                   help="ZeRO stage for data-parallel sharding: 1 optimizer state, 2 + gradients, 3 + weights")
    g.add_argument("--zero-reduce", choices=("micro_batch", "step"), default=None,
                   help="ZeRO 2/3 in a pipeline: reduce-scatter gradients per micro_batch, or once per step "
                        "(unsharded fp32 gradients held until then; default: parallel.zero_reduce)")
    g.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="sequence parallelism with tp (default: parallel.sequence_parallel)")
    g.add_argument("--attention", choices=ATTENTION, default="flash",
                   help="attention kernel, for activation memory: flash (default; mtnlg's SDPA kernels keep no "
                        "score matrix) or materialized (Megatron-2021's softmax keeps a*s^2 scores per layer)")
    g.add_argument("--recompute", choices=RECOMPUTE,
                   help="activation recomputation (default: full if train.activation_checkpointing else none; "
                        "all three when searching)")
    g.add_argument("--precision", choices=sorted(STATE_BYTES), help="weights/optimizer precision (default: train.precision)")
    g = p.add_argument_group("this machine (CPU or one GPU): calibrate, then predict a local run")
    g.add_argument("--calibrate", action="store_true",
                   help="time this machine's GEMMs at the config's shapes, attention, memory bandwidth, optimizer "
                        "and gloo collectives; write a device profile (--out)")
    g.add_argument("--out", metavar="JSON", help="where --calibrate writes (default ~/.cache/mtnlg/device-profile.json)")
    g.add_argument("--local", action="store_true",
                   help="predict step time, its breakdown and per-rank memory of `mtnlg train` on this machine "
                        "with --tp x --dp processes (needs a calibrated --device-profile; default: the --out path)")
    g.add_argument("--dp", type=int, default=1, help="data-parallel processes for --local (default 1)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    g.add_argument("--top", type=int, default=15, help="rows of the ranked table (default 15)")
    g.add_argument("--all", action="store_true", help="also list layouts that do not fit in memory")
    g.add_argument("--plot", metavar="PNG", help="write a chart of predicted time and memory across layouts")
    g.add_argument("--dry-run", action="store_true",
                   help="also build the parallelized model for one rank on the meta device and cross-check counts")
    g.add_argument("--rank", type=int, default=0, help="global rank for --dry-run (default 0)")


def _setup(args):
    from mtnlg.config import load_config
    cfg = load_config(args.config, args.set)
    cluster = make_cluster(args.gpu, gpus=args.gpus, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                           memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops,
                           nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps, hbm_gbps=args.hbm_gbps)
    for name in ("compute_efficiency", "link_efficiency"):
        v = getattr(args, name)
        if v is not None and not 0 < v <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    if args.compute_efficiency is not None:
        device = None
    elif args.device_profile:
        device = DeviceProfile.load(args.device_profile)
    else:
        device = GPU_PROFILES[args.gpu]
    calib = Calibration(args.compute_efficiency or DEFAULT_CALIBRATION.compute_efficiency, args.link_efficiency,
                        DEFAULT_CALIBRATION.hbm_efficiency, args.reserved_gb, device)
    batch = args.global_batch or cfg.train.global_batch
    sp = cfg.parallel.sequence_parallel if args.sequence_parallel is None else args.sequence_parallel
    precision = args.precision or cfg.train.precision
    return cfg, cluster, calib, batch, sp, precision


def run(args: argparse.Namespace) -> int:
    if args.calibrate or args.local:
        from mtnlg.plan.local import run_local
        return run_local(args)
    cfg, cluster, calib, batch, sp, precision = _setup(args)
    zero_reduce = getattr(args, "zero_reduce", None) or cfg.parallel.zero_reduce
    v = args.virtual_stages if args.schedule in ("interleaved", "zb") else 1
    if args.schedule == "interleaved" and v < 2:
        raise UserError("--schedule interleaved needs --virtual-stages 2 or more")
    search = args.tp is None or args.pp is None
    plans, out = [], None
    if not search:
        tp, pp = args.tp, args.pp
        if cluster.world_size % (tp * pp):
            raise UserError(f"{cluster.world_size} GPUs are not divisible by tp*pp = {tp * pp}")
        recompute = args.recompute or ("full" if cfg.train.activation_checkpointing else "none")
        layout = Layout(tp, pp, cluster.world_size // (tp * pp), args.micro_batch or cfg.train.micro_batch,
                        args.schedule, v, args.zero, sp and tp > 1, recompute, zero_reduce, args.attention)
        out = plan_layout(cfg.model, cluster, layout, batch, precision, calib)
        if args.dry_run:
            out["dry_run"] = _dry_run_report(cfg.model, layout, args.rank, out, precision)
    options = dict(tp=[args.tp] if args.tp else None, pp=[args.pp] if args.pp else None,
                   micro_batch=[args.micro_batch] if args.micro_batch else None,
                   recompute=[args.recompute] if args.recompute else None, zero=args.zero,
                   sequence_parallel=sp, schedule=args.schedule, virtual_stages=v, zero_reduce=zero_reduce,
                   attention=args.attention)
    if search or args.plot:
        plans = search_layouts(cfg.model, cluster, batch, precision, calib, include_unfit=True, **options)
    if search:
        fitting = [p for p in plans if p["fits"]]
        if args.dry_run:
            if not fitting:
                raise UserError("no layout fits, so there is nothing to dry-run")
            L = Layout(**fitting[0]["layout"])
            fitting[0]["dry_run"] = _dry_run_report(cfg.model, L, args.rank, fitting[0], precision)
    if args.plot:
        write_plot(plans, args.plot, cluster, top=max(args.top, 1))
    if args.json:
        if search:
            shown = plans if args.all else [p for p in plans if p["fits"]]
            print(json.dumps({"gpus": cluster.world_size, "global_batch": batch,
                              "params": plans[0]["params"] if plans else None, "layouts": shown}, indent=1))
        else:
            print(json.dumps(out, indent=1))
        return 0
    if search:
        print_search(plans, cluster, batch, top=args.top, show_unfit=args.all)
    else:
        print_plan(out, cfg.model)
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _dry_run_report(cfg, layout: Layout, rank: int, plan: dict, precision: str) -> dict:
    from mtnlg.plan.dryrun import dry_run
    from mtnlg.plan.memory import GB, stage_params_local
    d = dry_run(cfg, layout, rank)
    stage = d["coords"]["pp"]
    analytic = stage_params_local(cfg, layout.tp, layout.pp, stage, d["padded_vocab"])
    mem = model_state_bytes(d["params"], layout.dp, layout.zero, precision, reduces_per_step(layout))
    d.update(analytic_params=analytic, match=d["params"] == analytic,
             model_state_gb={k: v / GB for k, v in mem.items()})
    return d


def _fmt_layout(L: dict) -> str:
    v = f"x{L['virtual_stages']}" if L["virtual_stages"] > 1 else ""
    return (f"tp {L['tp']} x pp {L['pp']}{v} x dp {L['dp']}, micro-batch {L['micro_batch']}, {L['schedule']}, "
            f"recompute {L['recompute']}, ZeRO-{L['zero']}" + (", sequence parallel" if L["sequence_parallel"] else "")
            + (", gradients reduced once per step" if L.get("zero_reduce") == "step" and L["zero"] >= 2
               and L["pp"] > 1 and L["dp"] > 1 else ""))


def print_plan(p: dict, cfg) -> None:
    L, t = p["layout"], p["time_breakdown_s"]
    w = sys.stdout.write
    w(f"model       {p['params'] / 1e9:.2f}B parameters ({cfg.n_layers} layers, hidden {cfg.hidden}, "
      f"{cfg.n_heads} heads, seq {cfg.seq_len}, vocab padded to {p['padded_vocab']})\n")
    w(f"cluster     {p['nodes']} nodes x {p['gpus'] // p['nodes']} {p['gpu']} = {p['gpus']} GPUs\n")
    w(f"layout      {_fmt_layout(L)}\n")
    w(f"batch       {p['global_batch']} sequences = {p['microbatches_per_replica']} micro-batches per replica\n")
    w(f"FLOPs       {p['flops_per_iteration']:.3e} per iteration executed "
      f"({p['model_flops_per_iteration']:.3e} without recomputation)\n")
    w(f"time        {p['iteration_time_s']:.4g} s per iteration: pipeline {t['pipeline']:.2f} s "
      f"(bubble {t['bubble']:.2f} s = {100 * p['bubble_fraction']:.1f}% of the steady state; "
      f"tp comm {t['tensor_parallel_comm']:.2f} s, p2p {t['pipeline_p2p']:.2f} s), "
      f"dp comm {t['data_parallel_comm']:.2f} s, optimizer {t['optimizer']:.2f} s\n")
    w(f"throughput  {p['tflops_per_gpu']:.1f} TFLOP/s per GPU (MFU {100 * p['mfu']:.1f}%), "
      f"{p['tokens_per_s']:,.0f} tokens/s\n")
    w(f"memory      {p['memory_per_gpu_gb']:.1f} GB per GPU on the worst stage, {p['usable_memory_gb']:.0f} GB usable: "
      f"{'fits' if p['fits'] else 'DOES NOT FIT'}\n")
    for s in p["stages"]:
        m = s["memory_gb"]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in m.items())
        w(f"  {s['kind']:<6} stage {s['stage']:>3}: {s['layers']} layers, {s['params'] / 1e9:.3f}B params/GPU; "
          f"{parts} = {s['memory_total_gb']:.1f} GB\n")
    if "dry_run" in p:
        d = p["dry_run"]
        w(f"dry run     rank {d['rank']} {d['coords']}: blocks {d['blocks']}, {d['params']:,} parameters on the meta "
          f"device; analytic {d['analytic_params']:,}: {'match' if d['match'] else 'MISMATCH'}\n")


def print_search(plans: list[dict], cluster, batch: int, top: int, show_unfit: bool) -> None:
    fitting = [p for p in plans if p["fits"]]
    rows = (plans if show_unfit else fitting)[:top]
    print(f"{len(plans)} layouts of {cluster.world_size} {cluster.gpu.name} GPUs for global batch {batch}; "
          f"{len(fitting)} fit in {cluster.gpu.memory_gb:g} GB; fastest first")
    head = f"{'#':>3} {'tp':>3} {'pp':>4} {'dp':>5} {'mb':>3} {'recompute':>9} {'ZeRO':>4} {'sp':>3} " \
           f"{'time s':>9} {'TFLOP/s':>8} {'MFU%':>5} {'bubble%':>7} {'mem GB':>8} {'fits':>4}"
    print(head)
    print("-" * len(head))
    for i, p in enumerate(rows, 1):
        L = p["layout"]
        print(f"{i:>3} {L['tp']:>3} {L['pp']:>4} {L['dp']:>5} {L['micro_batch']:>3} {L['recompute']:>9} "
              f"{L['zero']:>4} {'y' if L['sequence_parallel'] else 'n':>3} {p['iteration_time_s']:>9.3g} "
              f"{p['tflops_per_gpu']:>8.1f} {100 * p['mfu']:>5.1f} {100 * p['bubble_fraction']:>7.1f} "
              f"{p['memory_per_gpu_gb']:>8.1f} {'yes' if p['fits'] else 'no':>4}")
    if not fitting:
        print("no layout fits: add GPUs, raise --zero, enable --sequence-parallel or --recompute full")
    if rows and "dry_run" in rows[0]:
        d = rows[0]["dry_run"]
        print(f"dry run of #1, rank {d['rank']}: {d['params']:,} parameters on the meta device, analytic "
              f"{d['analytic_params']:,}: {'match' if d['match'] else 'MISMATCH'}")


def write_plot(plans: list[dict], path: str, cluster, top: int) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'mtnlg[plot]'") from None
    # the fastest layouts that fit, and (gray) the fastest few that would be quicker but do not
    by_time = sorted(plans, key=lambda p: p["iteration_time_s"])
    rows = [p for p in by_time if p["fits"]][:top] + [p for p in by_time if not p["fits"]][:max(3, top // 3)]
    rows.sort(key=lambda p: p["iteration_time_s"])
    if not rows:
        raise UserError("no layouts to plot")
    labels = [f"{p['layout']['tp']}/{p['layout']['pp']}/{p['layout']['dp']} mb{p['layout']['micro_batch']} "
              f"{p['layout']['recompute'][:3]}" for p in rows]
    colors = ["tab:blue" if p["fits"] else "tab:gray" for p in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(rows)), 7), sharex=True)
    a.bar(range(len(rows)), [p["iteration_time_s"] for p in rows], color=colors)
    a.set_ylabel("predicted s / iteration")
    a.set_title(f"{cluster.world_size} x {cluster.gpu.name}: layouts tp/pp/dp (gray: does not fit)")
    b.bar(range(len(rows)), [p["memory_per_gpu_gb"] for p in rows], color=colors)
    b.axhline(rows[0]["usable_memory_gb"], color="tab:red", linestyle="--", label="usable memory")
    b.set_ylabel("GB per GPU (worst stage)")
    b.legend()
    b.set_xticks(range(len(rows)), labels, rotation=70, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
