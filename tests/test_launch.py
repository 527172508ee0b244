"""Launching with torchrun: `deltatune train --nproc N` and the two-"node" rehearsal on loopback; a rank killed
mid-run takes the job down within seconds with a message naming it, and `--resume auto` then ends with the
weights of an uninterrupted run of the same world size (exactly: fp32, dropout on, 1 thread per rank).

The process tests cost 10-20 s each on two cores: three launches in all (an uninterrupted `--nproc 2` run,
two nodes with a rank killed, the two nodes resumed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
from typer.testing import CliRunner

from deltatune import config, launch
from deltatune.cli import app
from tests.conftest import save_tiny_bert

STEPS = 8
KILLED_AFTER = 5  # rank 1 dies after step 5: checkpoints at steps 2 and 4 exist, step 6 is the first lost
EXIT_BOUND_S = 30  # from the kill to both launchers' exit; measured ~1-3 s (a hang would be gloo's 30 minutes)


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory, tokenizer_dir, toy_data) -> Path:
    """A tiny run with dropout on (so an exact resume needs every rank's RNG state), written as YAML."""
    d = tmp_path_factory.mktemp("launch")
    model = save_tiny_bert(d / "bert", tokenizer_dir, dropout=0.1)
    overrides = {"model.name": model, "data.train": toy_data["train"], "data.validation": toy_data["validation"],
                 "train.max_steps": STEPS, "train.batch_size": 8, "train.lr": 3e-3, "train.precision": "fp32",
                 "train.log_every": 1, "train.threads": 1, "train.save_every": 2, "eval.every": 4,
                 "eval.metric": "loss", "output.dir": d / "run"}
    path = d / "config.yaml"
    path.write_text(config.load(None, [f"{k}={v}" for k, v in overrides.items()]).to_yaml())
    return path


def deltatune_train(cfg: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    # One thread per rank: two ranks on two cores (the "nodes" of the rehearsal would each count both cores).
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "deltatune", "train", str(cfg), *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(cfg: Path, run: Path, *extra: str, node1_env: dict | None = None) -> list[subprocess.Popen]:
    endpoint = f"127.0.0.1:{free_port()}"
    return [deltatune_train(cfg, f"output.dir={run}", *extra, "--nnodes", "2", "--node-rank", str(rank),
                            "--nproc", "1", "--rdzv-endpoint", endpoint, env=node1_env if rank else None)
            for rank in (0, 1)]


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


@pytest.fixture(scope="module")
def reference(cfg_path) -> tuple[Path, dict, float]:
    """An uninterrupted `deltatune train --nproc 2` run: (run dir, summary, seconds)."""
    t0 = time.perf_counter()
    proc = deltatune_train(cfg_path, "--nproc", "2")
    log = finish(proc)
    assert proc.returncode == 0, log
    run = cfg_path.parent / "run"
    return run, json.loads((run / "summary.json").read_text()), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# Without processes: flags, the torchrun command line, threads, the failure sentence


def test_flags_are_checked_with_sentences():
    assert not launch.Topology.from_flags(1).launches  # --nproc 1 alone trains in this process
    assert launch.Topology.from_flags(2).launches
    for flags, words in [((0,), "--nproc 0: the number of processes on this node must be 1 or more"),
                         ((2, None, 1), "--node-rank 1 without --nnodes"),
                         ((1, 2, 0), "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
                         ((1, 2, None, "h:1"), "--nnodes 2 needs --node-rank R"),
                         ((1, 2, 2, "h:1"), "--node-rank 2: with --nnodes 2 it must be 0 ... 1"),
                         ((1, 2, 0, "h"), "--rdzv-endpoint h: expected HOST:PORT"),
                         ((2, None, None, "h:1"), "--rdzv-endpoint h:1 without --nnodes 2 or more")]:
        with pytest.raises(launch.LaunchError, match=re.escape(words)):
            launch.Topology.from_flags(*flags)
    result = CliRunner().invoke(app, ["train", "x.yaml", "--node-rank", "1"])  # checked before the config is read
    assert result.exit_code != 0 and "--node-rank 1 without --nnodes" in str(result.exception)


def test_torchrun_argv_passes_the_run_on_and_keeps_the_launch_flags():
    argv = launch.torchrun_argv(["cfg.yaml", "train.lr=1e-4"], "auto", launch.Topology(nproc=3), python="py")
    assert argv[:3] == ["py", "-m", "torch.distributed.run"]
    cut = argv.index("-m", 3)
    assert argv[cut:] == ["-m", "deltatune", "train", "cfg.yaml", "train.lr=1e-4", "--resume", "auto"]
    head = argv[3:cut]
    assert "--standalone" in head and head[head.index("--nproc-per-node") + 1] == "3"
    multi = launch.Topology.from_flags(2, 4, 3, "node0.example.com:29500")
    argv = launch.torchrun_argv(["cfg.yaml"], None, multi, python="py")
    cut = argv.index("-m", 3)
    assert argv[cut:] == ["-m", "deltatune", "train", "cfg.yaml"]
    head = argv[3:cut]
    for flag, value in [("--nnodes", "4"), ("--node-rank", "3"), ("--rdzv-endpoint", "node0.example.com:29500"),
                        ("--rdzv-backend", "static"), ("--nproc-per-node", "2")]:
        assert head[head.index(flag) + 1] == value
    assert "--standalone" not in head


def test_each_rank_gets_its_share_of_the_cores():
    assert [launch.threads_per_rank(n, available=16) for n in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    env = launch.worker_env(launch.Topology(nproc=2), environ={})
    assert env["OMP_NUM_THREADS"] == str(launch.threads_per_rank(2)) and env[launch.LAUNCH_ENV] == "--nproc 2"
    assert "OMP_NUM_THREADS" not in launch.worker_env(launch.Topology(nproc=2), {"OMP_NUM_THREADS": "3"})


def failure(tmp_path: Path, rank: int, exitcode: int, error: str | None = None, at: int = 100) -> ProcessFailure:
    """A ProcessFailure as torchrun builds it: from the rank's error file when it raised, else from the signal."""
    path = tmp_path / f"error-{rank}.json"
    if error is not None:
        path.write_text(json.dumps({"message": {"message": error, "extraInfo": {"py_callstack": "...",
                                                                                "timestamp": str(at)}}}))
    f = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))
    f.timestamp = at
    return f


def test_the_failure_sentence_names_the_cause_not_the_casualties(tmp_path):
    lost = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:35544. This is typically caused"
    # rank 1 killed; rank 0's collective lost its peer in the same second (it sorts first: lower rank)
    text, code = launch.describe({0: failure(tmp_path, 0, 1, lost), 1: failure(tmp_path, 1, -9)})
    assert text.startswith("training stopped: rank 1 (pid 1001) was killed by SIGKILL") and code == 1
    assert text.endswith("Stopped with it: rank 0.")
    text, code = launch.describe({0: failure(tmp_path, 0, -15), 1: failure(tmp_path, 1, 2, "ConfigError: no file")})
    assert "rank 1 (pid 1001) failed with exit code 2: ConfigError: no file" in text and code == 2
    same = "ValueError: x"
    text, _ = launch.describe({0: failure(tmp_path, 0, 2, same, at=101), 1: failure(tmp_path, 1, 2, same)})
    assert text.startswith("training stopped: rank 1 (pid 1001) failed") and "Rank 0 failed the same way" in text
    text, _ = launch.describe({0: failure(tmp_path, 0, 1, lost)}, launch.Topology(1, 2, 0, "h:1"))
    assert "rank 0 (pid 1000) lost its connection to another rank (gloo: connection closed by peer)" in text
    assert "no rank on this node (node 0) failed by itself, so the cause is on another node" in text
    # what our ranks do: exit PEER_LOST_EXIT without an error file; observed later, or in the same second
    text, code = launch.describe({0: failure(tmp_path, 0, launch.PEER_LOST_EXIT), 1: failure(tmp_path, 1, -9)})
    assert text.startswith("training stopped: rank 1 (pid 1001) was killed by SIGKILL") and code == 1


# ---------------------------------------------------------------------------------------------------------
# Processes


def test_nproc_2_trains_with_world_size_2(reference):
    run, summary, seconds = reference
    print(f"\n--nproc 2: {seconds:.1f} s", end="")
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert (run / "model" / "model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step-000006"
    assert {p.name for p in (run / "checkpoints" / "step-000006").glob("rng-rank*.pt")} == \
        {"rng-rank0.pt", "rng-rank1.pt"}


def killed_on_node_1(cfg_path: Path, run: Path) -> tuple[list[str], list[int], list[float]]:
    """Two nodes; node 1's only rank (global rank 1) SIGKILLs itself after step KILLED_AFTER. Returns both
    launchers' output, exit codes, and the seconds from the kill (rank 0 logs that step) to each one's exit."""
    procs = two_nodes(cfg_path, run, node1_env={"DELTATUNE_TEST_KILL": f"step:{KILLED_AFTER}"})
    metrics, killed_at, exited = run / "metrics.jsonl", None, [0.0, 0.0]
    deadline = time.time() + 120
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if killed_at is None and metrics.exists() and f'"step": {KILLED_AFTER},' in metrics.read_text("utf-8"):
            killed_at = time.perf_counter()
        time.sleep(0.02)
        exited = [t or (time.perf_counter() if p.poll() is not None else 0.0) for t, p in zip(exited, procs)]
    logs = [finish(p, timeout=5) for p in procs]
    assert killed_at is not None, "the run never reached the kill:\n" + "\n".join(logs)
    return logs, [p.returncode for p in procs], [t - killed_at for t in exited]


def test_a_killed_rank_stops_the_job_with_its_name_and_the_two_nodes_resume_exactly(cfg_path, reference,
                                                                                       tmp_path):
    """Also the multi-node rehearsal: two launchers on loopback (--nnodes 2, one process each) sharing
    output.dir train, checkpoint and export; rank 0 alone takes the run directory's lock."""
    ref_run, ref, _ = reference
    run = tmp_path / "run"
    logs, codes, seconds = killed_on_node_1(cfg_path, run)
    print(f"\nkilled rank 1: launchers of node 0 / node 1 exited {seconds[0]:.1f} / {seconds[1]:.1f} s after the "
          f"kill", end="")
    assert codes[0] != 0 and codes[1] != 0, logs
    assert max(seconds) < EXIT_BOUND_S, logs
    assert re.search(r"error: training stopped: rank 1 \(pid \d+\) was killed by SIGKILL", logs[1]), logs[1]
    assert "no rank on this node (node 0) failed by itself, so the cause is on another node" in logs[0], logs[0]
    assert "Last complete checkpoint:" in logs[0] and "step 4" in logs[0] and "--resume auto" in logs[0]
    assert not (run / "summary.json").exists()

    t0 = time.perf_counter()
    procs = two_nodes(cfg_path, run, "--resume", "auto")
    logs = [finish(p) for p in procs]
    print(f"; resumed on two nodes in {time.perf_counter() - t0:.1f} s", end="")
    assert [p.returncode for p in procs] == [0, 0], logs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_from"] == str(run / "checkpoints" / "step-000004")
    a, b = load_file(ref_run / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "exported model differs"
    a, b = (load_file(r / "checkpoints" / "step-000006" / "weights.safetensors") for r in (ref_run, run))
    assert all(torch.equal(a[k], b[k]) for k in a), "the step-6 checkpoint differs"
    assert summary["evals"] == ref["evals"] and summary["best_step"] == ref["best_step"]
    assert not (run / ".deltatune.lock").exists() and not list(run.parent.glob(".run.*"))


def test_sigterm_to_the_launcher_stops_every_rank_with_143(cfg_path, tmp_path):
    """Not a hang, not a traceback: the ranks get the signal, the launcher exits 143."""
    proc = deltatune_train(cfg_path, f"output.dir={tmp_path / 'run'}", "train.max_steps=100000", "--nproc", "2")
    saved = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json"  # written last: complete
    deadline = time.time() + 60
    while not saved.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    t0 = time.perf_counter()
    log = finish(proc, timeout=60)
    print(f"\nSIGTERM: launcher exited in {time.perf_counter() - t0:.1f} s", end="")
    assert proc.returncode == 143, log
    assert "stopped by SIGTERM; last complete checkpoint" in log and "--nproc 2" in log, log
