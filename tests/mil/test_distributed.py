"""Data-parallel training on the CPU (gloo) matches one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mil.distributed import init_distributed, is_distributed, shard
from mil.models import create_model

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_shard_interleaves_packs() -> None:
    assert shard(list(range(8)), 0, 2) == [0, 2, 4, 6]
    assert shard(list(range(8)), 1, 2) == [1, 3, 5, 7]


def test_single_process_without_torchrun() -> None:
    context = init_distributed("cpu")
    assert context.world_size == 1
    assert context.is_main
    assert not is_distributed()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    env = _environment()
    subprocess.run([sys.executable, str(WORKER), str(single), "4"], check=True, env=env,
                   cwd=REPO_ROOT, timeout=120)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         str(WORKER), str(double), "2"],
        check=True, env=env, cwd=REPO_ROOT, timeout=180,
    )
    one = torch.load(single, weights_only=True)
    two = torch.load(double, weights_only=True)
    torch.manual_seed(0)
    initial = create_model("abmil", in_dim=12, n_classes=2, dropout=0.0).state_dict()

    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in ("embed.0.weight", "attention.score.weight", "classifier.weight"):
        assert not torch.allclose(one[name], initial[name]), f"{name} did not train"
