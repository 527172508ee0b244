"""Start a training run on several processes or machines through torchrun (torch.distributed.run).

`deltatune train CONFIG --nproc N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]` is this module:
`Topology` checks the flags, `torchrun_argv` writes the torchrun command line (the same one a user can
type), `run` runs torchrun's own launcher in this process and turns a failed rank into one sentence
(`describe`). The ranks themselves run `python -m deltatune train CONFIG ...` and never see the launch
flags. See docs/distributed.md.

    from deltatune import launch
    launch.run(["cfg.yaml", "train.lr=1e-4"], topology=launch.Topology(nproc=2))
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deltatune.errors import DeltatuneError

LAUNCH_ENV = "DELTATUNE_LAUNCH"  # the launch flags, for the resume command a rank prints (see resume_command)
# A rank's exit code when its collective lost a peer: a casualty. No error file is written for it, so that
# torchrun's own "first observed failure" (whole seconds) names the rank that died, not this one.
PEER_LOST_EXIT = 3
# Gloo's words when the other end of a collective went away: this rank is a casualty, not the cause.
PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote worker crashing")


class LaunchError(DeltatuneError):
    """A launch flag was wrong."""


class RankFailed(DeltatuneError):
    """A rank of a launched job failed; the message names it and the cause. `exit_code` is for the shell."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Topology:
    """Processes on this node (nproc), nodes in the job (nnodes), this node's place (node_rank, 0 = the node
    whose HOST:PORT is the rendezvous endpoint and whose rank 0 writes output.dir)."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @classmethod
    def from_flags(cls, nproc: int | None, nnodes: int | None = None, node_rank: int | None = None,
                   rdzv_endpoint: str | None = None) -> Topology:
        """The CLI's flags, checked; a wrong combination is refused with the fix."""
        if nproc is not None and nproc < 1:
            raise LaunchError(f"--nproc {nproc}: the number of processes on this node must be 1 or more.")
        if nnodes is not None and nnodes < 1:
            raise LaunchError(f"--nnodes {nnodes}: the number of nodes must be 1 or more.")
        multi = nnodes is not None and nnodes > 1
        if node_rank is not None and not multi:
            raise LaunchError(f"--node-rank {node_rank} without --nnodes: a node rank only means something in a job "
                              f"of several nodes. Fix: add --nnodes M (and --rdzv-endpoint HOST:PORT), or drop "
                              f"--node-rank.")
        if rdzv_endpoint is not None and not multi:
            raise LaunchError(f"--rdzv-endpoint {rdzv_endpoint} without --nnodes 2 or more: one node needs no "
                              f"rendezvous endpoint (it picks a free local port). Fix: add --nnodes M and "
                              f"--node-rank R, or drop --rdzv-endpoint.")
        if multi:
            _check_multi(nnodes, node_rank, rdzv_endpoint)
        return cls(nproc=nproc or 1, nnodes=nnodes or 1, node_rank=node_rank or 0, rdzv_endpoint=rdzv_endpoint)

    @property
    def launches(self) -> bool:
        """Whether torchrun is needed: one process on one node trains in this process."""
        return self.nproc > 1 or self.nnodes > 1

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    def flags(self) -> list[str]:
        """These settings as `deltatune train` flags."""
        flags = ["--nproc", str(self.nproc)]
        if self.nnodes > 1:
            flags += ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                      "--rdzv-endpoint", str(self.rdzv_endpoint)]
        return flags


def _check_multi(nnodes: int, node_rank: int | None, endpoint: str | None) -> None:
    if endpoint is None:
        raise LaunchError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT: the address of node 0 (the one "
                          f"started with --node-rank 0), reachable from every node, and a free port on it, e.g. "
                          f"--rdzv-endpoint node0.example.com:29500.")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"--rdzv-endpoint {endpoint}: expected HOST:PORT with a port from 1 to 65535, e.g. "
                          f"node0.example.com:29500.")
    if node_rank is None:
        raise LaunchError(f"--nnodes {nnodes} needs --node-rank R on each node: 0 on the node at --rdzv-endpoint "
                          f"{endpoint}, then 1 ... {nnodes - 1} on the others.")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank {node_rank}: with --nnodes {nnodes} it must be 0 ... {nnodes - 1} (0 on "
                          f"the node at --rdzv-endpoint {endpoint}).")


