"""Server-side pieces of the ServerApp that need no running Flower."""

from fedlearn.config import RunConfig
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
