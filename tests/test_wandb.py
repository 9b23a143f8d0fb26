"""W&B: which mode `logging.wandb=auto` picks (the server's key in the environment or .netrc, a
self-hosted server too), and checkpoints recorded as artifacts of an offline run."""

from __future__ import annotations

import pytest

from unet_dist import checkpoint
from unet_dist.monitor.training import resolve_wandb_mode

from helpers import CONFIGS, run_cli

SMOKE = CONFIGS / "smoke.yaml"
KEY = "k" * 40


def _netrc(home, *machines: str) -> None:
    (home / ".netrc").write_text("".join(f"machine {m}\n  login user\n  password {KEY}\n" for m in machines))
    (home / ".netrc").chmod(0o600)


def _mode(home, **env) -> str:
    return resolve_wandb_mode("auto", {"HOME": str(home), **env})


def test_auto_is_online_with_a_key_for_the_public_server(tmp_path):
    assert _mode(tmp_path) == "offline"  # no .netrc
    assert _mode(tmp_path, WANDB_API_KEY=KEY) == "online"
    _netrc(tmp_path, "example.org")
    assert _mode(tmp_path) == "offline"
    _netrc(tmp_path, "api.wandb.ai")
    assert _mode(tmp_path) == "online"


@pytest.mark.parametrize("base_url, machine", [("https://wandb.example.org", "wandb.example.org"),
                                               ("http://localhost:8080", "localhost:8080")])
def test_auto_looks_up_the_self_hosted_server_of_wandb_base_url(tmp_path, base_url, machine):
    _netrc(tmp_path, "api.wandb.ai")  # a key for the public server only
    assert _mode(tmp_path, WANDB_BASE_URL=base_url) == "offline"
    _netrc(tmp_path, machine)
    assert _mode(tmp_path, WANDB_BASE_URL=base_url) == "online"
    assert _mode(tmp_path) == "offline"  # that key is not the public server's


def test_netrc_names_another_file_and_explicit_modes_win(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    _netrc(tmp_path / "elsewhere", "api.wandb.ai")
    assert _mode(tmp_path, NETRC=str(tmp_path / "elsewhere" / ".netrc")) == "online"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password\n")  # no key
    assert _mode(tmp_path) == "offline"
    assert _mode(tmp_path, WANDB_API_KEY=KEY, WANDB_MODE="disabled") == "disabled"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": KEY}) == "offline"


def test_checkpoints_are_artifacts_of_the_offline_run(synth_store, tmp_path):
    from wandb_records import of_type, run_ids

    run = tmp_path / "run"
    done = run_cli("train", "--config", SMOKE, f"data.store={synth_store}", f"run.dir={run}",
                   "logging.wandb=offline", "logging.checkpoint_artifacts=always", "data.val_slices=[8,12]",
                   "data.train_slices=[0,8]", "train.steps=10", "train.val_every=5", "train.ckpt_every=5",
                   env={"WANDB_MODE": None, "WANDB_API_KEY": None, "OMP_NUM_THREADS": "1"})
    assert done.code == 0, done.err
    (file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    (run_id,) = run_ids(file)
    assert run_id == checkpoint.load_latest(run / "checkpoints")[0]["wandb_run_id"]
    artifacts = of_type(file, "artifact")
    assert {a.name for a in artifacts} == {f"model-{run_id}"} and {a.type for a in artifacts} == {"model"}
    aliases = [set(a.aliases) for a in artifacts]
    assert any({"step-5"} <= a for a in aliases) and any({"latest", "step-10"} <= a for a in aliases)
    assert any("best" in a for a in aliases)
    assert all([entry.path for entry in a.manifest.contents] == ["checkpoint.pt"] for a in artifacts)
