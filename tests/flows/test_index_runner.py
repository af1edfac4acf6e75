"""The runner options (`--runner`, `--ray-address`, realign's `runner`/`ray_address`): bad values are one line and
exit code 2 before any work; the realign parameters accept the good ones."""

from __future__ import annotations

import pytest

from flows.cli import main
from flows.params import ConfigError, parse_params, runner_problem


@pytest.mark.parametrize(
    ("runner", "address", "problem"),
    [
        ("local", None, None),
        ("ray", None, None),
        ("ray", "auto", None),
        ("ray", "ray://head.example:10001", None),
        ("ray", "10.0.0.5:6379", None),
        ("local", "auto", "only used with runner 'ray'"),
        ("ray", "http://x:1", "expected 'auto'"),
        ("ray", "head; rm -rf /", "expected 'auto'"),
        ("dask", None, "runner must be 'local' or 'ray'"),
    ],
)
def test_runner_problem(runner, address, problem):
    got = runner_problem(runner, address)
    assert (got is None) if problem is None else (problem in got)


def test_realign_params_take_the_runner():
    p = parse_params({"runner": "ray", "ray_address": "auto"}, "test")
    assert (p.runner, p.ray_address) == ("ray", "auto")
    with pytest.raises(ConfigError, match="test: .*ray_address is only used with runner 'ray'"):
        parse_params({"ray_address": "auto"}, "test")
    with pytest.raises(ConfigError, match="test: runner"):
        parse_params({"runner": "spark"}, "test")


def test_index_cli_refuses_a_bad_runner_before_any_work(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["index", str(missing / "c.jsonl"), str(missing), "--ray-address", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lancet: error: lancet index: --runner/--ray-address: ray_address is only used with runner 'ray'"]
    assert main(["index", str(missing / "c.jsonl"), str(missing), "--runner", "ray", "--ray-address", "a b"]) == 2
    assert "expected 'auto', 'ray://host:port' or 'host:port'" in capsys.readouterr().err
    assert not missing.exists()


def test_realign_cli_refuses_a_bad_ray_address(capsys):
    assert main(["realign", "--runner", "ray", "--ray-address", "ftp://x"]) == 2
    assert "ray_address 'ftp://x'" in capsys.readouterr().err


def test_an_unreachable_ray_cluster_is_one_line_in_seconds(tmp_path, capsys):
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    missing = tmp_path / "nope"
    t0 = time.perf_counter()
    assert main(["index", str(missing / "c.jsonl"), str(missing), "--runner", "ray", "--ray-address",
                 f"127.0.0.1:{port}"]) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the Ray cluster at 127.0.0.1:{port} does not answer" in err[0]
