"""Preemption as clusters do it: real signals to real process groups (torchrun, its workers, their
DataLoader and DALI workers), ``kill -9``, recovery checkpoints, and runs resumed with the same
command that end bit-identical to an uninterrupted run (``checkpoint.differences``: student, EMA,
optimiser, scaler, place, summary rows but for timings)."""

import os
import re
import shutil
import signal
import time

import pytest
from test_data import needs_dali
from trainer_helpers import (
    MAIN,
    MODEL,
    assert_nothing_outlives_the_run,
    children,
    command,
    environment_of,
    job_result,
    run_jobs,
    start,
    wait_until,
)

from fastkd.data.loaders import dali_available
from fastkd.engine import checkpoint
from fastkd.engine.cli import main

# Two epochs of the 240-image demo tree; 8 images a step and process (15 steps an epoch for two
# processes). The signals below race the job's steps: each is sent a step or three after the
# log shows the run under way (polled every 50 ms, ``wait_until``) and must land before the
# epoch ends. The four-way chain's job takes 4 images a step, 30 steps an epoch: a killed
# torchrun's workers, under load, stop up to 6 steps after the kill.
SETTINGS = ["--distiller", "ce", "--model", MODEL, "--epochs", "2", "--batch-size", "8",
            "--log-interval", "1", "--resume", "auto"]
JOBS = {  # name: (processes, loader options, training options)
    "torch": (2, ["--loader", "torch", "--workers", "2"],
              ["--model-ema", "--mixup", "0.2", "--batch-size", "4"]),
    "dali": (2, ["--loader", "dali", "--workers", "2"], ["--aa", "v0", "--reprob", "0.5"]),
    "plain": (1, ["--loader", "torch", "--workers", "2"],
              ["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.5"]),
}


def job_arguments(demo_dir, output, job, experiment, *extra):
    _, loading, training = JOBS[job]
    return ["--dataset", "demo", "--data-dir", demo_dir, "--output", str(output),
            "--experiment", experiment, *SETTINGS, *loading, *training, *extra]


def job_command(demo_dir, output, job, experiment, *extra):
    return command(job_arguments(demo_dir, output, job, experiment, *extra), JOBS[job][0])


def two_process_jobs(inputs):
    """The two-process jobs run without interruption (conftest's one launch)."""
    return {f"uninterrupted-{job}": job_arguments(inputs.demo_dir,
                                                  inputs.output(f"uninterrupted-{job}"), job, job)
            for job, (processes, loading, _) in JOBS.items()
            if processes == 2 and ("dali" not in loading or dali_available())}


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory, two_process_jobs):
    """``uninterrupted(job)``: the job run without interruption (once), as ``(job_result, its
    --output folder)``."""
    output, made = tmp_path_factory.mktemp("uninterrupted"), {}

    def run(job):
        if job not in made:
            if JOBS[job][0] == 2:
                made[job] = two_process_jobs(f"uninterrupted-{job}")
            else:
                run_jobs(output, {job: job_arguments(demo_dir, output, job, job)}, processes=1)
                made[job] = job_result(output, job, processes=1), str(output)
            assert made[job][0].returncode == 0, made[job][0].stderr[-3000:]
        return made[job]

    return run


@pytest.fixture(scope="module")
def reference(uninterrupted):
    """``reference(job)``: the last.pth of the job run without interruption."""
    return lambda job: checkpoint.load(os.path.join(uninterrupted(job)[1], job, "last.pth"))


def test_a_plain_run_ends_with_no_loader_worker_alive(uninterrupted):
    """After main() nothing may be alive in a plain process (``assert_nothing_outlives_the_run``):
    its persistent DataLoader workers were stopped only at interpreter shutdown, as nothing else
    collected the cycle that held them. (Under torchrun: test_trainer_faults.)"""
    result, _ = uninterrupted("plain")
    assert_nothing_outlives_the_run(result)


def log_has(log, text):
    return lambda: os.path.exists(log) and text in log.read_text()


def the_job(process):
    """Every process of a job started by ``start``: the launcher, the training processes and
    their loader workers."""
    found, queue = [], [process.pid]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue += children(pid)
    return found


def assert_resumes_identical(argv, folder, expected, log):
    """Run ``argv`` again (the requeued job) and compare its last.pth with ``expected``."""
    process = start(argv, log=log)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert f"resumed {folder}/last.pth at epoch" in log.read_text()
    assert checkpoint.differences(checkpoint.load(str(folder / "last.pth")), expected) == []


