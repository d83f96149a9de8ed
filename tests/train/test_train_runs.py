"""Whole training runs on the tiny preset (32x32, f=2 AE): outputs, SIGKILL + resume, torchrun DDP."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from pictor.bundle_storage import cast_bundle
from pictor.checkpoint import CheckpointError, read_safetensors
from pictor.data.folder import DatasetWarning
from pictor.notices import PictorWarning
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.logs import read_jsonl
from pictor.train.loop import LOCK_FILE, TrainingError, run_lock, train

from broken_images import undecodable_png

QUIET = {"sample_every": 0, "eval_every": 0, "progress": False}
# Everything that shapes the loss curve, shared by the subprocess runs that are compared.
T2I_FLAGS = ["--preset", "tiny", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2", "--seed", "3"]
T2I_FLAGS += ["--sample-every", "0", "--eval-every", "0", "--no-progress", "--device", "cpu"]
STEPS = 8


def _env() -> dict[str, str]:
    # One thread per process: the same in every compared run (CPU kernels are deterministic for a fixed
    # thread count), and two DDP ranks fill two cores without oversubscribing them.
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """In-process runs on one thread too: tiny models gain nothing from two, and a busy machine makes
    two OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pictor.cli", "train", *args]


def _run(cmd: list[str], timeout: float = 120) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny autoencoder run: good enough to feed the t2i stage."""
    out = tmp_path_factory.mktemp("ae")
    train(TrainConfig(stage="autoencoder", out=str(out), preset="tiny", max_steps=2, batch_size=4, **QUIET))
    return out


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory, ae_run: Path) -> Path:
    """The uninterrupted reference run (a subprocess, like the runs it is compared with)."""
    out = tmp_path_factory.mktemp("a")
    _run(_cli("t2i", *T2I_FLAGS, "--autoencoder", str(ae_run), "--out", str(out), "--max-steps", str(STEPS)))
    return out


def _losses(out: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(out / "log.jsonl")]


def test_autoencoder_run_writes_an_ae_checkpoint_and_learns(tmp_path: Path) -> None:
    result = train(
        TrainConfig(
            stage="autoencoder",
            out=str(tmp_path),
            preset="tiny",
            max_steps=30,
            batch_size=4,
            lr=1e-3,
            warmup_steps=5,
            save_every=10,
            keep=2,
            **QUIET,
        )
    )
    losses = [r["loss"] for r in read_jsonl(tmp_path / "log.jsonl")]
    assert len(losses) == 30
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    record = json.loads((result.final / "autoencoder.json").read_text())
    assert record["format"] == "pictor-autoencoder" and record["autoencoder"]["ch_mult"] == [1, 2]
    raw = read_safetensors(tmp_path / "checkpoints" / "step-000030" / "model.safetensors")
    ema = read_safetensors(result.final / "autoencoder.safetensors")
    assert raw.keys() == ema.keys()
    assert not torch.equal(raw["encoder.conv_in.weight"], ema["encoder.conv_in.weight"])  # EMA != raw


def test_autoencoder_on_an_image_folder(tmp_path: Path) -> None:
    data = tmp_path / "images"
    data.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
        Image.new("RGB", (40, 40), color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a plain picture number {i}")
    out = tmp_path / "run"
    cfg = TrainConfig(
        stage="autoencoder",
        out=str(out),
        preset="tiny",
        data=str(data),
        max_steps=3,
        batch_size=2,
        sample_every=3,
        eval_every=3,
        progress=False,
    )
    train(cfg)
    assert len(read_jsonl(out / "log.jsonl")) == 3
    (evaluation,) = read_jsonl(out / "eval.jsonl")
    assert "psnr" in evaluation and "overall" not in evaluation  # no shapes scores on other data
    assert (out / "samples" / "step-000003.png").is_file()


def test_a_folder_run_outlives_an_undecodable_image_and_a_resume_names_a_changed_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image that passes the scan but does not decode costs one item, not the run; the checkpoint
    records the folder, so a resume on a folder that changed since says so."""
    data = tmp_path / "images"
    data.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
        Image.new("RGB", (40, 40), color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a plain picture number {i}")
    undecodable_png(data / "3.png", size=40)
    (data / "3.txt").write_text("a picture that does not decode")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # a relative --data, stored as the folder's absolute path
    cfg = TrainConfig(stage="autoencoder", out=str(out), preset="tiny", data="images", batch_size=2, **QUIET)
    with pytest.warns(DatasetWarning, match=r"cannot decode .*3\.png.*stands in"):
        train(dataclasses.replace(cfg, max_steps=4))  # 8 samples: every image at least once
    assert len(read_jsonl(out / "log.jsonl")) == 4
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["config"]["data"] == str(data) and state["data"]["images"] == 4
    monkeypatch.chdir(out)  # elsewhere: the stored path still names the folder
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # the same folder: no warning about it
        train(TrainConfig.from_dict({**state["config"], "max_steps": 5}), resume=True)
    Image.new("RGB", (40, 40), (90, 90, 90)).save(data / "4.png")
    (data / "4.txt").write_text("a grey picture")
    with pytest.warns(
        DatasetWarning, match=r"data folder changed since this checkpoint \(4 images then, 5 now"
    ):
        train(TrainConfig.from_dict({**state["config"], "max_steps": 6}), resume=True)
    assert len(read_jsonl(out / "log.jsonl")) == 6


def test_a_run_that_stored_its_data_folder_as_typed_resumes_without_a_false_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs started before --data was stored whole hold the path as typed ("images"): resuming with the
    same --data must not warn that the data changed."""
    import argparse

    from pictor.train.command import config_from_args
    from pictor.train.command_flags import add_train_parser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (60 * i, 90, 30)).save(tmp_path / "images" / f"{i}.png")
        (tmp_path / "images" / f"{i}.txt").write_text(f"picture {i}")
    cfg = TrainConfig(stage="autoencoder", out="run", preset="tiny", data="images", batch_size=2, **QUIET)
    train(dataclasses.replace(cfg, max_steps=1))
    state_file = tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["data"] = "images"  # as an earlier version stored it
    state_file.write_text(json.dumps(state))
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "autoencoder", "--data", "images", "--out", "run", "--resume"])
    assert config_from_args(args).data == str(tmp_path / "images")
    assert "changed" not in capsys.readouterr().err


def test_a_damaged_newest_checkpoint_says_how_to_resume_from_the_one_before(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(stage="autoencoder", out=str(out), preset="tiny", batch_size=2, save_every=1, **QUIET)
    train(dataclasses.replace(cfg, max_steps=2))
    optimizer = out / "checkpoints" / "step-000002" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # cut short, as a full disk leaves a copy
    again = dataclasses.replace(cfg, max_steps=3)
    with pytest.raises(TrainingError, match=r"optimizer\.safetensors.*move its folder away to resume"):
        train(again, resume=True)
    (out / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{not json")
    with pytest.raises(TrainingError, match=r"trainer_state\.json: not valid JSON.*move its folder away"):
        train(again, resume=True)
    shutil.move(out / "checkpoints" / "step-000002", tmp_path / "damaged")
    assert train(again, resume=True).resumed_from == 1
    # A checkpoint of another format is no damage: moving it away would not help, so no such advice.
    state = out / "checkpoints" / "step-000003" / "trainer_state.json"
    state.write_text(state.read_text().replace('"format": 1', '"format": 0', 1))
    with pytest.raises(CheckpointError, match="checkpoint format 0 is not 1") as err:
        train(dataclasses.replace(cfg, max_steps=4), resume=True)
    assert "move its folder away" not in str(err.value)


def test_a_run_folder_in_use_is_refused_until_its_run_ends(tmp_path: Path) -> None:
    """A second `--resume` while the run still goes would write the same checkpoints (and delete the
    first one's half-written ones): refused, naming the holder. The lock is an flock: gone with its run."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    cfg = TrainConfig(stage="autoencoder", out=str(out), preset="tiny", batch_size=2, max_steps=1, **QUIET)
    (out / ".step-000005.tmp").mkdir()  # what the running one is writing
    with open(out / LOCK_FILE, "a+") as held:  # as a run in another process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242\n")
        held.flush()
        with pytest.raises(TrainingError, match=r"in use by a training run still going \(pid 4242\)"):
            train(cfg)
        assert (out / ".step-000005.tmp").is_dir()  # untouched
    train(cfg)  # the lock went with its holder
    assert len(read_jsonl(out / "log.jsonl")) == 1
    # A run that fails while a forked child (a DataLoader worker) still shares the lock file's handle
    # leaves the folder free: the lock is released, not merely closed.
    with pytest.raises(RuntimeError, match="fails"), run_lock(out, hold=True):
        child = os.fork()
        if child == 0:  # the worker: outlives the failure for a moment
            time.sleep(3)
            os._exit(0)
        raise RuntimeError("the run fails")
    with run_lock(out, hold=True):
        pass  # taken at once, while the child still holds its copy
    assert os.waitpid(child, 0)[1] == 0


def test_gradient_accumulation_matches_the_full_batch(tmp_path: Path) -> None:
    def run(name: str, batch: int, accum: int) -> list[float]:
        out = tmp_path / name
        cfg = TrainConfig(
            stage="autoencoder",
            out=str(out),
            preset="tiny",
            max_steps=3,
            batch_size=batch,
            grad_accum=accum,
            lr=1e-3,
            warmup_steps=1,
            save_every=0,
            **QUIET,
        )
        train(cfg)
        return [v for r in read_jsonl(out / "log.jsonl") for v in (r["loss"], r["grad_norm"])]

    # Same samples, same noise: losses and gradient norms agree up to summation order. (Weights are not
    # compared: Adam turns rounding-level differences of near-zero gradients into +-lr steps.)
    assert run("full", 4, 1) == pytest.approx(run("accum", 2, 2), rel=1e-4)


def test_the_precision_a_run_trained_in_is_recorded_and_a_resume_in_another_is_named(tmp_path: Path) -> None:
    """--mixed-precision auto leaves the precision to the device: the weights, checkpoints and summary
    say which it was, and a resume in the other one warns (a CUDA run resumed on a CPU, say)."""
    out = tmp_path / "run"

    def run(steps: int, precision: str, resume: bool = False) -> None:
        cfg = TrainConfig(
            stage="autoencoder",
            out=str(out),
            preset="tiny",
            batch_size=2,
            max_steps=steps,
            save_every=2,
            mixed_precision=precision,
            device="cpu",
            **QUIET,
        )
        train(cfg, resume=resume)

    run(2, "auto")

    def read(name: str) -> dict:
        return json.loads((out / name).read_text())

    assert read("final/autoencoder.json")["training"]["precision"] == "fp32"
    assert read("checkpoints/step-000002/trainer_state.json")["precision"] == "fp32"
    with pytest.warns(PictorWarning, match=r"trained in fp32 and resumes in bf16 .*mixed-precision no keeps"):
        run(3, "bf16", resume=True)
    assert (
        read("summary.json")["precision"] == read("final/autoencoder.json")["training"]["precision"] == "bf16"
    )


@pytest.mark.parametrize("stage", ["autoencoder", "t2i"])
def test_bf16_on_the_cpu_computes_in_bf16_and_trains_alike(tmp_path: Path, ae_run: Path, stage: str) -> None:
    def losses(precision: str) -> list[float]:
        out = tmp_path / precision
        extra = {"autoencoder_path": str(ae_run), "latent_stats_images": 16} if stage == "t2i" else {}
        cfg = TrainConfig(
            stage=stage,
            out=str(out),
            preset="tiny",
            max_steps=3,
            batch_size=4,
            lr=1e-3,
            warmup_steps=1,
            save_every=0,
            mixed_precision=precision,
            device="cpu",
            # samples and shapes evals run under the same autocast: on, so they are exercised too
            sample_every=3,
            eval_every=3,
            num_samples=2,
            sample_steps=2,
            eval_prompts=4,
            eval_images_per_prompt=1,
            progress=False,
            **extra,
        )
        train(cfg)
        assert (out / "samples" / "step-000003.png").is_file()
        return [r["loss"] for r in read_jsonl(out / "log.jsonl")]

    wide, narrow, auto = losses("no"), losses("bf16"), losses("auto")
    # The same samples and noise: bf16 autocast rounds the matmuls (so the losses are not float32's, as
    # they were when --mixed-precision bf16 was silently ignored on the CPU) but trains the same model;
    # auto on the CPU is float32, bit for bit.
    assert narrow != wide and auto == wide
    assert narrow == pytest.approx(wide, rel=0.05)


def test_t2i_outputs_bundle_samples_eval_and_logs(tmp_path: Path, ae_run: Path) -> None:
    cfg = TrainConfig(
        stage="t2i",
        out=str(tmp_path),
        preset="tiny",
        autoencoder_path=str(ae_run),
        max_steps=4,
        batch_size=4,
        save_every=2,
        keep=1,
        sample_every=2,
        eval_every=4,
        num_samples=2,
        sample_steps=2,
        eval_prompts=6,
        eval_images_per_prompt=1,
        latent_stats_images=16,
        progress=False,
    )
    train(cfg)
    log = read_jsonl(tmp_path / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "grad_norm", "images_per_s", "time"} <= set(log[0])
    # Zero-init output layer predicts v = 0, so the first loss is E|noise - x0|^2 = 1 + 1 for unit latents.
    assert 1.6 < log[0]["loss"] < 2.4
    assert (tmp_path / "samples" / "step-000002.png").is_file()
    (evaluation,) = read_jsonl(tmp_path / "eval.jsonl")
    assert evaluation["step"] == 4 and 0.0 <= evaluation["overall"] <= 1.0 and len(evaluation["per_tag"]) == 6
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000004"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step-000004"
    try:
        import tensorboard  # noqa: F401

        assert any((tmp_path / "tb").iterdir())
    except ImportError:
        assert not (tmp_path / "tb").exists()

    import pictor
    from pictor.pipeline import GenerationRequest

    pipe = pictor.load(tmp_path / "final", device="cpu")
    ae = pipe.config.autoencoder
    assert ae["scale_factor"] != 1.0 and ae["shift_factor"] != 0.0  # set from the data
    assert pipe.config.trained and pipe.config.training["stage"] == "t2i"
    (image,) = pipe.generate(GenerationRequest("a red circle", steps=2, seed=0))
    assert image.image.size == (32, 32)

    with pytest.raises(TrainingError, match="--resume"):
        train(cfg)  # the folder holds a run: refuse to start over it


def test_sigkill_then_resume_continues_the_same_loss_curve(tmp_path: Path, ae_run: Path, run_a: Path) -> None:
    out = tmp_path / "b"
    base = [*T2I_FLAGS, "--autoencoder", str(ae_run), "--out", str(out), "--save-every", "2"]
    proc = subprocess.Popen(
        _cli("t2i", *base, "--max-steps", "1000"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "latest").exists():
            assert proc.poll() is None, "run B ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _run(_cli("t2i", *base, "--resume", "--max-steps", str(STEPS)))
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["resumed_from"] < STEPS
    assert _losses(out) == _losses(run_a)  # bitwise: floats compared exactly
    assert len(_losses(out)) == STEPS
    ref = json.loads((run_a / "summary.json").read_text())
    assert summary["weights_sha256_per_rank"] == ref["weights_sha256_per_rank"]
    assert summary["ema_sha256"] == ref["ema_sha256"]


def test_max_minutes_stops_with_a_checkpoint_and_resume_finishes_the_curve(
    tmp_path: Path, ae_run: Path, run_a: Path
) -> None:
    out = tmp_path / "timed"
    base = [*T2I_FLAGS, "--autoencoder", str(ae_run), "--out", str(out), "--max-steps", str(STEPS)]
    # A budget far shorter than any step: the run stops after its first one, whatever the machine.
    proc = subprocess.run(
        _cli("t2i", *base, "--max-minutes", "1e-7"), env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"stopped at step 1 of {STEPS}" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["step"], summary["stopped_by"]) == (1, "max_minutes")
    assert (out / "final" / "config.json").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    # The budget belonged to that invocation: resuming without one runs to --max-steps, on run A's curve.
    _run(_cli("t2i", *base, "--resume"))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["step"], summary["stopped_by"], summary["resumed_from"]) == (STEPS, "max_steps", 1)
    assert _losses(out) == _losses(run_a)
    with pytest.raises(ConfigError, match="max_minutes must be > 0"):
        TrainConfig(stage="t2i", out=str(tmp_path / "x"), preset="tiny", max_minutes=0).resolve()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TWO_RANK_FLAGS = [f if f != "4" else "2" for f in T2I_FLAGS]  # batch 2 per rank x 2 ranks = run A's 4


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, ae_run: Path) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    args = [*TWO_RANK_FLAGS, "--autoencoder", str(ae_run), "--out", str(out), "--max-steps", str(STEPS)]
    _run([*TORCHRUN, "-m", "pictor.cli", "train", "t2i", *args], timeout=240)
    return out


def test_torchrun_ddp_two_ranks_match_one_process(ddp_run: Path, run_a: Path) -> None:
    out = ddp_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    a, b = summary["weights_sha256_per_rank"]
    assert a == b  # DDP kept the ranks' models identical
    ddp, single = _losses(out), _losses(run_a)
    assert [s for s, _, _ in ddp] == list(range(1, STEPS + 1))  # one log, one line per step
    assert [loss for _, loss, _ in ddp] == pytest.approx([loss for _, loss, _ in single], rel=1e-3)
    w_ddp = read_safetensors(out / "final" / "transformer.safetensors")
    w_one = read_safetensors(run_a / "final" / "transformer.safetensors")
    for key in w_one:
        assert torch.allclose(w_ddp[key], w_one[key], atol=1e-4), key


# Loaded by every torchrun worker (sitecustomize, first on PYTHONPATH): rank 1 fails after its third step.
FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    from pictor.train import loop
    periodic = loop.Trainer._periodic
    def failing(self, log):
        if self.step == 3:
            raise RuntimeError("injected failure on rank 1 at step 3")
        periodic(self, log)
    loop.Trainer._periodic = failing
"""


def test_torchrun_a_rank_that_fails_stops_the_run_at_once(tmp_path: Path, ae_run: Path) -> None:
    """A rank that fails leaves without waiting for the others: rank 0 is inside its next step's all-reduce,
    where a barrier on rank 1 would hold both until the group's 30-minute timeout. Instead torchrun sees
    rank 1 exit, stops rank 0 and reports rank 1's error; nothing final is written."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    out = tmp_path / "failed"
    args = [*TWO_RANK_FLAGS, "--autoencoder", str(ae_run), "--out", str(out), "--max-steps", str(STEPS)]
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [*TORCHRUN, "-m", "pictor.cli", "train", "t2i", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,  # the old barrier held the ranks for 30 minutes
    )
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 3" in proc.stderr
    # Rank 0 logged step 3 (or was stopped just before) and no step after it: it cannot pass step 4 alone.
    assert [s for s, _, _ in _losses(out)] in ([1, 2], [1, 2, 3])
    assert not (out / "final").exists() and not (out / "summary.json").exists()


def test_torchrun_fsdp_matches_one_process_and_resumes_with_or_without_it(
    tmp_path: Path, ae_run: Path, run_a: Path, ddp_run: Path
) -> None:
    """--fsdp: sharded weights, gradients, AdamW state and EMA train as one process does (rank 1 builds the
    model on the meta device and gets rank 0's values); sample grids and evals gather the EMA; checkpoints
    are whole, so a sharded run resumes sharded (bit-identical losses) or in one process."""
    out = tmp_path / "fsdp"
    torchrun = TORCHRUN
    args = [*TWO_RANK_FLAGS, "--autoencoder", str(ae_run), "--max-steps", str(STEPS), "--save-every", "4"]
    previews = ["--sample-every", "4", "--eval-every", "8", "--eval-prompts", "6", "--eval-images", "1"]
    _run(
        [*torchrun, "-m", "pictor.cli", "train", "t2i", *args, *previews, "--out", str(out), "--fsdp"],
        timeout=240,
    )
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000004.png", "step-000008.png"]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [8] and 0.0 <= evals[0]["overall"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4 and summary["fsdp"] is True
    a, b = summary["weights_sha256_per_rank"]
    assert a != b  # each rank held its own shard, not a whole copy
    sharded, single = _losses(out), _losses(run_a)
    assert [s for s, _, _ in sharded] == list(range(1, STEPS + 1))
    assert [loss for _, loss, _ in sharded] == pytest.approx([loss for _, loss, _ in single], rel=1e-3)
    w_fsdp = read_safetensors(out / "final" / "transformer.safetensors")
    w_one = read_safetensors(run_a / "final" / "transformer.safetensors")
    w_ddp = read_safetensors(ddp_run / "final" / "transformer.safetensors")
    for key in w_one:
        assert torch.allclose(w_fsdp[key], w_one[key], atol=1e-4), key
        assert torch.allclose(w_fsdp[key], w_ddp[key], atol=1e-6), key  # the same sums, other order
    # The checkpoint holds whole tensors, as a one-process run's does.
    for name in ("model.safetensors", "optimizer.safetensors"):
        mine = read_safetensors(out / "checkpoints" / "step-000004" / name)
        theirs = read_safetensors(run_a / "checkpoints" / f"step-{STEPS:06d}" / name)
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}

    def resumed(name: str, extra: list[str]) -> list[tuple[int, float, float]]:
        again = tmp_path / name
        (again / "checkpoints").mkdir(parents=True)
        shutil.copytree(out / "checkpoints" / "step-000004", again / "checkpoints" / "step-000004")
        (again / "latest").write_text("checkpoints/step-000004\n")
        _run([*extra, "--out", str(again), "--resume", "--max-steps", str(STEPS)], timeout=240)
        return _losses(again)

    tail = sharded[4:]
    assert resumed("again-fsdp", [*torchrun, "-m", "pictor.cli", "train", "t2i", "--fsdp"]) == tail
    alone = resumed("again-one", _cli("t2i", "--batch-size", "4"))  # the same global batch, one process
    assert [s for s, _, _ in alone] == [s for s, _, _ in tail]
    assert [loss for _, loss, _ in alone] == pytest.approx([loss for _, loss, _ in tail], rel=1e-4)