def cores() -> int:
    """CPU cores this process may run on (a taskset or container limit counts, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(nproc: int, available: int | None = None) -> int:
    """Torch threads for each of `nproc` ranks on one node: the cores shared out, at least one. More threads
    than cores in total made steps about 10x slower (every rank's threads fight for the same cores)."""
    return max(1, (available or cores()) // nproc)


def torchrun_argv(args: Sequence[str], resume: str | None = None, topology: Topology = Topology(),
                  python: str | None = None) -> list[str]:
    """The torchrun command line that runs `deltatune train ARGS [--resume RESUME]` on `topology`.

    args: CONFIG and overrides, as given to `deltatune train` (passed on unchanged; launch flags are not).
    One node: a standalone rendezvous on a free local port. Several: a static rendezvous at
    `rdzv_endpoint`, hosted by node 0, so that global ranks follow --node-rank (node 0 holds rank 0)."""
    argv = [python or sys.executable, "-m", "torch.distributed.run"]
    if topology.nnodes == 1:
        argv += ["--standalone", "--nnodes", "1"]
    else:
        argv += ["--nnodes", str(topology.nnodes), "--node-rank", str(topology.node_rank),
                 "--rdzv-backend", "static", "--rdzv-endpoint", str(topology.rdzv_endpoint)]
    argv += ["--nproc-per-node", str(topology.nproc), "--max-restarts", "0",
             "-m", "deltatune", "train", *args]
    return argv + (["--resume", resume] if resume else [])


def worker_env(topology: Topology, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables every rank gets on top of this process's environment: OMP_NUM_THREADS (unless the
    user set it: then theirs is kept) and the launch flags for the resume hint a rank prints."""
    environ = os.environ if environ is None else environ
    env = {LAUNCH_ENV: shlex.join(topology.flags())}
    if "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(threads_per_rank(topology.nproc))
    return env


@contextlib.contextmanager
def _environment(extra: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `extra` while torchrun starts its ranks (it passes os.environ on), then as it was."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(args: Sequence[str], resume: str | None = None, topology: Topology = Topology()) -> None:
    """Run `deltatune train ARGS` on `topology` with torchrun's launcher (in this process) and wait.

    Raises RankFailed naming the rank that failed first and why (the other ranks are stopped by torchrun
    within seconds); KeyboardInterrupt or faults.Terminated when this launcher got SIGINT or SIGTERM (the
    ranks got it too and stopped as a single process would)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from deltatune.engine.faults import Terminated

    argv = torchrun_argv(args, resume, topology)
    env = worker_env(topology)
    threads = env.get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))
    print(f"deltatune: {topology.nproc} process(es) on this node, {threads} thread(s) each, "
          f"{topology.world} in all: {shlex.join(argv)}", file=sys.stderr, flush=True)
    try:
        with _environment(env):
            torchrun.run(torchrun.parse_args(argv[3:]))
    except ChildFailedError as e:
        message, code = describe(e.failures, topology)
        raise RankFailed(message, code) from None
    except SignalException as e:
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise Terminated() from None


def _cause(message: object) -> str:
    """The one line worth reading from torchrun's record of a failure: the exception, without its traceback."""
    if isinstance(message, dict):
        message = message.get("message", "")
    return str(message).strip().splitlines()[0] if str(message).strip() else ""


def lost_peer(message: object) -> str | None:
    """Gloo's words, when `message` (an exception or its text) says the other end of a collective went away."""
    text = _cause(message if isinstance(message, dict) else str(message)).lower()
    return next((words for words in PEER_LOST if words in text), None)


def _lost_peer(failure) -> bool:
    """A rank stopped by torchrun (SIGTERM) or by a collective whose peer died: a casualty, not a cause."""
    return failure.exitcode in (-signal.SIGTERM, PEER_LOST_EXIT) or lost_peer(failure.message) is not None


