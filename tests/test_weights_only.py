"""Checkpoint loading under the weights-only allowlist (artifacts/run_dir.py `weights_only_loading`) reads what
every supported Python pickles: Python 3.11.0-3.11.3 (Debian 12's python3 is 3.11.2) write an enum member as a
call of builtins.getattr, which the allowlist resolves for DeepSpeed's enums and nothing else."""
from __future__ import annotations

import enum
import os
import pickle
import types

import pytest
import torch

from artifacts.run_dir import enum_member_by_name, weights_only_loading


def by_name_pickle_module(lookups: dict[type, tuple[object, str]] | None = None) -> types.SimpleNamespace:
    """A pickle module for torch.save whose Pickler writes enum members the way Python 3.11.0-3.11.3 do,
    `getattr(cls, name)`, whatever Python runs the test; `lookups` maps further classes to an arbitrary
    getattr(obj, name) reduce (what a hostile file could hold)."""
    lookups = lookups or {}

    class ByNamePickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, enum.Enum):
                return getattr, (type(obj), obj._name_)
            if type(obj) in lookups:
                return getattr, lookups[type(obj)]
            return NotImplemented

    return types.SimpleNamespace(**{**vars(pickle), "Pickler": ByNamePickler})


def test_getattr_pickled_zero_stage_loads_under_the_allowlist(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = {"zero_stage": ZeroStageEnum.optimizer_states, "stages": [ZeroStageEnum.weights, ZeroStageEnum.disabled],
             "w": torch.arange(4.0)}
    path = tmp_path / "optim_states.pt"
    torch.save(state, path, pickle_module=by_name_pickle_module())
    assert any(b"builtin__\ngetattr\n" in pkl for pkl in pickled_parts(path))  # the 3.11.2 form, whatever runs this
    with weights_only_loading():
        loaded = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed passes False; overridden
    assert loaded["zero_stage"] is ZeroStageEnum.optimizer_states
    assert loaded["stages"] == [ZeroStageEnum.weights, ZeroStageEnum.disabled]
    assert torch.equal(loaded["w"], torch.arange(4.0))
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    # Without the allowlist the same file is refused: the test reads what the loader adds, not a default.
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        torch.load(path, map_location="cpu", weights_only=True)


class Color(enum.Enum):
    """An enum that is not DeepSpeed's: not allow-listed."""
    RED = 1


def test_getattr_reaches_nothing_but_allowlisted_enum_members(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    class Marker:
        pass

    # A member name that is not a member, an attribute of an allow-listed class, an enum that is not allow-listed.
    for target in [(ZeroStageEnum, "__class__"), (ZeroStageEnum, "_missing_"), (LossScaler, "update_scale"),
                   (LossScaler, "__init__")]:
        path = tmp_path / "evil.pt"
        torch.save({"x": Marker()}, path, pickle_module=by_name_pickle_module({Marker: target}))
        with weights_only_loading(), pytest.raises(pickle.UnpicklingError):
            torch.load(path, map_location="cpu", weights_only=False)
    assert enum_member_by_name(ZeroStageEnum, "gradients") is ZeroStageEnum.gradients
    for cls, name in [(ZeroStageEnum, "name"), (Color, "RED"), (ZeroStageEnum, 3)]:
        with pytest.raises(pickle.UnpicklingError, match="only members of DeepSpeed's allow-listed enums"):
            enum_member_by_name(cls, name)


def pickled_parts(path) -> list[bytes]:
    """The pickle streams inside a torch.save zip file."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        return [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