def test_fsdp_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="applies to 't2i' training, not to 'autoencoder'"):
        TrainConfig(stage="autoencoder", out=str(tmp_path / "a"), preset="tiny", fsdp=True).resolve()
    with pytest.raises(TrainingError, match="run under torchrun --nproc_per_node N"):
        train(TrainConfig(stage="t2i", out=str(tmp_path / "b"), preset="tiny", fsdp=True, **QUIET))


def test_init_warm_starts_from_a_bundle_and_keeps_its_lineage(tmp_path: Path, run_a: Path) -> None:
    """--init: the transformer, EMA, autoencoder and latent scale start as the bundle's; a fresh schedule."""
    bundle = run_a / "final"
    out = tmp_path / "warm"
    # lr so small that one AdamW step cannot move fp32 weights: the run's weights must be the bundle's.
    cfg = TrainConfig(
        stage="t2i",
        out=str(out),
        init=str(bundle),
        max_steps=2,
        batch_size=4,
        lr=1e-30,
        save_every=1,
        **QUIET,
    )
    train(cfg)
    start = read_safetensors(bundle / "transformer.safetensors")
    warm = read_safetensors(out / "final" / "transformer.safetensors")
    assert start.keys() == warm.keys()
    for key in start:
        assert torch.allclose(warm[key], start[key], atol=1e-6), key
    ae_start = read_safetensors(bundle / "autoencoder.safetensors")
    ae_warm = read_safetensors(out / "final" / "autoencoder.safetensors")
    assert all(torch.equal(ae_warm[k], ae_start[k]) for k in ae_start)
    mine = json.loads((out / "final" / "config.json").read_text())
    theirs = json.loads((bundle / "config.json").read_text())
    assert mine["autoencoder"] == theirs["autoencoder"]  # scale/shift kept, not re-measured
    assert mine["model"] == theirs["model"] and mine["text_encoder"] == theirs["text_encoder"]
    assert mine["training"]["step"] == 2
    assert mine["training"]["init"] == {"path": str(bundle), "training": theirs["training"]}
    assert f"from {bundle} (after its {STEPS} steps)" in mine["description"]
    # A fresh schedule: warm-up from step 1, not the bundle's step.
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 2]

    # Resumed, the run keeps its lineage even when the bundle it began from is gone.
    moved = tmp_path / "moved"
    bundle.rename(moved)
    try:
        _run(_cli("t2i", "--out", str(out), "--resume", "--max-steps", "3", "--device", "cpu"))
    finally:
        moved.rename(bundle)
    resumed = json.loads((out / "final" / "config.json").read_text())
    assert resumed["training"]["step"] == 3 and resumed["training"]["init"] == mine["training"]["init"]


