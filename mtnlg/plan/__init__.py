"""``mtnlg plan``: the training run on paper.

An analytic model of parameters, FLOPs, memory and time per iteration for any
GPT config and 3D layout (tensor × pipeline × data parallel, ZeRO, sequence
parallelism, recomputation), a search over layouts, and a meta-device dry run
of the real parallelized model.  Formulas, calibration and the reproduced
MT-NLG throughput table are in docs/plan.md.

    cluster.py   GPU presets, cluster shape, calibration constants
    layout.py    the Layout dataclass, validation, stage split, rank placement
    memory.py    parameters per rank, ZeRO model state, activations (Korthikanti et al.)
    timing.py    compute, tp/pp/dp communication, bubble, optimizer step
    cost.py      per-operation step-time model, device profiles (GPU datasheets, --calibrate)
    local_memory.py  CPU peak bytes per rank of a tp x dp run on this machine (--local)
    planner.py   plan_layout and search_layouts
    dryrun.py    build one rank's shard on the meta device under a fake process group
    cli.py       options, tables, JSON, PNG
"""
from mtnlg.plan.cli import add_arguments, run
from mtnlg.plan.cluster import DEFAULT_CALIBRATION, GPUS, Calibration, Cluster, GPUSpec, make_cluster
from mtnlg.plan.layout import Layout
from mtnlg.plan.planner import candidate_layouts, plan_layout, search_layouts

__all__ = ["add_arguments", "run", "plan_layout", "search_layouts", "candidate_layouts", "Layout",
           "Cluster", "GPUSpec", "GPUS", "Calibration", "DEFAULT_CALIBRATION", "make_cluster"]
