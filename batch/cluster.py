"""Joining or starting Ray, and planning the actors from what the cluster has.

An actor that asks for a resource the cluster lacks waits forever (a `num_gpus=1` actor on a
cluster without GPUs never starts), so `plan` reads `ray.cluster_resources()` first and asks
only for what is there; the plan says what it chose and why (`Plan.describe`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
from dataclasses import dataclass

from camface.errors import CamfaceError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
RENDER_CPU = 1.0  # a recording render actor keeps a core busy (decode, draw, encode)
# Render actors per CPU when recording: measured (benchmarks/RESULTS.md) a render actor does about
# 1.7x the frames per second of a detection actor, so R = 0.6 D balances them: R = 0.375 C.
RENDER_SHARE, RENDER_SHARE_ROWS_ONLY = 0.375, 1 / 16
GRAPH_CPU = 0.5  # the CPU share of a graph actor without a GPU (ORT on one thread)


class ClusterError(CamfaceError):
    """Ray could not be started or joined, or the cluster cannot run the plan."""


def check_reachable(address: str) -> None:
    """ClusterError naming `address` when nothing answers on its host:port within
    CONNECT_TIMEOUT_S (ray.init itself retries for about a minute)."""
    if address == "auto" or address.startswith(("ray://", "local")):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default), "
                           "'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach a Ray cluster at {address}: {exc}") from exc


def connect(address: str | None) -> bool:
    """Join the cluster at `address` ('auto', HOST:PORT, ray://...; None: RAY_ADDRESS if set,
    else start a local Ray on this machine's cores, quietly, without the dashboard). Returns
    True when this call started or joined Ray (the caller shuts it down), False when Ray was
    already initialised in this process (tests, a `ray job` entry point that did it)."""
    import ray

    if address is not None:
        check_reachable(address)  # also when Ray is up already: a wrong address is a mistake
    if ray.is_initialized():
        quiet_ray_data()
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
    try:
        if address is None:  # "local": a new Ray of our own, not the last one started on this machine
            ray.init(address="local", **common)  # (ray.init() joins that one, another run's included)
        else:
            check_reachable(address)  # RAY_ADDRESS too
            common.pop("include_dashboard")  # the cluster's own choice
            ray.init(address=address, **common)
    except ClusterError:
        raise
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM through ray.init's own handler
        if ray.is_initialized():
            ray.shutdown()  # a half-started local Ray's processes go too
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
            from camface.realtime.threads import Terminated

            raise Terminated() from None
        raise
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"cannot {'start a local Ray' if address is None else f'join the Ray cluster at {address}'}: "
                           f"{first}") from exc
    quiet_ray_data()
    return True


def quiet_ray_data() -> None:
    """Ray Data logs every execution and that its own bars are off: the driver draws one bar."""
    import ray.data  # noqa: F401  (configures its loggers on import)

    logging.getLogger("ray.data").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Plan:
    """How many actors of each stage, and what each asks Ray for.

    detect_actors x detect_cpus: decode + BlazeFace detection + cropping, one unit (video or
    segment) at a time.
    graph_actors x (graph_cpus, graph_gpus): the CAM graph; graph_gpus > 0 puts them on GPU
    nodes (ONNX Runtime then picks CUDA/TensorRT through CamGraph's device chain).
    render_actors x render_cpus: decode again, draw, encode, write the rows.
    """

    detect_actors: int
    detect_cpus: float
    graph_actors: int
    graph_cpus: float
    graph_gpus: float
    render_actors: int
    render_cpus: float
    cluster_cpus: float
    cluster_gpus: float
    reason: str
    fused: bool = False  # one actor per unit runs all three stages (detect_actors of them)

    def describe(self) -> str:
        if self.fused:
            return (f"Ray cluster: {self.cluster_cpus:g} CPU, {self.cluster_gpus:g} GPU; {self.detect_actors} "
                    f"actor(s) each running detection, the graph on CPU and rendering on a video or segment "
                    f"({self.reason})")
        graph = (f"{self.graph_actors} graph actor(s) with {self.graph_gpus:g} GPU each" if self.graph_gpus
                 else f"{self.graph_actors} graph actor(s) on CPU")
        return (f"Ray cluster: {self.cluster_cpus:g} CPU, {self.cluster_gpus:g} GPU; "
                f"{self.detect_actors} detection actor(s), {graph}, {self.render_actors} render actor(s) "
                f"({self.reason})")


def plan(resources: dict, graph_gpus: float | None = None, detect_actors: int = 0, render_actors: int = 0,
         graph_actors: int = 1, videos: int | None = None, split: bool | None = None, record: bool = True) -> Plan:
    """The plan for a cluster with `resources` (`ray.cluster_resources()`).

    graph_gpus: GPUs per graph actor; None = 1 when the cluster has a GPU, else 0. A request
    for more GPUs than the cluster has raises ClusterError (it would wait forever).
    detect_actors / render_actors: 0 = auto: the CPUs left after the graph and render shares
    go to detection (the costliest stage), at most one actor per unit (`videos`: the number of
    units); render actors: 0.375
    per CPU when recording (1/16 without: rows only). split: separate stages (None: only when the graph gets GPUs; without, one
    actor per unit runs every stage and detect_actors is their number, one per CPU by
    default: measured faster on one machine, see benchmarks/RESULTS.md). Logical CPU shares are scaled down when the requests would not fit, so every
    actor can start (Ray's CPU counts only gate scheduling; the OS shares the cores).
    """
    cpus = float(resources.get("CPU", 0))
    gpus = float(resources.get("GPU", 0))
    if cpus <= 0:
        raise ClusterError("the Ray cluster has no CPU to run detection on")
    if graph_gpus is None:
        graph_gpus, reason = (1.0, "a GPU is there: the graph runs on it") if gpus else \
            (0.0, "no GPU in the cluster: the graph runs on CPU")
    else:
        reason = f"--graph-gpus {graph_gpus:g}"
    if graph_gpus < 0:
        raise ClusterError(f"--graph-gpus must be >= 0, got {graph_gpus}")
    if graph_gpus > 0 and graph_gpus * graph_actors > gpus + 1e-9:
        raise ClusterError(f"--graph-gpus {graph_gpus:g} x {graph_actors} graph actor(s) asks for more GPUs than "
                           f"the cluster has ({gpus:g}); an actor asking for a missing GPU would wait forever")
    if not (graph_gpus > 0 if split is None else split):
        reason = ("--no-split-stages: the graph runs on CPU in each actor; the cluster's GPUs are not used"
                  if graph_gpus > 0 else f"{reason}; no GPU to hand the graph to, so the stages share one process "
                                         "per unit")
        actors = detect_actors or max(1, math.floor(cpus))
        actors = min(actors, max(1, videos)) if videos is not None else actors
        reason += _capped("--detect-actors", detect_actors, actors)
        unused = [f"{flag} {n}" for flag, n, default in (("--graph-actors", graph_actors, 1),
                                                           ("--render-actors", render_actors, 0)) if n != default]
        if unused:  # said, not dropped without a word: they size pools this plan has not
            reason += f"; {' and '.join(unused)} not used: they size the separate stages (--split-stages)"
        return Plan(actors, _floor(min(1.0, cpus / actors)), actors, 0.0, 0.0, actors, 0.0, cpus, gpus, reason,
                    fused=True)
    graph_cpus = 0.0 if graph_gpus > 0 else GRAPH_CPU
    if graph_gpus == 0 and graph_actors > max(1, math.floor(cpus)):
        # ORT on one thread an actor: one more than the CPUs only waits, ~0.35 GB each (1000 on 2 CPUs
        # started hundreds of Ray workers, their shares scaled down to fit, and the run never moved)
        reason += (f"; --graph-actors {graph_actors}: the graph runs on CPU, one thread an actor, so "
                   f"{max(1, math.floor(cpus))} (one per CPU)")
        graph_actors = max(1, math.floor(cpus))
    asked_detect, asked_render = detect_actors, render_actors
    render_actors = render_actors or max(1, round(cpus * (RENDER_SHARE if record else RENDER_SHARE_ROWS_ONLY)))
    detect_actors = detect_actors or max(1, math.floor(cpus - graph_cpus * graph_actors - RENDER_CPU * render_actors
                                                       + 1e-9))
    if videos is not None:  # an actor beyond one per unit would only load its models and wait
        detect_actors = min(detect_actors, max(1, videos))
        render_actors = min(render_actors, max(1, videos))
    reason += _capped("--detect-actors", asked_detect, detect_actors) + _capped("--render-actors", asked_render,
                                                                              render_actors)
    detect_cpus, render_cpus = 1.0, RENDER_CPU
    wanted = detect_actors * detect_cpus + graph_actors * graph_cpus + render_actors * render_cpus
    if wanted > cpus:
        scale = cpus / wanted
        detect_cpus, graph_cpus, render_cpus = detect_cpus * scale, graph_cpus * scale, render_cpus * scale
    return Plan(detect_actors, _floor(detect_cpus), graph_actors, _floor(graph_cpus), graph_gpus,
                render_actors, _floor(render_cpus), cpus, gpus, reason)


def _capped(flag: str, asked: int, actors: int) -> str:
    """The note for a plan whose `flag` asked for more actors than there are units of work."""
    return f"; {flag} {asked}: {actors} unit(s) of work, so {actors} actor(s)" if asked > actors else ""


def _floor(share: float) -> float:
    """Round a CPU share down (to 1/10000) so the requests never add up past the cluster."""
    return math.floor(share * 10_000) / 10_000