def test_init_from_an_fp16_bundle_trains_in_float32(tmp_path: Path, run_a: Path) -> None:
    """A bundle stored in fp16 (`pictor convert dtype`) warm-starts float32 master weights on the CPU."""
    half = cast_bundle(run_a / "final", tmp_path / "half", "fp16")
    out = tmp_path / "warm"
    cfg = TrainConfig(
        stage="t2i", out=str(out), init=str(half), max_steps=1, batch_size=4, lr=1e-30, save_every=1, **QUIET
    )
    train(cfg)
    for name in ("transformer.safetensors", "autoencoder.safetensors"):
        start = read_safetensors(half / name)
        warm = read_safetensors(out / "final" / name)
        for key in start:
            assert start[key].dtype == torch.float16 and warm[key].dtype == torch.float32, key
            assert torch.allclose(warm[key], start[key].float(), atol=1e-6), key


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"autoencoder_path": "somewhere"}, "drop --autoencoder"),
        ({"stage": "autoencoder"}, "t2i training only"),
        ({"stage": "lora", "base": "default"}, "t2i training only"),
        ({"init": "tiny"}, "is a preset"),
        ({"init": "/nonexistent/bundle"}, "/nonexistent/bundle"),
    ],
)
def test_init_refuses_what_cannot_warm_start(tmp_path: Path, run_a: Path, changes: dict, words: str) -> None:
    fields = {"stage": "t2i", "out": str(tmp_path / "x"), "init": str(run_a / "final"), **changes}
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**fields).resolve()