def _one(rank: int, failure) -> str:
    """`rank R (pid P) ...` for one failed rank."""
    who = f"rank {rank} (pid {failure.pid})"
    cause = _cause(failure.message)
    if failure.exitcode < 0:
        name = failure.signal_name()
        hint = " (out of memory is the usual reason: see `dmesg`)" if failure.exitcode == -signal.SIGKILL else ""
        return f"{who} was killed by {name}{hint}"
    if lost_peer(failure.message):
        return f"{who} lost its connection to another rank (gloo: {lost_peer(failure.message)})"
    if failure.exitcode == PEER_LOST_EXIT:
        return f"{who} lost its connection to another rank"
    if failure.error_file_data.get("message") not in (None, "<NONE>") and cause:
        return f"{who} failed with exit code {failure.exitcode}: {cause}"
    return f"{who} exited with code {failure.exitcode} (its own output above says why)"


def describe(failures: Mapping[int, object], topology: Topology = Topology()) -> tuple[str, int]:
    """One sentence for the user from torchrun's failures ({global rank: ProcessFailure}) and an exit code.

    The cause is the first failure in time that is not a casualty (a rank torchrun stopped, or one whose
    collective lost its peer); when every failure on this node is a casualty, the cause is on another node.
    The exit code is the failed rank's own (e.g. 2 for a config or data error), 1 when it was killed."""
    order = sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    causes = [(rank, f) for rank, f in order if not _lost_peer(f)]
    rank, first = (causes or order)[0]
    text = _one(rank, first)
    if not causes and topology.nnodes > 1:
        text = (f"{text}; no rank on this node (node {topology.node_rank}) failed by itself, so the cause is on "
                f"another node: see that node's output")
    elif not causes:
        text = f"{text}; it lost a peer rank that had already stopped"
    text += "".join(_others([(r, f) for r, f in order if r != rank], _cause(first.message)))
    code = first.exitcode if first.exitcode > 0 else 1
    return f"training stopped: {text}.", code


def _others(rest: list[tuple[int, object]], cause: str) -> list[str]:
    """What happened to the other failed ranks, grouped: stopped as casualties, the same failure, or another."""
    def ranks(group: list[int]) -> str:
        return f"rank{'s' if len(group) > 1 else ''} {', '.join(map(str, group))}"

    stopped = [r for r, f in rest if _lost_peer(f)]
    same = [r for r, f in rest if not _lost_peer(f) and cause and _cause(f.message) == cause]
    other = [_one(r, f) for r, f in rest if r not in stopped and r not in same]
    parts = [f". {ranks(same).capitalize()} failed the same way"] if same else []
    parts += [f". Also: {'; '.join(other)}"] if other else []
    return parts + ([f". Stopped with it: {ranks(stopped)}"] if stopped else [])


def next_step(output_dir: str | Path, args: Sequence[str], topology: Topology) -> str:
    """After a failed launch: the newest checkpoint and the command that resumes from it, or that there is none."""
    from deltatune.engine import checkpoints

    again = shlex.join(["deltatune", "train", *args, "--resume", "auto", *topology.flags()])
    if topology.node_rank != 0:
        return (f"Checkpoints are written by node 0 (in its output.dir). To resume, run on every node, with "
                f"its own --node-rank: {again}")
    found = checkpoints.latest_with_step(checkpoints.checkpoints_dir(Path(output_dir)))
    if found is None:
        return f"No checkpoint was saved (train.save_every), so the run starts over with: {again}"
    return f"Last complete checkpoint: {found[0]} (step {found[1]}). Resume with: {again}"


def resume_command(args: Sequence[str]) -> str:
    """The command that continues this run, as the user would type it: with the `deltatune train --nproc ...`
    flags that launched it, the torchrun form when torchrun was used directly, else plain."""
    again = ["deltatune", "train", *args, "--resume", "auto"]
    launched = os.environ.get(LAUNCH_ENV)
    if launched is not None:
        return shlex.join([*again, *shlex.split(launched)])
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world > 1:
        nodes = f" --nnodes {world // local} (and your rendezvous flags, on every node)" if world > local else ""
        return f"torchrun --nproc-per-node {local}{nodes} -m {shlex.join(again)}"
    return shlex.join(again)


def record_error(error: BaseException) -> None:
    """Under torchrun, write `error` where torchrun reads a rank's cause of failure (its error file), for
    errors the CLI turns into an exit code instead of a traceback. Call it inside the `except` block."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

        ErrorHandler().record_exception(error)
