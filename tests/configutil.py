"""Test configs: dotted-path overrides on a preset, and the one directory test datasets are built in."""

import os
import pathlib

TEST_DATA_DIR = str(pathlib.Path(os.environ.get("PYTEST_DATA_DIR", "/tmp/jaxunified_test_data")))


def override(config, **dotted):
    """Sets ``{"optim.lr": 0.1, ...}``-style fields on a ConfigDict in place (new ones too) and returns it."""
    with config.unlocked():
        for key, value in dotted.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config