def signal_and_check_saved(argv, folder, log, target, number):
    """Start ``argv``; once a few of epoch 0's steps are done (before any checkpoint), send
    signal ``number`` to ``target``: "every process" of the job, the "launcher" or its "process
    group". The job must save where it is and end without a loader worker dying of the
    signal."""
    process = start(argv, log=log)
    wait_until(log_has(log, "epoch 0 [2/"), process, "a few steps of epoch 0", 300)
    if target == "every process":
        for pid in the_job(process):
            os.kill(pid, number)
    elif target == "launcher":
        os.kill(process.pid, number)
    else:
        os.killpg(os.getpgid(process.pid), number)
    status = process.wait(timeout=120)
    output = log.read_text()
    torchrun = "torch.distributed.run" in argv
    assert status == (1 if torchrun else 128 + number), output[-3000:]  # torchrun: 1
    assert "is killed by signal" not in output
    assert f"{signal.Signals(number).name}: saved {folder}/last.pth (resumes at epoch 0 " \
           "step " in output
    stopped = checkpoint.load(str(folder / "last.pth"))
    steps = int(re.search(r"epoch 0 \[\d+/(\d+)\]", output).group(1))
    assert stopped["epoch"] == 0 and 2 <= stopped["step"] < steps


@pytest.mark.parametrize("job, target, number", [
    pytest.param("dali", "launcher", signal.SIGTERM, marks=needs_dali),  # torchrun forwards it
    ("plain", "process group", signal.SIGINT),  # Ctrl-C on a plain run with loader workers
])
def test_a_signalled_job_saves_where_it_is_and_resumes_bit_identical(
        demo_dir, tmp_path, reference, job, target, number):
    argv = job_command(demo_dir, tmp_path, job, "run")
    signal_and_check_saved(argv, tmp_path / "run", tmp_path / "stopped.txt", target, number)
    assert_resumes_identical(argv, tmp_path / "run", reference(job), tmp_path / "resumed.txt")


def test_sigterm_to_every_process_then_kill_9_of_torchrun_of_the_job_then_of_a_worker(
        demo_dir, tmp_path, reference):
    """One job preempted four ways, each time requeued with the same command, ending
    bit-identical to the uninterrupted run:
    - SIGTERM to every process (SLURM: the job's cgroup, loader workers too): saved where it is;
    - torchrun killed alone: its workers notice (the kernel sends them SIGTERM), save and end,
      freeing the run folder for the requeued job;
    - the whole job killed: the last recovery checkpoint (--recovery-interval 3, which changes
      nothing else) is at most 3 steps back;
    - requeued as an elastic job (``torchrun --max-restarts 1``), a worker killed as it
      resumes: torchrun restarts both, and they resume from last.pth (``--resume auto``)."""
    argv = job_command(demo_dir, tmp_path, "torch", "run", "--recovery-interval", "3")

    signal_and_check_saved(argv, tmp_path / "run", tmp_path / "stopped.txt", "every process",
                           signal.SIGTERM)
    log = tmp_path / "first.txt"
    process = start(argv, log=log)
    wait_until(log_has(log, "epoch 1 [1/"), process, "a step of epoch 1", 300)
    workers = children(process.pid)
    process.kill()
    process.wait()
    deadline = time.time() + 60
    while any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2]
              != "Z" for pid in workers):
        assert time.time() < deadline, "torchrun's workers outlived it"
        time.sleep(0.2)
    output = log.read_text()
    assert f"resumed {tmp_path}/run/last.pth at epoch 0" in output
    assert f"SIGTERM: saved {tmp_path}/run/last.pth (resumes at epoch 1 step" in output
    first_stop = checkpoint.load(str(tmp_path / "run" / "last.pth"))["step"]

    log = tmp_path / "second.txt"
    process = start(argv, log=log)
    # Three steps on from where it resumed: past a recovery point.
    wait_until(log_has(log, f"epoch 1 [{first_stop + 3}/"), process,
               "three steps of epoch 1 after the resume", 300)
    for pid in the_job(process):
        os.kill(pid, signal.SIGKILL)
    process.wait()
    done = max(int(line.split("[")[1].split("/")[0]) for line in log.read_text().splitlines()
               if "epoch 1 [" in line)
    saved = checkpoint.load(str(tmp_path / "run" / "last.pth"))
    assert saved["epoch"] == 1 and done - 3 <= saved["step"] <= done and saved["step"] % 3 == 0

    log = tmp_path / "elastic.txt"
    script = argv.index(MAIN)
    process = start([*argv[:script], "--max-restarts=1", *argv[script:]], log=log)
    resumed = f"resumed {tmp_path}/run/last.pth at epoch 1"
    wait_until(log_has(log, resumed), process, "the requeued job's resume", 300)
    worker = next(pid for pid in children(process.pid) if environment_of(pid)["RANK"] == "1")
    os.kill(worker, signal.SIGKILL)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert log.read_text().count(resumed) == 2  # then again after torchrun's restart
    assert checkpoint.differences(checkpoint.load(str(tmp_path / "run" / "last.pth")),
                                  reference("torch")) == []


