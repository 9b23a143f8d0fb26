import os

import pytest
import torch

from unet_dist import checkpoint
from unet_dist.errors import UserError


def _state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "model_config": {"dims": 2}, "step": step,
            "config": {"run": {"dir": "x"}}, "wandb_run_id": "abc"}


def test_save_is_atomic_and_prunes(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, _state(step), keep_last=2, is_best=step == 20)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "step-000000030.pt", "step-000000040.pt"]  # no temporary files left
    assert checkpoint.load(tmp_path / "best.pt")["step"] == 20
    state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 40 and path.name == "step-000000040.pt"
    assert torch.equal(state["model"]["w"], torch.full((3,), 40.0))


def test_truncated_newest_falls_back(tmp_path, capsys):
    for step in (1, 2):
        checkpoint.save(tmp_path, _state(step), keep_last=5)
    newest = checkpoint.step_path(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[:100])
    state, path = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "step-000000001.pt"
    err = capsys.readouterr().err
    assert "skipping" in err and newest.name in err
    assert checkpoint.load_latest(tmp_path / "none") is None


def test_garbage_and_foreign_files_are_user_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(UserError, match="garbage.pt: not a valid unet_dist checkpoint"):
        checkpoint.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="missing keys"):
        checkpoint.load(foreign)
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_crafted_pickle_cannot_run_code(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": _Exploit(), "model_config": {}, "step": 0}, evil)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(UserError, match="not a valid"):
            checkpoint.load(evil)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists()
