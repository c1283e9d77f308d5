"""Reliability under faults: a fault on one DDP rank neither hangs nor desynchronises the job, an exception ends it on
every rank, and a run killed with SIGKILL (also while it writes a checkpoint) resumes bit-identically.

2 real gloo processes on CPU through ``torch.distributed.run`` (or one plain process); every launch has a hard
timeout, so a hang fails the test. The worker is tests/distributed/fault_worker.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from test_distributed import free_port


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
from fault_worker import BROKEN_SAVE_STEP, FAULT_RANK, FAULT_STEP  # noqa: E402


WORKER = os.path.join(os.path.dirname(__file__), "distributed", "fault_worker.py")
UNUSED_PARAMETERS_WARNING = "find_unused_parameters=True was specified in DDP constructor"
CONTROL_MARKER = "CONTROL RUN WITH ddp_find_unused_parameters=True"
HANG_TIMEOUT_S = 8
EXPECTED_REASON = {
    "nan_meta": "nonfinite_v",
    "inf_perturbed": "nonfinite_fd",
    "zero_u": None,  # nothing to skip: this rank's implicit part is zero, the ranks average as usual
    "base_step_skipped": "base_step_skipped",
}
CASES = [f"{fault}/{base_update}" for base_update in (True, False) for fault in EXPECTED_REASON]

pytestmark = pytest.mark.distributed


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "ACCELERATE_USE_CPU": "true"}


def launch(nproc: int, *args: str, timeout: float = 240) -> tuple[int, str, float]:
    """Run the worker (under torch.distributed.run for nproc > 1); (return code, output, seconds). A run that does
    not end within ``timeout`` is killed and fails the test."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        cmd += [f"--master_port={free_port()}", "--master_addr=127.0.0.1"]
    cmd += [WORKER, *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)  # the workers die with it (they ask for SIGKILL when their parent dies)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not end within {timeout} s (a hang):\n{output[-6000:]}")
    return proc.returncode, output, time.monotonic() - start


def launch_ranks(nproc: int, folder, *args: str, timeout: float) -> list[tuple[int, str]]:
    """Start the ranks as plain processes, without a launcher that would stop the others when one fails; (return
    code, output) of each. Ranks still running after ``timeout`` are killed and fail the test."""
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc)}
    procs, logs = [], [folder / f"rank{r}.log" for r in range(nproc)]
    for r in range(nproc):
        env = {**ENV, **rendezvous, "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(nproc)}
        with open(logs[r], "w") as log:
            procs.append(
                subprocess.Popen([sys.executable, WORKER, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
            )
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(
            f"{' '.join(args)}: a rank did not end within {timeout} s (a hang):\n{logs[0].read_text()[-4000:]}"
        )
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------------------
# a fault on one rank


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    rc, output, _ = launch(2, "faults", "--out", str(out))
    assert rc == 0, output[-6000:]
    return [load(out / f"faults_rank{r}.json") for r in range(2)], output


@pytest.mark.parametrize("case", CASES)
def test_fault_on_one_rank_leaves_ranks_bit_identical_and_finite(faults, case):
    ranks, _ = faults
    a, b = ranks[0][case], ranks[1][case]
    assert a["theta"] == b["theta"] and a["lambda"] == b["lambda"]
    assert a["finite"] and b["finite"]
    assert a["meta_steps"] == b["meta_steps"] == 3
    reason = EXPECTED_REASON[case.split("/")[0]]
    for r in (a, b):  # every rank took the same branch and counts the skip once, with its reason
        assert r["skipped"] == (0 if reason is None else 1)
        assert r["reasons"] == ({} if reason is None else {reason: 1})


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("zero_u")])
def test_skipped_meta_step_puts_theta_back(faults, case):
    for r in faults[0]:
        assert r[case]["theta_restored_at_fault"]  # bit for bit, with and without the base update


def test_zero_u_on_one_rank_still_takes_the_agreed_base_update(faults):
    for r in faults[0]:
        case = r["zero_u/True"]
        norms = case["local_step_norms"]
        assert norms[FAULT_RANK] == 0.0 and norms[1 - FAULT_RANK] > 0.0  # ‖u‖ = 0 on one rank only
        assert not case["theta_restored_at_fault"]
        assert case["theta_moved_by_mean_step"]  # θ ← θ - mean_r(ε_r·u_r), exactly the all-reduced step
        assert case["mean_step_rel_err"] < 1e-6
        assert r["zero_u/False"]["theta_restored_at_fault"]


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("zero_u")])
def test_skip_is_logged_once_with_its_reason(faults, case):
    reason = EXPECTED_REASON[case.split("/")[0]]
    for r in faults[0]:
        logs = r[case]["logs"]
        assert [h["step"] for h in logs] == list(range(1, 7))
        assert [h["meta/skipped_steps"] for h in logs] == [0, 0, 0, 1, 1, 1]
        assert [h.get(f"meta/skipped/{reason}", 0) for h in logs] == [0, 0, 0, 1, 1, 1]
        assert all(math.isfinite(v) for h in logs for v in h.values())  # a skipped step's NaNs are not averaged in
        assert "meta/meta_loss" not in logs[FAULT_STEP - 1] and "meta/meta_loss" in logs[FAULT_STEP + 1]


