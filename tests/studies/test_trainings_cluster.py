"""The trainings of ``experiment`` and ``rank-study`` on Dask (issue 16): one model a task; the models, their
evaluation records and every table are those of the serial run, byte for byte.

Training on a CPU depends on torch's thread count in the last bits, so the serial reference runs with one
torch thread, as every Dask task does (:mod:`dqtool.studies.trainings`), set here: the session's
``one_torch_thread`` is not enough (in one long session, a study with DQ left torch on 2 threads). Both runs
write ``study`` inside their own working directory, so the paths recorded in the files are equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dqtool.common.errors import InputError
from dqtool_cli.main import cli
from factories import disc_folder

TRAIN = {"n_epochs": 2, "bsize": 32, "batch_size": 4, "min_train_masks": 1, "save_every": 50}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """One tiny domain (train and test folders of disc images) and a study of three redundancy models."""
    root = tmp_path_factory.mktemp("trainings")
    for split, (n, seed) in {"train": (2, 1), "test": (2, 2)}.items():
        disc_folder(root / "small" / split, n, n_cells=6, radius=(4.0, 6.0), seed=seed)
    config = {"domains": {"small": {"train": str(root / "small" / "train"), "test": str(root / "small")}},
              "patch": {"size": 32, "stride": 32}, "source": "small", "targets": [], "rates": [0.25, 0.5],
              "methods": ["random"], "sequences": [], "train": TRAIN}
    path = root / "study.json"
    path.write_text(json.dumps(config))
    return path


def _experiment(config: Path, cwd: Path, monkeypatch, *extra) -> dict[str, bytes]:
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(cli, ["--quiet", "experiment", str(config), "--out", "study", *extra])
    assert result.exit_code == 0, result.output
    study = cwd / "study"
    kept = [*sorted((study / "tables").iterdir()), study / "report.md", study / "fig1_rate_curve.png",
            *sorted((study / "models" / "redundancy" / "evals").iterdir())]
    # the models and their losses (a model's sidecar JSON records its run time)
    kept += [p for p in sorted((study / "models" / "redundancy").iterdir())
             if p.is_file() and not p.name.endswith((".json", ".png", ".lock"))]
    return {str(p.relative_to(study)): p.read_bytes() for p in kept}


def test_experiment_on_two_workers_writes_the_serial_models_and_tables(config, dask_scheduler, tmp_path,
                                                                       monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the serial reference: one torch thread, as every training task
    try:
        serial = _experiment(config, tmp_path / "serial", monkeypatch)
    finally:
        torch.set_num_threads(before)
    models = [k for k in serial if k.startswith("models/redundancy/small_") and not k.endswith(".csv")]
    assert models == ["models/redundancy/small_all_1", "models/redundancy/small_random_0.25",
                      "models/redundancy/small_random_0.5"]
    assert _experiment(config, tmp_path / "dask", monkeypatch, "--scheduler", dask_scheduler) == serial


def test_a_training_worker_killed_after_a_checkpoint_resumes_to_the_serial_models(config, dask_client, dask_scheduler,
                                                                                  tmp_path, monkeypatch):
    """A worker is SIGKILLed inside a training, right after its first checkpoint (``train:checkpoint``); the nanny
    starts a new worker, Dask runs the task again, it resumes from that checkpoint (the dead process's lock and
    temp files do not stop it), and the models, records and tables are the serial run's, byte for byte."""
    study = json.loads(config.read_text())
    study["train"] = {**TRAIN, "n_epochs": 4, "save_every": 2}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = _experiment(path, tmp_path / "serial", monkeypatch)
    finally:
        torch.set_num_threads(before)
    flag = tmp_path / "died"
    dask_client.run(exec, f"import os; os.environ['DQTOOL_TEST_KILL_AT'] = {f'train:checkpoint@{flag}'!r}")
    try:
        killed = _experiment(path, tmp_path / "dask", monkeypatch, "--scheduler", dask_scheduler)
    finally:
        dask_client.run(exec, "import os; os.environ.pop('DQTOOL_TEST_KILL_AT', None)")
        dask_client.wait_for_workers(2, timeout=60)
    assert flag.exists()  # a worker did die inside a training
    assert killed == serial


@pytest.fixture(scope="module")
def transfer_config(tmp_path_factory):
    """Two tiny domains and every transfer step: finetuning both ways, joint, a replay, two sequences (one
    from the source model, one from the other domain's scratch model, which the reverse finetuning shares)."""
    root = tmp_path_factory.mktemp("transfer")
    domains = {}
    for name, radius, seed in (("small", (4.0, 6.0), 1), ("big", (7.0, 9.0), 3)):
        for split, (n, s) in {"train": (2, seed), "test": (1, seed + 1)}.items():
            disc_folder(root / name / split, n, n_cells=5, radius=radius, seed=s)
        domains[name] = {"train": str(root / name / "train"), "test": str(root / name / "test")}
    config = {"domains": domains, "patch": {"size": 32, "stride": 32}, "source": "small", "targets": ["big"],
              "rates": [0.5], "methods": ["random"], "reverse": ["big"], "joint": ["big"], "replay_method": "random",
              "replay_rates": [0.5], "sequences": [["small", "big"], ["big", "small"]], "train": TRAIN}
    path = root / "study.json"
    path.write_text(json.dumps(config))
    return path


