"""Who holds which data: the files a trial deployment hands out, and a device reading its own."""

from __future__ import annotations

import numpy as np
import pytest

from common.artifacts import OutputExistsError
from common.config import Config
from common.dataset import DataError, Sequences, eval_examples, training_windows
from common.federation import catalogue, client_data, federation, local_client_data, write_device_files

DATA = {"dataset": "synthetic", "synthetic-users": 90, "synthetic-items": 30, "synthetic-groups": 3,
        "synthetic-min-len": 6, "synthetic-max-len": 12, "max-len": 5}


def test_device_files_hold_every_user_once_and_read_back_in_the_servers_item_order(tmp_path):
    cfg = Config.from_run_config({**DATA, "holdout-users": 0.2})
    files = write_device_files(cfg, tmp_path / "split", clients=3)
    assert [f.name for f in files] == ["server.txt", "client-1.txt", "client-2.txt", "client-3.txt"]
    users = [line.split()[0] for f in files for line in f.read_text().splitlines()]
    assert sorted(users, key=int) == [str(u) for u in range(90)] and len(files[0].read_text().splitlines()) == 18

    # The server's data defines the catalogue; a device's file, read in that order, is the same
    # data the simulation gives that device.
    server = Config.from_run_config({**DATA, "dataset": "seq", "data-dir": str(files[0]), "partition": "devices"})
    assert len(federation(server).holdout) == 18 and federation(server).clients == []
    dealt = Config.from_run_config({**DATA, "holdout-users": 0.2, "partition": "iid", "num-clients": 3})
    local = local_client_data(server, str(files[1]), "seq", catalogue(dealt))
    simulated = [federation(dealt).data.sequences[u] for u in federation(dealt).clients[0]]
    assert np.array_equal(local.valid[2], [s[-2] for s in simulated])
    assert local.windows.shape[0] >= len(simulated) and local.num_items == 30


def test_a_device_drops_items_the_server_does_not_know(tmp_path):
    path = tmp_path / "device.txt"
    path.write_text("alice a b x c d\nbob x y z\n")
    cfg = Config.from_run_config({**DATA, "partition": "devices"})
    data = local_client_data(cfg, str(path), "seq", ["a", "b", "c", "d"])
    assert data.valid[2].tolist() == [3]  # alice: a b c d -> valid target c (bob has no known item left)
    assert data.windows.tolist() == [[1, 2, 0, 0, 0, 0]]
    with pytest.raises(DataError, match="no user has 3 or more"):
        local_client_data(cfg, str(path), "seq", ["x"])


def test_device_files_need_held_out_users_and_never_overwrite(tmp_path):
    with pytest.raises(DataError, match="holdout-users"):
        write_device_files(Config.from_run_config(DATA), tmp_path / "a", clients=2)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        write_device_files(Config.from_run_config({**DATA, "holdout-users": 0.2}), tmp_path / "b", clients=2)


def test_a_clients_data_is_its_users_windows_derived_once():
    cfg = Config.from_run_config({**DATA, "partition": "iid", "num-clients": 3})
    fed = federation(cfg)
    for partition, users in enumerate(fed.clients):
        own = Sequences.of([fed.data.sequences[u] for u in users])
        data = client_data(cfg, partition)
        assert np.array_equal(data.windows, training_windows(own, cfg.max_len))
        for got, expected in zip(data.valid, eval_examples(own, "valid", cfg.max_len), strict=True):
            assert np.array_equal(got, expected)
        assert client_data(cfg, partition) is data  # a repeated message reuses it
    with pytest.raises(ValueError, match="out of range"):
        client_data(cfg, 3)