def in_process(demo_dir, output, experiment, *extra):
    """``main()`` in this process on the demo tree (7 steps an epoch); its exit status."""
    with pytest.raises(SystemExit) as stop:
        main(["--dataset", "demo", "--data-dir", demo_dir, "--output", str(output),
              "--experiment", experiment, *SETTINGS, "--loader", "torch", "--workers", "0",
              "--batch-size", "32", "--model-ema", *extra])
    return stop.value.code


@pytest.fixture(scope="module")
def finished(demo_dir, tmp_path_factory):
    """The in-process run, uninterrupted: its folder."""
    output = tmp_path_factory.mktemp("in-process")
    assert in_process(demo_dir, output, "whole") == 0
    return output / "whole"


def test_a_signal_during_evaluation_or_a_checkpoint_write_stops_there_saved(
        demo_dir, tmp_path, monkeypatch, finished):
    """Real signals to this process at chosen moments: during the first evaluation the run
    stops between two evaluation batches with the epoch's training saved; during a recovery
    checkpoint's write it finishes the write and stops at the next step. Each resumes to the
    uninterrupted run's end."""
    expected = checkpoint.load(str(finished / "last.pth"))
    from fastkd.engine import run as run_module

    evaluate = run_module.evaluate

    def signalled_evaluation(*args, **kwargs):
        monkeypatch.setattr(run_module, "evaluate", evaluate)
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", signalled_evaluation)
    assert in_process(demo_dir, tmp_path, "evaluation") == 128 + signal.SIGTERM
    stopped = checkpoint.load(str(tmp_path / "evaluation" / "last.pth"))
    assert (stopped["epoch"], stopped["step"], stopped["summary"]) == (0, 7, [])
    assert in_process(demo_dir, tmp_path, "evaluation") == 0
    assert checkpoint.differences(
        checkpoint.load(str(tmp_path / "evaluation" / "last.pth")), expected) == []

    save_atomic, writes = checkpoint.save_atomic, []

    def signalled_write(state, path):
        writes.append(state["step"])
        if state["step"] == 4:  # the recovery checkpoint at step 4 of epoch 0
            os.kill(os.getpid(), signal.SIGINT)
        save_atomic(state, path)

    monkeypatch.setattr(checkpoint, "save_atomic", signalled_write)
    assert in_process(demo_dir, tmp_path, "write", "--recovery-interval", "4") == (
        128 + signal.SIGINT)
    assert writes == [4, 5]  # the recovery point, then where it stopped
    monkeypatch.setattr(checkpoint, "save_atomic", save_atomic)
    assert in_process(demo_dir, tmp_path, "write") == 0
    assert checkpoint.differences(
        checkpoint.load(str(tmp_path / "write" / "last.pth")), expected) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() gave the handlers back


def test_resume_rules(demo_dir, finished, tmp_path, capsys):
    """``--resume auto`` on a finished run: the same flags say so and change nothing; a flag that
    changes training is refused naming both values (the optimiser too: it used to end in a
    KeyError); --epochs may grow, the schedule recomputed."""
    folder = tmp_path / "whole"
    shutil.copytree(finished, folder)

    def files():
        return {entry.name: entry.read_bytes() for entry in folder.iterdir()}

    before = files()
    assert in_process(demo_dir, tmp_path, "whole") == 0
    assert "has trained all 2 epochs" in capsys.readouterr().out
    for extra, message in (
            (["--lr", "0.5"], "--lr 0.02 -> 0.5"),
            (["--opt", "adamw"], "--opt 'sgd' -> 'adamw'"),
            (["--batch-size", "16"], "--batch-size 32 x 1 processes -> 16 x 1 processes (the "
                                     "global batch must stay 32)"),
            (["--seed", "7", "--hflip", "0.5"], "--hflip 0.0 -> 0.5; --seed 42 -> 7")):
        refusal = in_process(demo_dir, tmp_path, "whole", *extra)
        assert f"error: --resume refuses a run with different settings: {message}" in refusal
    assert files() == before
    assert in_process(demo_dir, tmp_path, "whole", "--epochs", "3") == 0
    assert "--epochs 2 -> 3: the learning-rate schedule is recomputed" in capsys.readouterr().out
    assert checkpoint.load(str(folder / "last.pth"))["epoch"] == 3
