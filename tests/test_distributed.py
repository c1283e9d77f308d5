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
@pytest.mark.parametrize("case", ["base_update", "restore", "adaptive", "scoped"])
def test_theta_and_lambda_bit_identical_across_ranks(ddp_results, case):
    ranks, _ = ddp_results
    assert ranks[0][case]["theta"] == ranks[1][case]["theta"]
    assert ranks[0][case]["lambda"] == ranks[1][case]["lambda"]


@pytest.mark.distributed
def test_held_out_base_update_takes_one_scale_on_every_rank(ddp_results):
    ranks, _ = ddp_results
    first, second = (r["held_out"] for r in ranks)
    assert first["theta"] == second["theta"] and first["meta_steps"] == len(first["history"]) == 3
    assert first["history"] == second["history"]  # the held-out losses are averaged over the ranks' own batches
    assert first["base_update_scale"] == second["base_update_scale"] < 1.0


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
    from sama_trainer.meta_gradient import SKIP_REASONS

    flags = 4 * len(SKIP_REASONS)  # the skip agreement rides along with the meta-gradient: one float per reason
    restore, update = ranks[0]["restore"], ranks[0]["base_update"]
    assert restore["comm_calls_per_meta_step"] == 1  # the meta-gradient (and the agreement) only
    assert restore["comm_bytes_per_meta_step"] == restore["lambda_bytes"] + flags
    assert update["comm_calls_per_meta_step"] == 2  # + the base update θ ← θ - mean_r(ε_r·u_r)
    assert update["comm_bytes_per_meta_step"] == update["lambda_bytes"] + flags + update["theta_bytes"]
    scoped = ranks[0]["scoped"]  # meta_gradient_params: the base update averages the scoped parameters only
    assert scoped["comm_bytes_per_meta_step"] == scoped["lambda_bytes"] + flags + scoped["theta_bytes"]
    assert 0 < scoped["theta_bytes"] < update["theta_bytes"]


@pytest.mark.distributed
def test_pruning_scores_gather_every_ranks_draws(ddp_results):
    ranks, _ = ddp_results
    # by hand: the last of 2 epochs is the second half of each rank's draws; every example is drawn by one rank
    sums, counts = {}, {}
    for rank in ranks:
        calls = rank["pruning"]["draws"]
        for ids, weights in calls[len(calls) // 2 :]:
            for i, w in zip(ids, weights):
                sums[i], counts[i] = sums.get(i, 0.0) + w, counts.get(i, 0) + 1
    assert sorted(counts) == list(range(32)) and set(counts.values()) == {1}
    expected = [sums[i] for i in range(32)]
    for rank in ranks:
        assert rank["pruning"]["scores"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.distributed
def test_wrench_recipe_under_accelerate_launch_with_two_cpu_processes(tmp_path):
    """The shipped multi-CPU accelerate config really starts 2 ranks, and the recipe writes its outputs once."""
    from datasets import load_dataset

    from sama_trainer.data import apply_label_model, load_wrench, make_synthetic_weak_supervision, write_wrench_format

    data_dir = write_wrench_format(
        make_synthetic_weak_supervision(num_train=96, num_valid=40, num_test=32, num_classes=2, seed=3),
        tmp_path / "tinyws",
    )
    root = os.path.dirname(os.path.dirname(__file__))
    out = tmp_path / "out"
    config = os.path.join(root, "recipes", "accelerate_configs", "multi_cpu.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    cmd += [f"--main_process_port={free_port()}"]
    cmd += [os.path.join(root, "recipes", "wrench_noisy_finetune.py"), "--dataset_dir", str(data_dir)]
    cmd += ["--model_name_or_path", "tiny-bert", "--output_dir", str(out), "--method", "sama_rc", "--max_steps", "4"]
    cmd += ["--per_device_train_batch_size", "8", "--max_seq_length", "24", "--unroll_steps", "2", "--use_cpu", "true"]
    cmd += ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["train_steps"] == 4 and results["meta_steps"] == 2
    weights = load_dataset("json", data_files=str(out / "example_weights.jsonl"), split="train")
    wrench = load_wrench(data_dir)
    train = apply_label_model(wrench["train"], wrench.num_classes, tie_break="wrench")
    assert weights["id"] == train["id"]  # every covered training example once, not once per rank
    assert (out / "README.md").is_file() and (out / "weights_hist.png").is_file()


def test_end_process_group_destroys_the_default_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from sama_trainer import end_process_group

    end_process_group()  # no group: nothing to do
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        end_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