def test_no_find_unused_parameters_warning_by_default(faults):
    ranks, output = faults
    assert all(not r[c]["find_unused_parameters"] for r in ranks for c in CASES)
    default_runs, control = output.split(CONTROL_MARKER, 1)
    assert UNUSED_PARAMETERS_WARNING not in default_runs
    assert UNUSED_PARAMETERS_WARNING in control  # the check can see it: DDP prints it when the flag is on


# ------------------------------------------------------------------------------------------------------------
# an exception on one rank, a rank that stops answering


ENDED_WITH_AN_ERROR = (1, -signal.SIGABRT)


def test_exception_in_one_ranks_meta_step_ends_the_job_on_every_rank(tmp_path):
    """No launcher stops the other rank here: each process must end by itself, with an error."""
    ranks = launch_ranks(2, tmp_path, "errors", "--out", str(tmp_path), timeout=180)
    (bad_rc, bad_output), (good_rc, good_output) = ranks[FAULT_RANK], ranks[1 - FAULT_RANK]
    records = [load(tmp_path / f"errors_rank{r}.json") for r in range(2)]
    bad, good = records[FAULT_RANK], records[1 - FAULT_RANK]
    # from the meta collator (before the meta-gradient method runs): caught by the worker
    assert bad["collator"]["type"] == "ValueError" and "injected meta-collator failure" in bad["collator"]["message"]
    assert good["collator"]["type"] == "MetaStepFailedOnAnotherRank"
    # from the meta network inside a perturbed pass: left to end both processes, each with its own error
    assert bad["meta_net"]["type"] == "RuntimeError"
    assert good["meta_net"]["type"] == "MetaStepFailedOnAnotherRank"
    assert {r["meta_net"]["step"] for r in records} == {FAULT_STEP - 1}  # both stopped in the same meta step
    # exit code 1 from the uncaught error; gloo's teardown at interpreter exit sometimes aborts after the error was
    # printed (SIGABRT), which ends the process with an error just as well
    assert bad_rc in ENDED_WITH_AN_ERROR and good_rc in ENDED_WITH_AN_ERROR, (bad_rc, good_rc)
    assert "RuntimeError: injected meta-net failure on rank 1" in bad_output
    assert "MetaStepFailedOnAnotherRank: the meta step raised an exception on 1 other rank" in good_output


def test_rank_that_stops_answering_ends_the_job_after_ddp_timeout(tmp_path):
    rc, output, seconds = launch(2, "hang", "--out", str(tmp_path), "--timeout", str(HANG_TIMEOUT_S), timeout=180)
    assert rc != 0
    record = load(tmp_path / f"hang_rank{1 - FAULT_RANK}.json")
    assert "Timed out" in record["message"], record
    assert HANG_TIMEOUT_S <= record["waited_s"] < HANG_TIMEOUT_S + 60


