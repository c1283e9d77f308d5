"""DDP with 2 real gloo processes on CPU (torchrun --nproc_per_node 2 ... with use_cpu=True)."""

import json
import os
import socket
import subprocess
import sys

import pytest


WORKER = os.path.join(os.path.dirname(__file__), "distributed", "ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, nproc, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [f"--master_port={free_port()}", "--master_addr=127.0.0.1", WORKER, "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(out, 2)
    launch(out, 1, "--single")
    ranks = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    single = json.load(open(out / "single.json"))
    return ranks, single


@pytest.mark.distributed
def test_runs_real_ddp_with_two_ranks(ddp_results):
    ranks, _ = ddp_results
    for r in ranks:
        assert r["base_update"]["world_size"] == 2
        assert r["base_update"]["wrapped"] == "DistributedDataParallel"
        assert r["base_update"]["meta_steps"] == 3


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["base_update", "restore", "adaptive"])
def test_theta_and_lambda_bit_identical_across_ranks(ddp_results, case):
    ranks, _ = ddp_results
    assert ranks[0][case]["theta"] == ranks[1][case]["theta"]
    assert ranks[0][case]["lambda"] == ranks[1][case]["lambda"]


@pytest.mark.distributed
def test_meta_gradient_is_the_mean_of_per_rank_finite_differences(ddp_results):
    ranks, _ = ddp_results
    for r in ranks:
        assert r["restore"]["estimator_rel_err"] < 1e-4
        assert r["restore"]["local_vs_mean_rel"] > 1e-3  # ranks see different data: the average matters


@pytest.mark.distributed
def test_two_ranks_of_four_match_one_rank_of_eight_for_base_steps(ddp_results):
    ranks, single = ddp_results
    import torch

    for a, b in zip(ranks[0]["base_only"]["params"], single["base_only"]["params"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
def test_communication_per_meta_step(ddp_results):
    ranks, _ = ddp_results
    restore, update = ranks[0]["restore"], ranks[0]["base_update"]
    assert restore["comm_calls_per_meta_step"] == 1  # the meta-gradient only
    assert restore["comm_bytes_per_meta_step"] == restore["lambda_bytes"]
    assert update["comm_calls_per_meta_step"] == 2  # + the base update θ ← θ - mean_r(ε_r·u_r)
    assert update["comm_bytes_per_meta_step"] == update["lambda_bytes"] + update["theta_bytes"]
