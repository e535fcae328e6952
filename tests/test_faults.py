"""Faults injected into checkpoints, runs and data through the public CLI or the checkpoint API.

Each case states the promise it checks: a crafted checkpoint never runs code, resume is exact with
dropout, a crash at any instant of a save leaves a loadable ``latest``, no checkpoint holds a
non-finite value, and every corruption is one line naming the file, exit status 1, no traceback.
One distributed checkpoint is saved per module and copied for each case.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ironcore import cli
from ironcore.observe import metrics
from ironcore.training.trainer import train
from tests.multiproc import run_distributed
from tests.train_helpers import ROOT, load, losses, write_config

TIMEOUT = 120


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=cwd, env=_env())


def _one_line_error(stderr: str, *fragments: str) -> None:
    """Exactly one line on stderr, naming what is wrong, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _rewrite_manifest(folder: Path, name: str) -> None:
    """Make the manifest vouch for the current bytes of `name` (an attacker can always do this)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------
# One saved distributed checkpoint, copied for every case


SAVE_STEPS = 2
SMALL = ["model.max_seq_len=32", "model.d_model=32", "model.d_ffn=64", "model.num_attention_heads=2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A model_path holding iter_0000002, saved by `ironcore train` with save_dist_ckpt."""
    root = tmp_path_factory.mktemp("saved")
    config = write_config(root, "run", operation={"train_steps": SAVE_STEPS, "no_save": False, "save_dist_ckpt": True,
                                                  "eval_samples": 4, "test_samples": 4},
                          trainer={"micro_batch_size": 1, "train_batch_size": 1}, optim={"max_lr": 1e-3, "warmup_steps": 1})
    assert cli.main([str(config), *SMALL]) == 0
    return config


@pytest.fixture
def ckpt(saved: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(config, model_path): a private copy of the saved run."""
    shutil.copytree(saved.parent / "run", tmp_path / "run")
    text = saved.read_text().replace(str(saved.parent), str(tmp_path))
    config = tmp_path / "run.yaml"
    config.write_text(text)
    return config, tmp_path / "run"


# ---------------------------------------------------------------------------------------------
# 1. A crafted DCP index never runs code


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("entry", ["train", "eval", "convert-single", "convert-hf", "generate"])
def test_crafted_dcp_metadata_never_runs_code(ckpt, tmp_path, entry):
    config, model_path = ckpt
    folder = model_path / f"iter_{SAVE_STEPS:07d}"
    marker = tmp_path / "pwned"
    (folder / "dist" / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    _rewrite_manifest(folder, "dist/.metadata")
    argv = {
        "train": ["-m", "ironcore", str(config), *SMALL, f"operation.train_steps={SAVE_STEPS + 1}"],
        "eval": ["-m", "ironcore", "eval", str(config), *SMALL],
        "convert-single": [str(ROOT / "tools" / "convert_checkpoint.py"), "--from", "ironcore", "--to", "single",
                           "--input", str(folder), "--output", str(tmp_path / "single")],
        "convert-hf": [str(ROOT / "tools" / "convert_checkpoint.py"), "--from", "ironcore", "--to", "hf",
                       "--input", str(folder), "--output", str(tmp_path / "hf")],
        "generate": [str(ROOT / "tools" / "generate.py"), "--checkpoint", str(model_path), "--prompt", "Hi",
                     "--max-new-tokens", "2"],
    }[entry]
    proc = _run(*argv, cwd=tmp_path)
    assert not marker.exists()
    assert proc.returncode == 1, proc.stderr
    _one_line_error(proc.stderr, str(folder / "dist" / ".metadata"), "posix.system")


# ---------------------------------------------------------------------------------------------
# 2. Exact resume with dropout: 12 steps straight == 6 + resume 6, bit for bit

STEPS, STOP = 12, 6


def _dropout_config(tmp_path: Path, name: str, **extra) -> str:
    return str(write_config(tmp_path, name, operation={"train_steps": STEPS, "no_save": False},
                            trainer={"save_checkpoint_steps": STOP, "micro_batch_size": 1, "train_batch_size": 2,
                                     **extra},
                            utils={"deterministic": True, "log_level": "WARNING"}))


def _train(path: str, *overrides: str) -> dict:
    dropout = [f"model.dropout_{kind}=0.1" for kind in ("embd", "attn", "mlp")]
    metrics._cpu_gemm_flops.clear()  # probe again, as a fresh process does (the cache is per process)
    return train(load(Path(path), *dropout, *overrides))


def _resume_copy(tmp_path: Path) -> None:
    """`resumed` starts from the straight run's checkpoint of step STOP (saved on its way)."""
    shutil.copytree(tmp_path / "straight" / f"iter_{STOP:07d}", tmp_path / "resumed" / f"iter_{STOP:07d}")
    (tmp_path / "resumed" / "latest").write_text(f"{STOP}\n")


def _check_exact(tmp_path: Path) -> None:
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == list(range(1, STEPS + 1)) and sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == straight[step], step  # bitwise: float equality, no tolerance


def test_resume_with_dropout_is_bitwise_exact_dp1(tmp_path):
    straight, resumed = _dropout_config(tmp_path, "straight"), _dropout_config(tmp_path, "resumed")
    _train(straight)
    _resume_copy(tmp_path)
    assert _train(resumed)["steps"] == STEPS
    _check_exact(tmp_path)
    # Dropout is on: the losses depend on the RNG streams (so the test can fail).
    assert _train(straight, "model.dropout_mlp=0.0", "operation.no_save=true")["final_loss"] \
        != losses(tmp_path / "resumed")[STEPS]


@pytest.mark.parametrize("layout", ["dp2", "tp2"])
def test_resume_with_dropout_is_bitwise_exact_on_two_ranks(tmp_path, layout):
    extra = {"tensor_model_parallel_size": 2} if layout == "tp2" else {}
    straight, resumed = _dropout_config(tmp_path, "straight", **extra), _dropout_config(tmp_path, "resumed", **extra)
    run_distributed(_train, 2, straight)
    _resume_copy(tmp_path)
    assert run_distributed(_train, 2, resumed)[0]["steps"] == STEPS
    _check_exact(tmp_path)


# ---------------------------------------------------------------------------------------------
# 3. A crash between any two filesystem operations of a save leaves a loadable `latest`


class _Crash(BaseException):
    """A process dying at this instant (not an Exception: nothing may catch and tidy it)."""


_FS_OPS = ("open", "rename", "replace", "mkdir", "fsync", "unlink", "rmdir", "write", "ftruncate")


def _count_fs_ops(monkeypatch, crash_at: int | None) -> list:
    """Hook the OS calls a save makes; raise _Crash before the call numbered `crash_at`."""
    done: list = []
    for name in _FS_OPS:
        real = getattr(os, name)

        def hooked(*args, _real=real, _name=name, **kwargs):
            if crash_at is not None and len(done) == crash_at:
                raise _Crash(_name)
            done.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, hooked)
    # Files the checkpoint code opens itself (`open(path, "wb")`) count too.
    from ironcore.checkpoint import io as ckpt_io

    def hooked_open(*args, **kwargs):
        if crash_at is not None and len(done) == crash_at:
            raise _Crash("open file")
        done.append("open file")
        return open(*args, **kwargs)

    monkeypatch.setattr(ckpt_io, "open", hooked_open, raising=False)
    return done


