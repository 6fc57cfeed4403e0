"""Option precedence: config file < CACHEFS_* environment < command line."""

from __future__ import annotations

from tests.procs import run_cli


def test_file_then_env_then_flag(tmp_path):
    config = tmp_path / "cachefs.toml"
    config.write_text('[status]\nmaster = "127.0.0.1:1"\n')
    env = {"CACHEFS_CONFIG": str(config)}

    from_file = run_cli("status", env=env)
    assert from_file.returncode == 1 and "127.0.0.1:1" in from_file.stderr

    env["CACHEFS_STATUS_MASTER"] = "127.0.0.1:2"
    from_env = run_cli("status", env=env)
    assert from_env.returncode == 1 and "127.0.0.1:2" in from_env.stderr

    from_flag = run_cli("status", "--master", "127.0.0.1:3", env=env)
    assert from_flag.returncode == 1 and "127.0.0.1:3" in from_flag.stderr


def test_nested_tables_and_explicit_path(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[dataset.ls]\nmaster = "127.0.0.1:4"\n')
    result = run_cli("--config", str(config), "dataset", "ls")
    assert result.returncode == 1 and "127.0.0.1:4" in result.stderr


def test_bad_config_is_a_usage_error(tmp_path):
    missing = run_cli("--config", str(tmp_path / "nope.toml"), "status")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[worker\n")
    result = run_cli("--config", str(broken), "status")
    assert result.returncode == 2 and "cannot read config file" in result.stderr
