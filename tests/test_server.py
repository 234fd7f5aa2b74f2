"""Server-side pieces of the ServerApp that need no running Flower."""

import pytest

from fedlearn.config import RunConfig
from fedlearn.errors import ConfigError
from server.app import global_model, initial_arrays
from server.grid import short_reason


def test_short_reason_strips_flowers_remote_traceback():
    reason = ("Traceback (most recent call last):\n  File x\nflwr.ClientAppException: \n"
              "Exception ClientAppException occurred. Message: weights 'w' contain NaN'>")
    assert short_reason(reason) == "weights 'w' contain NaN"


def test_initial_model_is_seeded():
    config = RunConfig.from_flat({"seed": 3})
    a, b = initial_arrays(config), initial_arrays(config)
    other = initial_arrays(config.replace(seed=4))
    assert all((a[k].numpy() == b[k].numpy()).all() for k in a)
    assert any((a[k].numpy() != other[k].numpy()).any() for k in a)
    assert set(global_model(config).state_dict()) == set(a)


def test_he_threshold_without_openfhe_stops_before_the_run_with_the_install_hint(monkeypatch, tmp_path):
    import sys

    from server.privacy import preflight

    monkeypatch.setitem(sys.modules, "openfhe", None)  # as if the extra were not installed
    config = RunConfig.from_flat({"privacy": "he-threshold", "out-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"fedlearn\[threshold\]"):
        preflight(config)
    preflight(config.replace(privacy="secagg"))  # the other modes never need it