# ------------------------------------------------------------------------------------------------------------
# killed runs and their resumes


@pytest.fixture(scope="module", params=[1, 2], ids=["one_process", "two_ranks"])
def resumed(request, tmp_path_factory):
    nproc = request.param
    root = tmp_path_factory.mktemp(f"resume{nproc}")
    killed = root / "killed"
    rc, output, _ = launch(nproc, "train", "--out", str(killed), "--kill_after_step", "10")
    assert rc != 0 and (nproc > 1 or rc == -signal.SIGKILL), output[-4000:]
    assert os.listdir(killed) == ["checkpoint-8"]  # killed after step 10, not at a save (save_total_limit=1)

    # one process: killed while writing the meta state (to a temporary name); two: rank 1 killed while the Trainer
    # writes its RNG state (in place, not atomically), after the main process wrote all of its part
    broken_name = "sama_meta_state.pt" if nproc == 1 else "rng_state_{rank}.pth"
    interrupted = root / "interrupted_save"
    rc, output, _ = launch(nproc, "train", "--out", str(interrupted), "--kill_while_writing", broken_name)
    assert rc != 0, output[-4000:]
    assert sorted(os.listdir(interrupted)) == ["checkpoint-4", f"checkpoint-{BROKEN_SAVE_STEP}"]  # 4 not rotated out
    broken = interrupted / f"checkpoint-{BROKEN_SAVE_STEP}"
    files = set(os.listdir(broken))
    assert "trainer_state.json" not in files  # written only once every rank's part is complete
    if nproc == 1:
        assert "sama_meta_state.pt" not in files
        assert any(name.startswith("sama_meta_state.pt.tmp-") for name in files)
    else:
        assert {"sama_meta_state.pt", "sama_rank_state_0.pt", "rng_state_1.pth"} <= files
        assert "sama_rank_state_1.pt" not in files

    rc, output, _ = launch(nproc, "resume", "--out", str(root))
    assert rc == 0, output[-6000:]
    return [load(root / f"resume_rank{r}.json") for r in range(nproc)], str(broken)


STATE_KEYS = ("theta", "lambda", "meta_optimizer", "meta_stream", "weight_history", "rng", "meta_steps", "global_step")


def test_run_killed_mid_run_resumes_bit_identically(resumed):
    ranks, _ = resumed
    for r in ranks:
        assert r["killed"]["resumed_from"] == "checkpoint-8"
        assert {k: r["killed"][k] for k in STATE_KEYS} == {k: r["reference"][k] for k in STATE_KEYS}
        assert r["killed"]["warnings"] == []
    assert r["reference"]["meta_stream"]["epoch"] >= 1  # the meta data cycled


def test_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(resumed):
    ranks, broken = resumed
    for r in ranks:
        got = r["interrupted_save"]
        assert got["resumed_from"] == "checkpoint-4"
        assert len(got["warnings"]) == 1 and f"not resuming from {broken}" in got["warnings"][0]
        assert {k: got[k] for k in STATE_KEYS} == {k: r["reference"][k] for k in STATE_KEYS}


def test_explicit_resume_from_a_half_written_checkpoint_names_it(resumed):
    ranks, broken = resumed
    for r in ranks:
        assert r["explicit_broken"] is not None and f"cannot resume from {broken}" in r["explicit_broken"]
        assert "trainer_state.json is missing" in r["explicit_broken"]


def test_ranks_agree_that_a_checkpoint_missing_one_ranks_part_is_incomplete(resumed):
    ranks, _ = resumed
    if len(ranks) == 1:
        pytest.skip("needs 2 ranks")
    assert "cannot resume from" in ranks[0]["explicit_lost_part"] and "checkpoint-12" in ranks[0]["explicit_lost_part"]
    assert "sama_rank_state_1.pt is missing" in ranks[1]["explicit_lost_part"]
    assert "incomplete for process(es) 1" in ranks[0]["explicit_lost_part"]