def _linear(value: float) -> torch.nn.Linear:
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


@pytest.mark.parametrize("again", [True, False], ids=["same-iteration-again", "next-iteration"])
def test_crash_at_every_instant_of_a_save_leaves_a_loadable_latest(tmp_path, monkeypatch, again):
    from ironcore.checkpoint import io as ckpt_io
    from ironcore.config import Config
    from ironcore.parallel.state import ParallelState

    def cfg_for(root: Path) -> Config:
        cfg = Config()
        cfg.trainer.model_path = str(root)
        return cfg

    new_iteration = 2 if again else 4

    def attempt(root: Path, crash_at: int | None) -> list:
        ckpt_io.save_checkpoint(cfg_for(root), ParallelState(), 2, _linear(1.0), None, None, None, {"consumed_samples": 2})
        with monkeypatch.context() as m:
            ops = _count_fs_ops(m, crash_at)
            try:
                ckpt_io.save_checkpoint(cfg_for(root), ParallelState(), new_iteration, _linear(2.0), None, None, None,
                                        {"consumed_samples": new_iteration})
            except _Crash:
                pass
        return ops

    ops = attempt(tmp_path / "count", None)
    total = len(ops)
    assert total > 20 and {"open file", "fsync", "rename", "replace"} <= set(ops)  # the save's files, manifest, renames and `latest` are all counted
    for k in range(total + 1):
        root = tmp_path / f"crash{k}"
        attempt(root, k)
        lock = ckpt_io.claim_model_path(cfg_for(root), ParallelState())  # the next start
        lock.release()
        model = _linear(0.0)
        resumed = ckpt_io.load_checkpoint(cfg_for(root), ParallelState(), model, None, None, None)
        value = model.weight[0, 0].item()
        assert (resumed["iteration"], value) in {(2, 1.0), (new_iteration, 2.0)}, k
        assert value == 2.0 or k < total
        leftovers = [p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
        assert leftovers == [], (k, leftovers)


# ---------------------------------------------------------------------------------------------
# Corruptions: exit 1, one line naming the file, no traceback


def _torch_bytes(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _edit_manifest(edit):
    def apply(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps(edit(manifest)))
    return apply


def _replace(name: str, data, rehash: bool = True):
    def apply(folder: Path) -> None:
        path = folder / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)
        if rehash:
            _rewrite_manifest(folder, name)
    return apply


def _renamed_metadata(data: bytes) -> bytes:
    """A well-formed DCP index whose tensors have other names (another model's)."""
    from ironcore.checkpoint.distributed import _MetadataUnpickler
    import io
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    metadata.state_dict_metadata = {f"{k}.other": v for k, v in metadata.state_dict_metadata.items()}
    return pickle.dumps(metadata)


def _set_latest(data: bytes):
    def apply(folder: Path) -> None:
        (folder.parent / "latest").write_bytes(data)
    return apply


def _drop_entry_key(name: str, key: str):
    def edit(manifest: dict) -> dict:
        del manifest["files"][name][key]
        return manifest
    return edit


ITER = f"iter_{SAVE_STEPS:07d}"
# (case, damage applied to the checkpoint folder, the file the one-line error must name)
CORRUPTIONS = [
    ("latest-garbled", _set_latest(b"five\n"), "latest"),
    ("latest-5000-digits", _set_latest(b"9" * 5000), "latest"),
    ("latest-not-utf8", _set_latest(b"\xff\xfe\x00"), "latest"),
    ("latest-names-missing-folder", _set_latest(b"7\n"), "iter_0000007"),
    ("manifest-missing", lambda f: (f / "manifest.json").unlink(), f"{ITER}/manifest.json" and ITER),
    ("manifest-not-json", _replace("manifest.json", b"{", rehash=False), f"{ITER}/manifest.json"),
    ("manifest-not-utf8", _replace("manifest.json", b"\xff\xfe{}", rehash=False), f"{ITER}/manifest.json"),
    ("manifest-without-files", _edit_manifest(lambda m: {"iteration": 2}), f"{ITER}/manifest.json"),
    ("manifest-files-a-list", _edit_manifest(lambda m: {**m, "files": list(m["files"])}), f"{ITER}/manifest.json"),
    ("manifest-entry-without-size", _edit_manifest(_drop_entry_key("common.pt", "size")), f"{ITER}/manifest.json"),
    ("manifest-size-a-string", _edit_manifest(lambda m: {**m, "files": {**m["files"], "common.pt": {
        **m["files"]["common.pt"], "size": "12"}}}), f"{ITER}/manifest.json"),
    ("manifest-path-outside", _edit_manifest(lambda m: {**m, "files": {**m["files"], "../x": m["files"]["common.pt"]}}),
     f"{ITER}/manifest.json"),
    ("manifest-omits-common", _edit_manifest(lambda m: {**m, "files": {
        k: v for k, v in m["files"].items() if k != "common.pt"}}), f"{ITER}/manifest.json"),
    ("common-truncated", _replace("common.pt", lambda d: d[:100], rehash=False), f"{ITER}/common.pt"),
    ("distcp-flipped", _replace("dist/__0_0.distcp", lambda d: d[:-1] + bytes([d[-1] ^ 1]), rehash=False),
     f"{ITER}/dist/__0_0.distcp"),
    ("distcp-truncated-rehashed", _replace("dist/__0_0.distcp", lambda d: d[: len(d) // 2]), f"{ITER}/dist"),
    ("common-wrong-keys-rehashed", _replace("common.pt", _torch_bytes({"step": 2})), f"{ITER}/common.pt"),
    ("common-not-torch-rehashed", _replace("common.pt", b"not a torch file"), f"{ITER}/common.pt"),
    ("metadata-garbage-rehashed", _replace("dist/.metadata", b"\x80\x04garbage"), f"{ITER}/dist/.metadata"),
    ("metadata-other-keys-rehashed", _replace("dist/.metadata", _renamed_metadata), f"{ITER}/dist"),
    ("stage-garbage-rehashed", _replace("dist/stage_pp00.pt", b"garbage"), f"{ITER}/dist/stage_pp00.pt"),
    ("rng-wrong-keys-rehashed", _replace("rng_rank00000.pt", _torch_bytes({"python": 1})), f"{ITER}/rng_rank00000.pt"),
]


def test_at_least_17_corruption_cases():
    assert len({c[0] for c in CORRUPTIONS}) == len(CORRUPTIONS) >= 17


def _train_cli(config: Path, capsys, *overrides: str) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main([str(config), *SMALL, "utils.log_level=ERROR", *overrides])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("name,damage,named", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_checkpoint_is_one_line_naming_the_file(ckpt, capsys, name, damage, named):
    config, model_path = ckpt
    damage(model_path / ITER)
    status, err = _train_cli(config, capsys, f"operation.train_steps={SAVE_STEPS + 2}")
    assert status == 1, err
    _one_line_error(err, "ironcore train: rank 0:", str(model_path / named))
    assert len(err) < 1500  # never the file's contents


# ---------------------------------------------------------------------------------------------
# 4. No `latest` but checkpoints: resume from the newest that verifies, never overwrite


def test_missing_latest_resumes_from_newest_verifying_checkpoint(ckpt, capsys, caplog):
    config, model_path = ckpt
    (model_path / "latest").unlink()
    status, err = _train_cli(config, capsys, f"operation.train_steps={SAVE_STEPS + 1}")
    assert status == 0, err
    assert (model_path / "latest").read_text().strip() == str(SAVE_STEPS + 1)
    assert sorted(losses(model_path)) == [1, 2, 3]  # steps 1-2 from the first run, then only step 3


def test_missing_latest_and_no_verifying_checkpoint_refuses(ckpt, capsys):
    config, model_path = ckpt
    (model_path / "latest").unlink()
    damaged = model_path / ITER / "common.pt"
    damaged.write_bytes(damaged.read_bytes()[:-1])
    before = (model_path / ITER / "manifest.json").read_bytes()
    status, err = _train_cli(config, capsys, f"operation.train_steps={SAVE_STEPS + 1}")
    assert status == 1
    _one_line_error(err, str(model_path), ITER, "trainer.load_iteration=0")
    assert (model_path / ITER / "manifest.json").read_bytes() == before and not (model_path / "latest").exists()


# ---------------------------------------------------------------------------------------------
# 5. Never a non-finite checkpoint; skipped steps are bounded


def test_overflowing_lr_never_publishes_a_checkpoint(ckpt, capsys):
    config, model_path = ckpt
    status, err = _train_cli(config, capsys, "optim.max_lr=1e300", "optim.load_checkpoint_lr_scheduler=false", f"operation.train_steps={SAVE_STEPS + 1}")
    assert status == 1
    _one_line_error(err, f"step {SAVE_STEPS + 1}", "NaN or inf")
    assert (model_path / "latest").read_text().strip() == str(SAVE_STEPS)
    assert sorted(p.name for p in model_path.iterdir() if p.name.startswith("iter_")) == [ITER]


def test_skipped_steps_are_bounded(ckpt, capsys):
    config, model_path = ckpt
    status, err = _train_cli(config, capsys, "optim.max_lr=1e300", "optim.load_checkpoint_lr_scheduler=false", "trainer.skip_nonfinite_steps=true",
                             "trainer.max_skipped_steps=2", "operation.train_steps=10", "operation.no_save=true")
    assert status == 1
    # Step 3 makes the weights infinite; steps 4 and 5 are skipped, then the run stops.
    _one_line_error(err, "2 consecutive steps (4 to 5, trainer.max_skipped_steps=2)")
    assert (model_path / "latest").read_text().strip() == str(SAVE_STEPS)


# ---------------------------------------------------------------------------------------------
# One run per model_path, leftovers tidied, unusable folders and full disks are one line


def test_second_run_on_a_model_path_is_refused(ckpt, capsys):
    from ironcore.checkpoint.io import ModelPathLock

    config, model_path = ckpt
    lock = ModelPathLock(model_path)
    lock.acquire()  # another run holds it
    try:
        status, err = _train_cli(config, capsys, f"operation.train_steps={SAVE_STEPS + 1}")
    finally:
        lock.release()
    assert status == 1
    _one_line_error(err, f"trainer.model_path {model_path} is in use by another run (pid {os.getpid()}")
    # A lock file left by a dead process is no obstacle (the kernel dropped its lock), and a killed
    # save's temporary folder is removed at the start.
    (model_path / ".lock").write_text("pid 999999 on elsewhere\n")
    (model_path / f"iter_{SAVE_STEPS + 1:07d}.tmp-0badf00d").mkdir()
    status, err = _train_cli(config, capsys, f"operation.train_steps={SAVE_STEPS + 1}")
    assert status == 0, err
    assert sorted(p.name for p in model_path.iterdir() if p.name.startswith("iter_")) == [
        ITER, f"iter_{SAVE_STEPS + 1:07d}"]


@pytest.mark.parametrize("key", ["trainer.model_path", "utils.tensorboard_dir"])
def test_output_folder_under_a_file_is_one_line(ckpt, capsys, tmp_path, key):
    config, _ = ckpt
    (tmp_path / "a-file").write_text("x")
    status, err = _train_cli(config, capsys, f"{key}={tmp_path / 'a-file' / 'sub'}")
    assert status == 1
    _one_line_error(err, key, str(tmp_path / "a-file"))


def test_disk_full_during_a_distributed_save_is_one_line(ckpt, capsys, monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full)
    config, model_path = ckpt
    status, err = _train_cli(config, capsys, f"operation.train_steps={SAVE_STEPS + 1}")
    assert status == 1
    _one_line_error(err, "No space left on device", str(model_path / f"iter_{SAVE_STEPS + 1:07d}"))
    assert (model_path / "latest").read_text().strip() == str(SAVE_STEPS)
    assert not [p for p in model_path.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------
# MLflow: an unreachable server is one line at once; failed runs say so; a resume continues its run


def test_unreachable_mlflow_server_fails_fast_in_one_line(ckpt, capsys):
    import time

    config, _ = ckpt
    started = time.monotonic()
    status, err = _train_cli(config, capsys, "utils.mlflow_tracking_uri=http://127.0.0.1:9/",
                             f"operation.train_steps={SAVE_STEPS + 1}")
    assert status == 1 and time.monotonic() - started < 30
    _one_line_error(err, "utils.mlflow_tracking_uri http://127.0.0.1:9/", "no MLflow server answers at 127.0.0.1:9")


def test_resumed_run_continues_its_mlflow_run_and_failures_are_marked(ckpt, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    config, model_path = ckpt
    uri = (tmp_path / "mlruns").as_uri()
    for steps in (SAVE_STEPS + 1, SAVE_STEPS + 2):
        status, err = _train_cli(config, capsys, f"utils.mlflow_tracking_uri={uri}", f"operation.train_steps={steps}")
        assert status == 0, err
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("run").experiment_id
    (run,) = client.search_runs([experiment])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [3, 4]
    assert run.info.status == "FINISHED"

    status, err = _train_cli(config, capsys, f"utils.mlflow_tracking_uri={uri}", "optim.max_lr=1e300", "optim.load_checkpoint_lr_scheduler=false",
                             f"operation.train_steps={SAVE_STEPS + 4}")
    assert status == 1
    (run,) = client.search_runs([experiment])
    assert run.info.status == "FAILED"


# ---------------------------------------------------------------------------------------------
# Workers end with their launcher


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_worker_exits_when_the_torchrun_agent_is_killed(ckpt, tmp_path):
    import signal
    import time

    config, model_path = ckpt
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "ironcore",
         str(config), *SMALL, "operation.train_steps=100000", "operation.no_save=true", "utils.log_level=ERROR"],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        metrics = model_path / "metrics.jsonl"
        before = len(metrics.read_text().splitlines())
        while len(metrics.read_text().splitlines()) <= before:  # the worker is training
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = _children(agent.pid)
        assert len(workers) == 1
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        gone_by = time.monotonic() + 15
        while Path(f"/proc/{workers[0]}").exists() and Path(f"/proc/{workers[0]}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < gone_by, "the worker outlived its launcher"
            time.sleep(0.2)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if agent.poll() is None:
            agent.kill()
            agent.wait()


# ---------------------------------------------------------------------------------------------
# Token ids past the vocabulary are found when the dataset is opened


def test_token_id_past_the_vocabulary_is_one_line_naming_the_bin(tmp_path, capsys):
    import numpy as np

    from ironcore.data.indexed import IndexedDatasetBuilder

    prefix = tmp_path / "data" / "corpus"
    builder = IndexedDatasetBuilder(str(prefix), 50257)
    rng = np.random.default_rng(0)
    for _ in range(40):
        builder.add_document([*rng.integers(0, 50000, 63).tolist(), 50256])
    builder.finalize()
    tokens = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r+")
    tokens[1234] = 65535  # trains with a finite loss if nobody looks
    tokens.flush()
    del tokens
    config = write_config(tmp_path, "run", data={"task_type": "pretrain", "splits": [0.9, 0.1, 0.0],
                                                 "train_datasets": [{"path": str(prefix), "weight": 1.0}]},
                          operation={"train_steps": 3, "no_save": True})
    status, err = _train_cli(config, capsys)
    assert status == 1
    _one_line_error(err, f"{prefix}.bin: token id 65535 at position 1234 is outside the vocabulary")