def _study_files(study: Path) -> dict[str, bytes]:
    """Tables, report, and every model and evaluation record the transfer steps wrote (the records name a
    given model by its absolute path: the run's folder is cut out of them)."""
    kept = [*sorted((study / "tables").iterdir()), study / "report.md"]
    for folder in sorted(study.iterdir()):
        if folder.name.startswith(("finetune_", "replay_", "sequence_")) or folder.name == "models":
            kept += [p for p in sorted(folder.rglob("*")) if p.is_file() and "redundancy" not in p.parts
                     and (p.suffix not in (".json", ".png", ".lock", ".md") or p.parent.name == "evals")]
    here = str(study.parent).encode()
    return {str(p.relative_to(study)): p.read_bytes().replace(here, b"RUN") for p in kept}


def test_experiment_transfer_steps_on_two_workers_write_the_serial_models_and_tables(transfer_config,
                                                                                     dask_scheduler, tmp_path,
                                                                                     monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the serial reference: one torch thread, as every training task
    try:
        (tmp_path / "serial").mkdir()
        monkeypatch.chdir(tmp_path / "serial")
        result = CliRunner().invoke(cli, ["--quiet", "experiment", str(transfer_config), "--out", "study"])
        assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(before)
    serial = _study_files(tmp_path / "serial" / "study")
    models = sorted(k for k in serial if "/evals/" not in k and not k.endswith(".csv") and k.count("/") >= 2)
    assert models == ["finetune_big/models/01_finetune", "finetune_big_to_small/models/01_finetune",
                      "models/joint/small+big", "models/scratch/big_all", "replay_big_0.5/models/01_replay_random_0.5", "sequence_0_small-big/models/01_big",
                      "sequence_1_big-small/models/01_small"]
    rows = json.loads((tmp_path / "serial" / "study" / "tables" / "transfer.json").read_text())
    assert [r["model"] for r in rows] == ["small model", "naive finetune small -> big", "big model",
                                          "naive finetune big -> small", "joint small + big",
                                          "replay random 0.5"]
    (tmp_path / "dask").mkdir()
    monkeypatch.chdir(tmp_path / "dask")
    result = CliRunner().invoke(cli, ["--quiet", "experiment", str(transfer_config), "--out", "study",
                                      "--scheduler", dask_scheduler])
    assert result.exit_code == 0, result.output
    assert _study_files(tmp_path / "dask" / "study") == serial


def test_rank_study_bank_on_two_workers_is_the_serial_bank(dask_client, tmp_path, monkeypatch):
    """The bank's trainings one task each (the ranking's tasks are tested in tests/ranking)."""
    from dqtool.common.cluster import Cluster, connect
    from dqtool.data.synthetic import generate
    from dqtool.studies.rank_study import BankMember, build_bank

    data = generate(tmp_path / "data", seed=0, n_train=1, n_test=1, size=96, quiet=True)
    members = (BankMember("fluo", 1), BankMember("histo", 1), BankMember("fluo", 1, 0.5))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the serial reference: one torch thread, as every training task
    try:
        serial = build_bank(data, tmp_path / "serial", members, nimg_per_epoch=2, bsize=32)
    finally:
        torch.set_num_threads(before)
    with connect(Cluster(scheduler=dask_client.scheduler.address), quiet=True) as cluster:
        bank = build_bank(data, tmp_path / "dask", members, nimg_per_epoch=2, bsize=32, cluster=cluster)
        with pytest.raises(InputError, match="no worker of the cluster offers"):  # never left waiting
            build_bank(data, tmp_path / "gpu", members, nimg_per_epoch=2, bsize=32, cluster=cluster,
                       resources={"GPU": 1})
    assert [p.name for p in bank] == [p.name for p in serial] == [f"{m.name}.pth" for m in members]
    assert [p.read_bytes() for p in bank] == [p.read_bytes() for p in serial]


def test_train_resources_need_a_scheduler(tmp_path):
    result = CliRunner().invoke(cli, ["rank-study", "--out", str(tmp_path / "s"), "--workers", "2",
                                      "--train-resources", "GPU=1"])
    assert result.exit_code == 2 and "--train-resources needs --scheduler" in result.output
    result = CliRunner().invoke(cli, ["experiment", "--quick", "--out", str(tmp_path / "e"), "--train-resources",
                                      "GPU"])
    assert result.exit_code == 2 and "NAME=AMOUNT" in result.output
    from dqtool.studies.trainings import parse_resources

    assert parse_resources("GPU=1, MEM=4e9") == {"GPU": 1.0, "MEM": 4e9} and parse_resources(None) is None
