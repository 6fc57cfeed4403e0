"""deploy/ and docker-compose.yml: checked statically, since nothing here can run them.

There is no Docker engine and no Kubernetes cluster in CI, so these tests check what can be
checked without one:

- every `cachefs ...` command line in the compose file, the Kubernetes manifests (container
  args, `sh -c` scripts, hooks, probes) and the systemd units (after their EnvironmentFile and
  specifier expansion) is parsed by the real click command objects of `cachefs.cli.main`: an
  unknown subcommand, a renamed or removed flag, a missing required option or a stray argument
  fails here; concrete addresses, sizes and dataset URIs go through cachefs's own parsers;
- authentication: every command that talks to a cluster passes --secret-file, and that path is
  a file cachefs accepts (no group/other access, readable by its user): the compose init service's
  script is run here, and for Kubernetes the Secret volume's mode, the pod's users and fsGroup,
  or the init container that copies the Secret into a private file are checked;
- structure and consistency: compose services, volumes, dependencies and privileges; Kubernetes
  kinds, names, labels, selectors, volumes, ports and the addresses the pieces use to find each
  other; the Fluid CRD fields and the config-parsing script of the ThinRuntime FUSE container
  (run here against a Fluid-style config.json); the Dockerfile's stages, copied paths and
  entrypoint; systemd units (configparser, plus `systemd-analyze verify` when available).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import yaml

from cachefs import config as cachefs_config
from cachefs.cli import main
from cachefs.config import parse_address, parse_size
from cachefs.credentials import read_secret
from cachefs.ufs import parse_uri

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"cachefs:{PYPROJECT['project']['version']}"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"

# Values the downward API would give (fieldRef), so that addresses built from them parse.
FIELD_REF_SAMPLES = {
    "spec.nodeName": "node-a",
    "status.podIP": "10.0.0.7",
    "status.hostIP": "10.0.0.1",
    "metadata.name": "pod-0",
    "metadata.namespace": "cachefs",
}


# --- cachefs command lines -----------------------------------------------------------------------


@dataclass
class Invocation:
    """One `cachefs ...` command line found in a deploy file, parsed by click."""

    where: str
    argv: list[str]  # after "cachefs"
    path: str  # "worker", "dataset add", ...
    params: dict[str, Any]


def _takes_value(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and not param.is_flag and not param.count


def _known_options(command: click.Command) -> set[str]:
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    return known | {"-h", "--help"}


def _take_group_options(group: click.Group, args: list[str], where: str, argv) -> list[str]:
    """Pops the options given to `group` itself (before its subcommand) off `args`."""
    by_name = {opt: p for p in group.params for opt in (*p.opts, *p.secondary_opts)}
    taken = []
    while args and args[0].startswith("-") and args[0] != "-":
        token = args.pop(0)
        name = token.split("=", 1)[0] if token.startswith("--") else token
        assert name in by_name, f"{where}: `cachefs` has no option {name} here: {argv}"
        taken.append(token)
        if _takes_value(by_name[name]) and "=" not in token and args:
            taken.append(args.pop(0))
    return taken


def parse_cachefs(argv: list[str], where: str) -> Invocation:
    """Resolves the subcommand and parses its arguments exactly as `cachefs` would."""
    args = list(argv)
    command: click.Command = main
    path: list[str] = []
    while isinstance(command, click.Group):
        taken = _take_group_options(command, args, where, argv)
        if args and args[0] in command.commands:
            path.append(args.pop(0))
            command = command.commands[path[-1]]
            continue
        if command is not main and command.invoke_without_command:
            # e.g. `cachefs master --listen ...`: the group runs as a command itself
            args = taken + args
            command = click.Command(command.name, params=command.params)
            break
        assert args, f"{where}: `cachefs {' '.join(path)}` needs a subcommand: {argv}"
        pytest.fail(
            f"{where}: no subcommand `cachefs {' '.join([*path, args[0]])}` "
            f"(known: {', '.join(sorted(command.commands))}): {argv}"
        )
    known = _known_options(command)
    for token in args:
        if token == "--":
            break
        if token.startswith("-") and token != "-":
            flag = token.split("=", 1)[0] if token.startswith("--") else token
            assert flag in known, (
                f"{where}: `cachefs {' '.join(path)}` has no option {flag} "
                f"(it has {', '.join(sorted(known))}): {argv}"
            )
    try:
        ctx = command.make_context(f"cachefs {' '.join(path)}", list(args))
    except click.UsageError as exc:
        pytest.fail(f"{where}: `cachefs {' '.join(argv)}` is rejected by click: {exc}")
    return Invocation(where, list(argv), " ".join(path), dict(ctx.params))


def master_of(inv: Invocation) -> str | None:
    """The --master a command line gives (the worker's parameter has had two names)."""
    return inv.params.get("master", inv.params.get("master_addr"))


def is_concrete(value: Any) -> bool:
    """True when a value holds no unexpanded shell/Kubernetes variable."""
    return isinstance(value, str) and "$" not in value


def check_values(inv: Invocation) -> None:
    """Addresses, sizes and URIs that are literal in the file must parse as cachefs parses them."""
    p = inv.params
    if inv.path == "master":
        assert p["state"], f"{inv.where}: the master needs --state"
    for key in ("listen", "advertise", "master", "master_addr"):
        if is_concrete(p.get(key)):
            parse_address(p[key])
    for key in ("mem", "disk_size"):
        if is_concrete(p.get(key)):
            parse_size(p[key])
    if inv.path == "dataset add" and is_concrete(p["uri"]):
        options = dict(pair.split("=", 1) for pair in p["options"] if is_concrete(pair))
        parse_uri(p["uri"], options)


def cachefs_env_names() -> set[str]:
    """Every CACHEFS_* variable cachefs reads: CACHEFS_<COMMAND>_<OPTION> (click's
    auto_envvar_prefix), explicit envvars such as CACHEFS_MASTER, and the config file's."""
    names = {getattr(cachefs_config, "CONFIG_ENV", "CACHEFS_CONFIG"), cachefs_config.MASTER_ENV}

    def walk(command: click.Command, prefix: str) -> None:
        for param in command.params:
            if isinstance(param, click.Option):
                names.add(f"{prefix}_{param.name.upper()}")
                envvar = param.envvar
                names.update([envvar] if isinstance(envvar, str) else envvar or [])
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{prefix}_{name.upper().replace('-', '_')}")

    walk(main, "CACHEFS")
    return names


def check_cachefs_env(env: dict[str, str], where: str) -> None:
    """A CACHEFS_* variable in a cachefs process's environment must be one cachefs reads:
    any other name there is a typo or a setting that was renamed."""
    unknown = sorted(k for k in env if k.startswith("CACHEFS_") and k not in cachefs_env_names())
    assert not unknown, f"{where}: cachefs reads no variable {', '.join(unknown)}"


SECRET_NAME = "cachefs-cluster"  # the Kubernetes Secret with the cluster's shared secret
SECRET_KEY = "secret"


def takes_secret(inv: Invocation) -> bool:
    """Commands that talk to a cluster (all but e.g. `umount`) take --secret-file."""
    return "secret_file" in inv.params


def check_passes_secret(inv: Invocation) -> PurePosixPath:
    """The command names its secret file itself (not via the environment, nor a secret that a
    master published in a runtime dir, which only works on the master's host for its user)."""
    explicit = any(a == "--secret-file" or a.startswith("--secret-file=") for a in inv.argv)
    assert explicit, f"{inv.where}: `cachefs {inv.path}` without --secret-file: {inv.argv}"
    assert not inv.params.get("insecure"), f"{inv.where}: --insecure"
    path = PurePosixPath(inv.params["secret_file"])
    assert path.is_absolute() and is_concrete(str(path)), f"{inv.where}: --secret-file {path}"
    return path


# --- shell scripts -------------------------------------------------------------------------------

_SEPARATORS = {"&&", "||", ";", ";;", "|", "|&", "&", "(", ")"}
_PREFIX_WORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "exec", "{"}
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand_shell_vars(text: str, env: dict[str, str]) -> str:
    """Substitutes the variables we know; unknown ones stay as written ("$NAME")."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return env.get(name, m.group(0))

    return _VAR.sub(sub, text)


def shell_commands(script: str, env: dict[str, str]) -> list[list[str]]:
    """The simple commands of a POSIX sh script, with known variables expanded.

    Heredoc bodies and comments are dropped, lines are split at control operators, and
    redirections are removed. A variable is substituted before splitting, so an unquoted one
    splits into words as in sh, and a quoted one stays one word. "$@" is dropped: it holds
    arguments assembled at run time.
    """
    lines, heredoc_end = [], None
    for line in script.replace("\\\n", " ").splitlines():
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if heredoc:
            heredoc_end = heredoc.group(1)
            line = line[: heredoc.start()] + line[heredoc.end() :]
        lines.append(expand_shell_vars(line, env))
    commands = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        current: list[str] = []
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token in _SEPARATORS:
                commands.append(current)
                current = []
            elif token and set(token) <= set("<>&|") and ("<" in token or ">" in token):
                if current and current[-1].isdigit():  # the fd of 2>/dev/null
                    current.pop()
                i += 1  # and the redirection's target
            elif token not in ("$@", "$*"):
                current.append(token)
            i += 1
        commands.append(current)
    return [c for c in commands if c]


def cachefs_argv(words: list[str]) -> list[str] | None:
    """The arguments after `cachefs` when `words` runs cachefs, else None."""
    for i, word in enumerate(words):
        if PurePosixPath(word).name == "cachefs":
            return words[i + 1 :] if all(w in _PREFIX_WORDS for w in words[:i]) else None
        if word not in _PREFIX_WORDS:
            return None
    return None


def invocations_in_argv(
    argv: list[str], env: dict[str, str], where: str, *, default_entrypoint: bool = False
) -> list[Invocation]:
    """cachefs invocations of one process: `cachefs ...`, `sh -c SCRIPT`, or the image's
    `cachefs` entrypoint followed by `argv` (default_entrypoint)."""
    if not argv:
        return []
    if default_entrypoint:
        return [parse_cachefs(argv, where)]
    if PurePosixPath(argv[0]).name in ("sh", "bash") and len(argv) > 2 and argv[1] == "-c":
        found = []
        for words in shell_commands(argv[2], env):
            rest = cachefs_argv(words)
            if rest is not None:
                found.append(parse_cachefs(rest, where))
        return found
    rest = cachefs_argv(argv)
    return [] if rest is None else [parse_cachefs(rest, where)]


# --- docker compose ------------------------------------------------------------------------------

_COMPOSE_VAR = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def compose_interpolate(value: Any) -> Any:
    """Compose's own interpolation, with variables at their defaults ("$$" is a literal "$")."""
    if isinstance(value, str):
        return _COMPOSE_VAR.sub(lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), value)
    if isinstance(value, list):
        return [compose_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: compose_interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_interpolate(yaml.safe_load(COMPOSE_FILE.read_text()))


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _uses_cachefs_image(service: dict) -> bool:
    build = service.get("build") or {}
    return service.get("image") == IMAGE or (
        isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"
    )


def compose_invocations(compose: dict) -> dict[str, list[Invocation]]:
    found = {}
    for name, service in compose["services"].items():
        env = _service_env(service)
        where = f"docker-compose.yml services.{name}"
        entrypoint = _as_list(service.get("entrypoint"))
        command = _as_list(service.get("command"))
        if _uses_cachefs_image(service):
            check_cachefs_env(env, where)
        if _uses_cachefs_image(service) and not entrypoint:
            found[name] = invocations_in_argv(command, env, where, default_entrypoint=True)
        else:
            found[name] = invocations_in_argv(entrypoint + command, env, where)
        for test in _as_list((service.get("healthcheck") or {}).get("test"))[:1]:
            assert test in ("CMD", "CMD-SHELL", "NONE"), f"{where}: healthcheck test {test!r}"
    return found


def _by_path(invocations: list[Invocation], path: str) -> list[Invocation]:
    return [inv for inv in invocations if inv.path == path]


def test_compose_has_the_services_and_only_hdfs_ones_are_optional(compose):
    services = compose["services"]
    core = {"s3", "seed", "master", "worker1", "worker2", "client"}
    hdfs = {"namenode", "datanode"}
    assert core | hdfs <= set(services)
    for name, service in services.items():
        if name in hdfs:
            assert service.get("profiles") == ["hdfs"], name
            assert service["image"].startswith("apache/hadoop:"), name
        if name in core:
            assert "profiles" not in service, f"{name} must start without --profile"
    assert services["s3"]["image"].startswith("minio/minio:")
    assert services["seed"]["image"].startswith("minio/mc:")
    for name in ("master", "worker1", "worker2", "client"):
        assert _uses_cachefs_image(services[name]), name
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (ROOT / services[name]["build"]["context"] / "deploy/Dockerfile").is_file()


def test_compose_dependencies_and_volumes_exist(compose):
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        depends = service.get("depends_on") or []
        for dep in depends:
            assert dep in services, f"{name} depends on unknown service {dep}"
            if "profiles" not in service:
                assert "profiles" not in services[dep], f"{name} depends on optional {dep}"
        if isinstance(depends, dict):
            for dep, how in depends.items():
                assert how["condition"] in (
                    "service_started",
                    "service_healthy",
                    "service_completed_successfully",
                ), (name, dep)
                if how["condition"] == "service_healthy":
                    assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health"
        for volume in service.get("volumes") or []:
            if isinstance(volume, str):
                source = volume.split(":", 1)[0]
                if not source.startswith((".", "/")):
                    assert source in declared, f"{name}: volume {source} is not declared"
            elif volume["type"] == "volume":
                assert volume["source"] in declared, name
    found = compose_invocations(compose)
    state = []
    for name in ("master", "worker1", "worker2"):
        (inv,) = found[name]
        targets = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        state.append(targets[inv.params["state"]])
    assert len(set(state)) == 3, f"master and workers need their own state volumes: {state}"


def test_compose_cachefs_command_lines_parse(compose):
    found = compose_invocations(compose)
    assert sum(len(v) for v in found.values()) >= 6
    for invocations in found.values():
        for inv in invocations:
            check_values(inv)
    (master,) = found["master"]
    assert master.path == "master"
    master_port = parse_address(master.params["listen"])[1]
    for name in ("worker1", "worker2"):
        (worker,) = found[name]
        assert worker.path == "worker"
        assert master_of(worker) == f"master:{master_port}"
        assert worker.params["advertise"] == f"{name}:{parse_address(worker.params['listen'])[1]}"
        assert worker.params["host_id"] == name
        assert worker.params["mem"] == "512M"
        assert worker.params["shm"] == "/dev/shm"
        assert parse_size(compose["services"][name]["shm_size"]) > parse_size(worker.params["mem"])
        assert worker.params["state"] in {
            v.split(":")[1] for v in compose["services"][name]["volumes"]
        }
    client = found["client"]
    (add,) = _by_path(client, "dataset add")
    (mount,) = _by_path(client, "mount")
    assert add.params["name"] == mount.params["source"] == "demo"
    assert "endpoint_override=s3:9000" in add.params["options"]
    assert "scheme=http" in add.params["options"]
    assert mount.params["master"] == add.params["master"] == f"master:{master_port}"
    assert mount.params["foreground"], "the client must stay in the foreground (-f)"
    assert mount.params["mountpoint"].startswith("/mnt/cachefs")
    # the bucket and prefix the client registers are the ones the seed job uploads
    uri = parse_uri(add.params["uri"])
    seed_script = " ".join(_as_list(compose["services"]["seed"]["command"]))
    assert f"store/{uri.host}/{uri.path}" in seed_script
    assert f"store/{uri.host}" in seed_script.split("mc mb", 1)[1].split("\n", 1)[0]


def test_compose_client_can_mount_fuse_and_share_it(compose):
    client = compose["services"]["client"]
    assert client["privileged"] is True
    assert any(d.split(":")[0] == "/dev/fuse" for d in client["devices"])
    assert "SYS_ADMIN" in client["cap_add"]
    (mnt,) = [v for v in client["volumes"] if isinstance(v, dict) and v["type"] == "bind"]
    assert mnt["target"] == "/mnt/cachefs"
    assert mnt["bind"]["propagation"] == "rshared"
    (mount,) = _by_path(compose_invocations(compose)["client"], "mount")
    assert PurePosixPath(mount.params["mountpoint"]).is_relative_to(mnt["target"])
    env = _service_env(client)
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    assert _service_env(compose["services"]["s3"])["MINIO_ROOT_USER"] == env["AWS_ACCESS_KEY_ID"]


def _compose_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """A service's volumes: target -> (source, read-only)."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[target] = (source, "ro" in (mode[0].split(",") if mode else []))
        else:
            mounts[volume["target"]] = (volume.get("source"), bool(volume.get("read_only")))
    return mounts


def test_compose_every_cachefs_command_uses_the_secret_the_init_service_makes(compose, tmp_path):
    services = compose["services"]
    init = services["secret"]
    assert "profiles" not in init and init.get("restart") == "no"
    ((target, (volume, read_only)),) = _compose_mounts(init).items()
    assert not read_only and volume in compose["volumes"]
    users = set()
    checked = set()
    for name, invocations in compose_invocations(compose).items():
        for inv in filter(takes_secret, invocations):
            path = check_passes_secret(inv)
            service = services[name]
            assert _compose_mounts(service).get(str(path.parent)) == (volume, True), (
                f"{name}: --secret-file {path} is not in the {volume} volume (read-only)"
            )
            assert path.parent == PurePosixPath(target) and path.name == SECRET_KEY, (name, path)
            condition = (service.get("depends_on") or {}).get("secret", {}).get("condition")
            assert condition == "service_completed_successfully", f"{name} must wait for it"
            users.add(service.get("user", "0:0"))
            checked.add(name)
    assert {"master", "worker1", "worker2", "client"} <= checked
    (master,) = compose_invocations(compose)["master"]
    assert master.params["secret_file"], "the master would make its own secret otherwise"
    # `docker compose exec client cachefs ...` finds it without a flag
    client_env = _service_env(services["client"])
    assert client_env.get("CACHEFS_SECRET_FILE") == f"{target}/{SECRET_KEY}"

    # Run the init script on a directory standing in for the volume: a python stub for the
    # image's interpreter, a chown stub recording the owner it gives.
    bin_dir, vol = tmp_path / "bin", tmp_path / "vol"
    bin_dir.mkdir()
    vol.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "chown").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "chown.log"}\n')
    (bin_dir / "chown").chmod(0o755)
    assert _as_list(init["entrypoint"]) == ["/bin/sh", "-c"]
    (script,) = _as_list(init["command"])
    script = script.replace(target, str(vol))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def run() -> bytes:
        subprocess.run(["/bin/sh", "-c", script], env=env, check=True, capture_output=True)
        secret_file = vol / SECRET_KEY
        mode = secret_file.stat().st_mode & 0o777
        assert mode == 0o600, f"services.secret leaves {secret_file.name} at mode {mode:o}"
        return read_secret(secret_file)  # what cachefs itself accepts

    first = run()
    (vol / SECRET_KEY).chmod(0o644)
    assert run() == first, "a second start must keep the secret (and close its mode again)"
    (vol / SECRET_KEY).unlink()
    assert run() != first, "made at random"
    owners = {line.split()[0] for line in (tmp_path / "chown.log").read_text().splitlines()}
    # owned by the user the non-root services run as (the root client reads it anyway)
    assert owners == users - {"0:0", "0"}, (owners, users)


def test_compose_sample_job_uses_flags_cachefs_sample_accepts(compose):
    sample = compose["services"]["sample"]
    assert _as_list(sample["entrypoint"]) == ["python", "-m", "cachefs.sample"]
    helptext = subprocess.run(
        [sys.executable, "-m", "cachefs.sample", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for token in _as_list(sample["command"]):
        if token.startswith("--"):
            assert token in helptext, f"python -m cachefs.sample has no {token}"
    volume_targets = {v.split(":")[1] for v in sample["volumes"]}
    root = _as_list(sample["command"])[0]
    assert any(PurePosixPath(root).is_relative_to(t) for t in volume_targets)


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower() for r in requirements}


def _shown_compose_commands(path: Path) -> list[list[str]]:
    """The `docker compose ...` command lines a file shows (in comments or in a README's code
    blocks), as words, with any leading VAR=value assignments and without trailing comments."""
    found = []
    for line in path.read_text().splitlines():
        line = line.strip().lstrip("#").strip()
        if re.match(r"(\w+=\S*\s+)*docker compose\s", line):
            found.append(shlex.split(line, comments=True))
    return found


def test_compose_hdfs_profile_serves_hdfs_with_the_default_image(compose):
    """The `hdfs` profile as documented (the compose file's header, deploy/README.md): started
    without CACHEFS_WITH_HDFS, since hdfs-native is a dependency of cachefs and so in the
    default image; the hdfs:// dataset it registers names the NameNode's RPC address and the
    path hdfs-seed fills; the DataNode shares the cachefs containers' network, so the IP the
    NameNode hands out for it is reachable (no dfs.client.use.datanode.hostname)."""
    services = compose["services"]
    assert "hdfs-native" in _requirement_names(PYPROJECT["project"]["dependencies"])
    for name, service in services.items():
        if _uses_cachefs_image(service):  # WITH_HDFS: only for -o client=libhdfs (a JVM)
            assert (service["build"].get("args") or {}).get("WITH_HDFS", "false") == "false", name
    hdfs = {name for name, s in services.items() if "hdfs" in (s.get("profiles") or [])}
    assert hdfs == {"namenode", "datanode", "hdfs-seed"}
    for name, service in services.items():  # one default network: DataNode IPs are reachable
        assert "network_mode" not in service and "networks" not in service, f"{name}: network"
    hadoop = compose["x-hadoop-env"]
    nn_host, nn_port = parse_address(hadoop["HDFS-SITE.XML_dfs.namenode.rpc-address"])
    assert nn_host in services and services[nn_host]["hostname"] == nn_host
    assert hadoop["CORE-SITE.XML_fs.defaultFS"] == f"hdfs://{nn_host}:{nn_port}"
    (seeded,) = re.findall(r"hdfs dfs -put \S+ (\S+)", "\n".join(services["hdfs-seed"]["command"]))
    client_env = _service_env(services["client"])
    assert {"CACHEFS_MASTER", "CACHEFS_SECRET_FILE"} <= set(client_env)
    for path in (COMPOSE_FILE, DEPLOY / "README.md"):
        commands = _shown_compose_commands(path)
        ups = [c for c in commands if "hdfs" in c and "up" in c]
        assert ups, f"{path.name}: no `docker compose --profile hdfs up` shown"
        for words in ups:
            assert "--profile" in words and not any(w.startswith("CACHEFS_") for w in words), (
                f"{path.name}: the hdfs profile needs no build variable: {shlex.join(words)}"
            )
        adds = []
        for words in commands:
            if words[2:5] == ["exec", "client", "cachefs"]:
                inv = parse_cachefs(words[5:], f"{path.name}: {shlex.join(words)}")
                if inv.path == "dataset add" and inv.params["uri"].startswith("hdfs://"):
                    adds.append(inv)
        assert adds, f"{path.name}: no hdfs:// `cachefs dataset add` shown"
        for inv in adds:
            check_values(inv)
            options = dict(pair.split("=", 1) for pair in inv.params["options"])
            assert options.get("client", "native") == "native", "the default image has no JVM"
            uri = parse_uri(inv.params["uri"], options)
            assert (uri.host, uri.port, uri.path) == (nn_host, nn_port, seeded), inv.where


# --- Kubernetes ----------------------------------------------------------------------------------

EXPECTED_KINDS = {
    "namespace.yaml": ["Namespace"],
    "configmap.yaml": ["ConfigMap"],
    "master.yaml": ["Service", "Service", "StatefulSet"],
    "worker.yaml": ["DaemonSet"],
    "fuse.yaml": ["Job", "DaemonSet"],
    "fluid-thinruntime.yaml": ["ThinRuntimeProfile", "Dataset", "ThinRuntime"],
}
WORKLOAD_KINDS = {"StatefulSet", "DaemonSet", "Deployment", "Job"}


def _load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    return {path.name: _load_docs(path) for path in sorted(K8S.glob("*.yaml"))}


def _all_docs(manifests) -> list[tuple[str, dict]]:
    return [(name, doc) for name, docs in manifests.items() for doc in docs]


def _one(manifests, file: str, kind: str, name: str | None = None) -> dict:
    docs = [
        d
        for d in manifests[file]
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(docs) == 1, f"{file}: expected one {kind} {name or ''}"
    return docs[0]


@pytest.fixture(scope="module")
def configmap(manifests) -> dict[str, str]:
    return _one(manifests, "configmap.yaml", "ConfigMap")["data"]


def _pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def _containers(doc: dict) -> list[dict]:
    spec = _pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_env(container: dict, manifests) -> dict[str, str]:
    """The environment a container starts with, as far as the manifests define it."""
    configmaps = {
        d["metadata"]["name"]: d.get("data", {})
        for _, d in _all_docs(manifests)
        if d["kind"] == "ConfigMap"
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["key"] in configmaps[ref["name"]], f"no key {ref['key']} in {ref['name']}"
            env[var["name"]] = configmaps[ref["name"]][ref["key"]]
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = FIELD_REF_SAMPLES[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _k8s_expand(words: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' own $(VAR) expansion of command and args (unknown ones stay as written)."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), w) for w in words]


def container_invocations(container: dict, env: dict[str, str], where: str) -> list[Invocation]:
    check_cachefs_env(env, where)
    command = _k8s_expand(container.get("command", []), env)
    args = _k8s_expand(container.get("args", []), env)
    found = invocations_in_argv(args, env, where, default_entrypoint=not command)
    if command:
        found = invocations_in_argv(command + args, env, where)
    # hooks and probes: no $(VAR) expansion by Kubernetes, but a `sh -c` expands $VAR
    handlers = [
        container.get("lifecycle", {}).get("preStop", {}),
        container.get("lifecycle", {}).get("postStart", {}),
        container.get("readinessProbe", {}),
        container.get("livenessProbe", {}),
        container.get("startupProbe", {}),
    ]
    for handler in handlers:
        if "exec" in handler:
            found += invocations_in_argv(handler["exec"]["command"], env, f"{where} (hook/probe)")
    return found


def k8s_invocations(manifests, file: str, kind: str, name: str) -> dict[str, list[Invocation]]:
    doc = _one(manifests, file, kind, name)
    return {
        c["name"]: container_invocations(
            c, container_env(c, manifests), f"{file} {kind}/{name} container {c['name']}"
        )
        for c in _containers(doc)
    }


def test_k8s_files_hold_the_expected_kinds(manifests):
    assert set(manifests) == set(EXPECTED_KINDS), "a new manifest needs an entry in EXPECTED_KINDS"
    for file, docs in manifests.items():
        assert Counter(d["kind"] for d in docs) == Counter(EXPECTED_KINDS[file]), file


def test_k8s_documents_are_well_formed_and_labelled(manifests):
    for file, doc in _all_docs(manifests):
        where = f"{file} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        assert doc.get("apiVersion"), where
        assert doc.get("kind"), where
        assert doc.get("metadata", {}).get("name"), where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]), where
        assert doc["metadata"].get("labels", {}).get(NAME_LABEL) == "cachefs", where
        if doc["apiVersion"].startswith("data.fluid.io/"):
            continue
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "cachefs", where
        if file in ("master.yaml", "worker.yaml", "fuse.yaml") and doc["kind"] != "Job":
            assert doc["metadata"]["labels"][COMPONENT_LABEL] == file.removesuffix(".yaml"), where


def test_k8s_selectors_match_template_labels(manifests):
    workloads = [(f, d) for f, d in _all_docs(manifests) if d["kind"] in WORKLOAD_KINDS]
    for file, doc in workloads:
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert labels.get(NAME_LABEL) == "cachefs", file
        if doc["kind"] != "Job":
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items(), f"{file} {doc['kind']} selector"
            assert selector.get(COMPONENT_LABEL), f"{file}: select on the component label"
    for file, doc in _all_docs(manifests):
        if doc["kind"] != "Service":
            continue
        selector = doc["spec"]["selector"]
        targets = [
            d
            for _, d in workloads
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"{file} Service/{doc['metadata']['name']} selects {targets}"
        ports = {
            p["name"]: p["containerPort"]
            for c in _containers(targets[0])
            for p in c.get("ports", [])
        }
        for port in doc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), (file, port)


def test_k8s_containers_have_image_args_and_declared_volumes(manifests):
    for file, doc in _all_docs(manifests):
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        spec = _pod_spec(doc)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for container in _containers(doc):
            where = f"{file} {doc['kind']}/{doc['metadata']['name']} {container['name']}"
            assert container["image"] == IMAGE, where
            assert container.get("args") or container.get("command"), where
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: undeclared volume {mount['name']}"
            port_names = {p["name"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = container.get(probe, {}).get("tcpSocket", {}).get("port")
                if isinstance(port, str):
                    assert port in port_names, f"{where}: {probe} port {port}"


def test_k8s_pods_get_no_service_link_variables(manifests):
    """Kubernetes adds <SERVICE>_SERVICE_HOST, <SERVICE>_PORT_... for each Service of the
    namespace; for cachefs-master those are CACHEFS_MASTER_* names, the space cachefs reads
    `cachefs master` option values from."""
    services = [d["metadata"]["name"] for _, d in _all_docs(manifests) if d["kind"] == "Service"]
    assert any(name.upper().replace("-", "_").startswith("CACHEFS_") for name in services)
    for file, doc in _all_docs(manifests):
        if doc["kind"] in WORKLOAD_KINDS:
            assert _pod_spec(doc).get("enableServiceLinks") is False, (file, doc["kind"])


def test_k8s_cachefs_command_lines_parse(manifests):
    count = 0
    for file, doc in _all_docs(manifests):
        if doc["kind"] in WORKLOAD_KINDS:
            for invocations in k8s_invocations(
                manifests, file, doc["kind"], doc["metadata"]["name"]
            ).values():
                for inv in invocations:
                    check_values(inv)
                    count += 1
    assert count >= 7


def test_k8s_master_statefulset_service_and_configmap_agree(manifests, configmap):
    sts = _one(manifests, "master.yaml", "StatefulSet", "cachefs-master")
    headless = _one(manifests, "master.yaml", "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    (service,) = [
        d
        for d in manifests["master.yaml"]
        if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"
    ]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["port"] for p in service["spec"]["ports"]] == [19470]
    (container,) = _pod_spec(sts)["containers"]
    (master,) = k8s_invocations(manifests, "master.yaml", "StatefulSet", "cachefs-master")[
        container["name"]
    ]
    assert master.path == "master"
    port = parse_address(master.params["listen"])[1]
    assert port == 19470
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["rpc"] == port
    assert "tcpSocket" in container["readinessProbe"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    state_mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert state_mounts[claim["metadata"]["name"]] == master.params["state"] == "/var/lib/cachefs"
    namespace = sts["metadata"]["namespace"]
    assert configmap["CACHEFS_MASTER"] in (
        f"{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}",
        f"{service['metadata']['name']}.{namespace}.svc:{port}",
    )


def _k8s_quantity(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6}
    units |= {"G": 10**9, "T": 10**12, "": 1}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(text)).groups()
    return int(float(number) * units[unit])


def test_k8s_worker_daemonset(manifests, configmap):
    ds = _one(manifests, "worker.yaml", "DaemonSet", "cachefs-worker")
    spec = _pod_spec(ds)
    assert spec["nodeSelector"] == {"cachefs.io/cache-node": "true"}
    (container,) = spec["containers"]
    (worker,) = k8s_invocations(manifests, "worker.yaml", "DaemonSet", "cachefs-worker")["worker"]
    p = worker.params
    assert worker.path == "worker"
    assert master_of(worker) == configmap["CACHEFS_MASTER"]
    assert p["host_id"] == FIELD_REF_SAMPLES["spec.nodeName"], "--host-id from spec.nodeName"
    listen_port = parse_address(p["listen"])[1]
    advertised = parse_address(p["advertise"])
    assert advertised[1] == listen_port
    assert spec.get("hostNetwork") or advertised[0] == FIELD_REF_SAMPLES["status.podIP"]
    assert {pt["name"]: pt["containerPort"] for pt in container["ports"]}["rpc"] == listen_port
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    shm = mounts[p["shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert _k8s_quantity(shm["emptyDir"]["sizeLimit"]) > parse_size(p["mem"])
    limit = container["resources"]["limits"]["memory"]
    assert _k8s_quantity(limit) > parse_size(p["mem"]), "the MEM tier counts as pod memory"
    (cache_path,) = [path for path, v in mounts.items() if "hostPath" in v]
    assert mounts[cache_path]["hostPath"]["path"] == "/var/lib/cachefs-worker"
    for key in ("state", "disk"):
        assert PurePosixPath(p[key]).is_relative_to(cache_path), f"--{key} outside the hostPath"


def test_k8s_fuse_daemonset_mounts_with_bidirectional_propagation(manifests, configmap):
    ds = _one(manifests, "fuse.yaml", "DaemonSet", "cachefs-fuse")
    spec = _pod_spec(ds)
    (container,) = spec["containers"]
    assert container["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/fuse"]["name"]]["hostPath"]["path"] == "/dev/fuse"
    (shared,) = [m for m in mounts.values() if m.get("mountPropagation") == "Bidirectional"]
    assert shared["mountPath"] == "/mnt/cachefs"
    assert volumes[shared["name"]]["hostPath"]["path"] == "/mnt/cachefs"
    found = k8s_invocations(manifests, "fuse.yaml", "DaemonSet", "cachefs-fuse")["fuse"]
    (mount,) = _by_path(found, "mount")
    (umount,) = _by_path(found, "umount")
    dataset = configmap["DATASET_NAME"]
    assert mount.params["source"] == dataset
    assert mount.params["mountpoint"] == umount.params["mountpoint"] == f"/mnt/cachefs/{dataset}"
    assert mount.params["master"] == configmap["CACHEFS_MASTER"]
    assert mount.params["foreground"], "the container's process is the mount (-f)"
    assert mount.params["allow_other"], "pods run as other users (--allow-other)"
    assert "cachefs umount" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    # the dataset the Job registers is the one the DaemonSet mounts
    (add,) = _by_path(
        k8s_invocations(manifests, "fuse.yaml", "Job", "cachefs-dataset")["dataset-add"],
        "dataset add",
    )
    assert add.params["name"] == dataset
    assert add.params["uri"] == configmap["DATASET_URI"]
    assert add.params["options"], "DATASET_OPTIONS must split into -o pairs"


def _image_runs_as_root() -> bool:
    """The image's default user: its last USER instruction, root without one."""
    users = [rest for name, rest in dockerfile_instructions() if name == "USER"]
    return not users or users[-1].split(":")[0] in ("0", "root")


def _run_as(container: dict, pod: dict) -> int:
    """The uid a container runs as: its own securityContext, else the pod's, else the image's."""
    for context in (container.get("securityContext", {}), pod.get("securityContext", {})):
        if "runAsUser" in context:
            return context["runAsUser"]
    assert _image_runs_as_root(), f"{container['name']}: the image is not root's: set runAsUser"
    return 0


def _mount_of(path: PurePosixPath, container: dict, where: str) -> tuple[dict, PurePosixPath]:
    """The (deepest) volumeMount of `container` holding `path`, and the path inside it."""
    mounts = [m for m in container.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])]
    assert mounts, f"{where}: no volume of the container holds {path}"
    mount = max(mounts, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))
    return mount, path.relative_to(mount["mountPath"])


def _secret_file(volume: dict, rel: PurePosixPath, where: str) -> int:
    """The mode of file `rel` of a volume that must be the cluster's Secret."""
    assert "secret" in volume, f"{where}: volume {volume['name']} is not a Secret"
    secret = volume["secret"]
    mode, key = secret.get("defaultMode", 0o644), str(rel)  # the API's default mode
    for item in secret.get("items", []):
        if item["path"] == str(rel):
            mode, key = item.get("mode", mode), item["key"]
    assert (secret["secretName"], key) == (SECRET_NAME, SECRET_KEY), f"{where}: {secret}"
    return mode


def check_secret_file(
    path: PurePosixPath, container: dict, pod: dict, earlier_inits: list[dict], where: str
) -> str:
    """`path` must be a secret file cachefs accepts (no group/other bits) and the container's
    user can read. Kubernetes writes Secret files as root with the volume's mode, except that
    a pod fsGroup adds group read (0440) whatever the mode says. So it is either the Secret
    itself, for a root container in a pod without fsGroup ("secret"), or a private copy that
    an earlier init container made in an emptyDir as the same user ("copy")."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mount, rel = _mount_of(path, container, where)
    assert mount.get("readOnly"), f"{where}: mount {mount['name']} read-only"
    volume = volumes[mount["name"]]
    uid = _run_as(container, pod)
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    if "secret" in volume:
        mode = _secret_file(volume, rel, where)
        assert mode & 0o077 == 0, f"{where}: mode {mode:o} is open to group/others"
        assert fs_group is None, f"{where}: fsGroup makes the Secret's file group-readable"
        assert uid == 0, f"{where}: the Secret's file is root's, uid {uid} cannot read it"
        return "secret"
    assert "emptyDir" in volume, f"{where}: {path} is neither the Secret nor a copy of it"
    copiers = []
    for init in earlier_inits:
        argv = [*init.get("command", []), *init.get("args", [])]
        if not argv or PurePosixPath(argv[0]).name != "install":
            continue
        mode = int(argv[argv.index("-m") + 1], 8)  # install -m MODE SOURCE DEST
        source, dest = (PurePosixPath(a) for a in argv[-2:])
        dest_mount, dest_rel = _mount_of(dest, init, where)
        if (dest_mount["name"], dest_rel) != (mount["name"], rel):
            continue
        source_mount, source_rel = _mount_of(source, init, where)
        source_mode = _secret_file(volumes[source_mount["name"]], source_rel, where)
        copier = _run_as(init, pod)
        assert mode & 0o077 == 0, f"{where}: {init['name']} copies with mode {mode:o}"
        assert copier == uid, f"{where}: the copy belongs to uid {copier}, read by uid {uid}"
        # the Secret's file is root's: a non-root copier reads it through fsGroup's group
        assert copier == 0 or (fs_group is not None and source_mode & 0o040), (
            f"{where}: {init['name']} (uid {copier}) cannot read the Secret"
        )
        copiers.append(init["name"])
    assert copiers, f"{where}: no init container copies the Secret to {path}"
    return "copy"


def test_k8s_every_cachefs_command_passes_a_secret_file_it_can_use(manifests):
    covered, ways = set(), Counter()
    for file, doc in _all_docs(manifests):
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        pod = _pod_spec(doc)
        inits = pod.get("initContainers", [])
        found = k8s_invocations(manifests, file, doc["kind"], doc["metadata"]["name"])
        for index, container in enumerate(_containers(doc)):
            where = f"{file} {doc['kind']}/{doc['metadata']['name']} {container['name']}"
            earlier = inits[:index] if index < len(inits) else inits
            for inv in filter(takes_secret, found[container["name"]]):
                path = check_passes_secret(inv)
                ways[check_secret_file(path, container, pod, earlier, where)] += 1
                covered.add(f"{doc['kind']}/{doc['metadata']['name']} {container['name']}")
    assert covered == {
        "StatefulSet/cachefs-master master",
        "DaemonSet/cachefs-worker worker",
        "Job/cachefs-dataset dataset-add",
        "DaemonSet/cachefs-fuse wait-dataset",
        "DaemonSet/cachefs-fuse fuse",
    }
    assert ways["secret"] and ways["copy"], ways


# --- Fluid ThinRuntime ---------------------------------------------------------------------------

# Field names of Fluid's data.fluid.io/v1alpha1 types (api/v1alpha1/thin*_types.go).
THIN_FUSE_FIELDS = {
    "image", "imageTag", "imagePullPolicy", "ports", "env", "command", "args", "options",
    "resources", "nodeSelector", "cleanPolicy", "networkMode", "livenessProbe",
    "readinessProbe", "volumeMounts",
}  # fmt: skip
THIN_PROFILE_FIELDS = {"fileSystemType", "worker", "fuse", "volumes"}
THIN_RUNTIME_FIELDS = {
    "profileName", "worker", "fuse", "tieredstore", "replicas", "runAs", "disablePrometheus",
    "volumes", "metadataList",
}  # fmt: skip


def test_fluid_thinruntime_fields_and_bindings(manifests):
    docs = manifests["fluid-thinruntime.yaml"]
    assert {d["apiVersion"] for d in docs} == {"data.fluid.io/v1alpha1"}
    profile = _one(manifests, "fluid-thinruntime.yaml", "ThinRuntimeProfile")
    runtime = _one(manifests, "fluid-thinruntime.yaml", "ThinRuntime")
    dataset = _one(manifests, "fluid-thinruntime.yaml", "Dataset")
    assert "namespace" not in profile["metadata"], "ThinRuntimeProfile is cluster-scoped"
    assert set(profile["spec"]) <= THIN_PROFILE_FIELDS
    assert set(profile["spec"]["fuse"]) <= THIN_FUSE_FIELDS
    assert set(runtime["spec"]) <= THIN_RUNTIME_FIELDS
    assert set(runtime["spec"].get("fuse", {})) <= THIN_FUSE_FIELDS
    assert profile["spec"]["fileSystemType"] == "fuse.cachefs"
    assert runtime["spec"]["profileName"] == profile["metadata"]["name"]
    assert (runtime["metadata"]["name"], runtime["metadata"].get("namespace")) == (
        dataset["metadata"]["name"],
        dataset["metadata"].get("namespace"),
    ), "Fluid binds a Dataset to the runtime of the same name and namespace"
    fuse = profile["spec"]["fuse"]
    assert f"{fuse['image']}:{fuse['imageTag']}" == IMAGE
    for mount in dataset["spec"]["mounts"]:
        store_options = {
            k: v for k, v in mount.get("options", {}).items() if not k.startswith("cachefs.")
        }
        parse_uri(mount["mountPoint"], store_options)
    env = {e["name"]: e["value"] for e in fuse.get("env", [])}
    check_cachefs_env(env, "ThinRuntimeProfile fuse")
    found = invocations_in_argv(fuse["command"] + fuse.get("args", []), env, "ThinRuntimeProfile")
    assert [inv.path for inv in found] == ["dataset ls", "dataset add", "mount"]
    assert found[-1].params["foreground"], "Fluid runs the mount as the container's process"
    assert found[-1].params["allow_other"], "pods run as other users (--allow-other)"


def test_fluid_fuse_container_passes_a_secret_file_it_can_use(manifests):
    profile = _one(manifests, "fluid-thinruntime.yaml", "ThinRuntimeProfile")
    fuse = profile["spec"]["fuse"]
    # Fluid's FUSE DaemonSet (charts/thin/templates/fuse/daemonset.yaml) sets no pod
    # securityContext and runs the container privileged with runAsUser 0; it adds the
    # profile's volumes that the FUSE volumeMounts name.
    pod = {"volumes": profile["spec"].get("volumes", [])}
    container = {
        "name": "thin-fuse",
        "volumeMounts": fuse.get("volumeMounts", []),
        "securityContext": {"runAsUser": 0},
    }
    env = {e["name"]: e["value"] for e in fuse.get("env", [])}
    found = invocations_in_argv(fuse["command"] + fuse.get("args", []), env, "ThinRuntimeProfile")
    talking = [inv for inv in found if takes_secret(inv)]
    assert [inv.path for inv in talking] == ["dataset ls", "dataset add", "mount"]
    for inv in talking:
        path = check_passes_secret(inv)
        assert check_secret_file(path, container, pod, [], "ThinRuntimeProfile fuse") == "secret"


def test_fluid_fuse_script_turns_fluid_config_into_cachefs_arguments(manifests, tmp_path):
    """Runs the profile's config-parsing step on a config.json shaped like Fluid's."""
    profile = _one(manifests, "fluid-thinruntime.yaml", "ThinRuntimeProfile")
    dataset = _one(manifests, "fluid-thinruntime.yaml", "Dataset")
    script = profile["spec"]["fuse"]["command"][2]
    python_source = re.search(r"<<'EOF'\n(.*?)\nEOF\n", script, re.S).group(1)
    (mount,) = dataset["spec"]["mounts"]
    secrets = {}
    options = dict(mount["options"])
    for option in mount["encryptOptions"]:  # Fluid passes each as the path of a secret file
        secrets[option["name"]] = tmp_path / option["name"]
        secrets[option["name"]].write_text(f"value-of-{option['name']}\n")
        options[option["name"]] = str(secrets[option["name"]])
    config = {
        "mounts": [{"mountPoint": mount["mountPoint"], "name": mount["name"], "options": options}],
        "targetPath": "/runtime-mnt/thin/default/demo/thin-fuse",
        "accessModes": ["ReadOnlyMany"],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    generated = subprocess.run(
        [sys.executable, "-c", python_source, str(tmp_path / "config.json")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (tmp_path / "vars.sh").write_text(generated)
    shown = subprocess.run(
        ["sh", "-c", '. "$1"; printf "%s\\n" "$TARGET" "$URI" "$DATASET" '
         '"$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" "$@"', "sh", str(tmp_path / "vars.sh")],
        capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]},
    ).stdout.splitlines()  # fmt: skip
    target, uri, name, key_id, secret, *args = shown
    assert target == config["targetPath"]
    assert uri == mount["mountPoint"]
    assert name == mount["options"]["cachefs.dataset"]
    assert (key_id, secret) == ("value-of-aws_access_key_id", "value-of-aws_secret_access_key")
    inv = parse_cachefs(["dataset", "add", name, uri, *args], "fluid script output")
    check_values(inv)
    assert not [o for o in inv.params["options"] if o.startswith(("cachefs.", "aws_"))]


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (m.group(1).upper(), m.group(2).strip())
        for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)
    ]


def test_dockerfile_base_build_deps_and_entrypoint():
    instructions = dockerfile_instructions()
    args = {}
    for name, rest in instructions:
        if name == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key, value)
        if name == "FROM":
            break
    froms = [rest for name, rest in instructions if name == "FROM"]
    images = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.split()[0]) for f in froms]
    assert set(images) == {"python:3.11-slim-bookworm"}
    runs = " ".join(rest for name, rest in instructions if name == "RUN")
    for package in ("fuse3", "libfuse3-dev", "pkg-config", "gcc"):
        assert re.search(rf"apt-get install [^&]*\b{re.escape(package)}\b", runs), package
    assert re.search(r"pip (wheel|install) [^&]*(\s\.(\s|$)|\bcachefs\b)", runs)
    assert not re.search(r"pip install [^&]*(-e|--editable)\b", runs), "no editable install"
    (entrypoint,) = [rest for name, rest in instructions if name == "ENTRYPOINT"]
    entry = json.loads(entrypoint)  # exec form, so signals reach cachefs
    assert entry[0] == "cachefs" and "cachefs" in PYPROJECT["project"]["scripts"]
    exposed = {int(p) for name, rest in instructions if name == "EXPOSE" for p in rest.split()}
    assert {19470, 19471} <= exposed
    text = DOCKERFILE.read_text()
    for word in ("WITH_HDFS", "ARROW_LIBHDFS_DIR", "CLASSPATH", "JAVA_HOME"):
        assert word in text, word


def test_dockerfile_default_image_reads_hdfs_without_a_jvm():
    """hdfs:// goes through hdfs-native, a dependency installed with cachefs (the build imports
    it); the JVM client stays behind WITH_HDFS, off by default."""
    instructions = dockerfile_instructions()
    assert "hdfs-native" in _requirement_names(PYPROJECT["project"]["dependencies"])
    runs = [rest for name, rest in instructions if name == "RUN"]
    (install,) = [r for r in runs if re.search(r"pip install [^&]*\bcachefs\b", r)]
    assert re.search(r"&& python -c ['\"]import hdfs_native['\"]", install), install
    assert "ARG WITH_HDFS=false" in [f"{name} {rest}" for name, rest in instructions]
    (jvm,) = [r for r in runs if "default-jre-headless" in r]
    assert jvm.startswith('if [ "$WITH_HDFS" = "true" ]; then'), jvm[:60]


def test_dockerfile_copies_every_package_dir_and_the_context_keeps_them():
    copies = [
        rest.split()
        for name, rest in dockerfile_instructions()
        if name == "COPY" and not rest.startswith("--from")
    ]
    sources = {src.rstrip("/") for words in copies for src in words[:-1]}
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
    for *srcs, dest in copies:  # folders keep their names: package-dir paths are relative
        if len(srcs) == 1 and (ROOT / srcs[0]).is_dir():
            assert PurePosixPath(dest) == PurePosixPath(srcs[0]), f"COPY {srcs[0]} {dest}"
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs | {"pyproject.toml", PYPROJECT["project"]["readme"]} <= sources
    ignore = DEPLOY / "Dockerfile.dockerignore"
    kept = {
        line[1:].rstrip("/") for line in ignore.read_text().splitlines() if line.startswith("!")
    }
    assert sources <= kept, f"excluded from the build context: {sources - kept}"


@pytest.mark.slow
def test_the_files_the_dockerfile_copies_build_a_complete_wheel(tmp_path):
    """A non-editable build from exactly what the Dockerfile copies (as `pip wheel .` does in
    the image) maps master/, worker/ and fuse/ into the cachefs package."""
    pytest.importorskip("setuptools")
    context = tmp_path / "context"
    context.mkdir()
    for name, rest in dockerfile_instructions():
        if name == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                if (ROOT / src).is_dir():
                    shutil.copytree(
                        ROOT / src, context / src, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy(ROOT / src, context / src)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("cachefs-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "cachefs = cachefs.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # the image's `pip wheel .` fetches these, hdfs-native (the JVM-free HDFS client) among them
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA")))
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata.decode(), re.M)
    assert "hdfs-native" in _requirement_names([r for r in requires if "extra ==" not in r])


# --- systemd -------------------------------------------------------------------------------------

UNITS = ["cachefs-master.service", "cachefs-worker.service", "cachefs-mount@.service"]
INSTANCE = "demo"


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; unlike configparser, keeps repeated keys."""
    entries, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = " ".join(shlex.split(value)) if value[:1] in "\"'" else value
    return env


def unit_env(path: Path) -> dict[str, str]:
    """The unit's environment, from the example env files shipped next to it."""
    env = {}
    for section, key, value in unit_entries(path):
        if (section, key) == ("Service", "EnvironmentFile"):
            optional = value.startswith("-")
            target = PurePosixPath(expand_specifiers(value.lstrip("-")))
            assert target.parent == PurePosixPath("/etc/cachefs") and target.suffix == ".env"
            example = SYSTEMD / target.name
            assert optional or example.is_file(), f"{path.name}: no example {example.name}"
            if example.is_file():
                env.update(read_env_file(example))
    return env


def expand_specifiers(text: str) -> str:
    return text.replace("%i", INSTANCE).replace("%I", INSTANCE).replace("%%", "%")


def exec_argv(value: str, env: dict[str, str], where: str) -> list[str]:
    """systemd's Exec*= parsing: prefixes, specifiers, then $VAR (split) and ${VAR} (one word)."""
    value = value.lstrip("-@:+!")
    words = []
    for word in shlex.split(expand_specifiers(value)):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            assert whole.group(1) in env, f"{where}: ${whole.group(1)} is not set"
            words += env[whole.group(1)].split()
            continue
        for name in re.findall(r"\$\{(\w+)\}", word):
            assert name in env, f"{where}: ${{{name}}} is not set by the env files"
        words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return words


def unit_invocations(path: Path) -> dict[str, list[Invocation]]:
    env = unit_env(path)
    check_cachefs_env(env, path.name)
    found: dict[str, list[Invocation]] = {}
    for section, key, value in unit_entries(path):
        if section == "Service" and key.startswith("Exec"):
            where = f"{path.name} {key}"
            argv = exec_argv(value, env, where)
            found.setdefault(key, []).extend(invocations_in_argv(argv, env, where))
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_parse_and_run_cachefs_in_the_foreground(unit):
    path = SYSTEMD / unit
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string(path.read_text())
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    service = parser["Service"]
    assert service["Type"] == "simple"
    assert service["ExecStart"]
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"]
    found = unit_invocations(path)
    (start,) = found["ExecStart"]
    check_values(start)
    assert start.path == unit.split("@")[0].removeprefix("cachefs-").removesuffix(".service")


def test_systemd_mount_unit_stops_with_umount_and_waits_for_the_mount():
    path = SYSTEMD / "cachefs-mount@.service"
    found = unit_invocations(path)
    (mount,) = found["ExecStart"]
    (umount,) = found["ExecStop"]
    assert mount.params["foreground"], "Type=simple needs the mount in the foreground (-f)"
    assert mount.params["source"] == INSTANCE
    assert umount.path == "umount"
    assert umount.params["mountpoint"] == mount.params["mountpoint"] == f"/mnt/cachefs/{INSTANCE}"
    posts = [v for s, k, v in unit_entries(path) if k == "ExecStartPost"]
    assert any(f"mountpoint -q {mount.params['mountpoint']}" in expand_specifiers(v) for v in posts)
    # any of these gives the service its own mount namespace, hiding the FUSE mount
    keys = {k for _, k, _ in unit_entries(path)}
    hiding = {"PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices", "ReadWritePaths"}
    assert not keys & hiding


def test_systemd_worker_unit_flags():
    (worker,) = unit_invocations(SYSTEMD / "cachefs-worker.service")["ExecStart"]
    assert worker.params["advertise"], "workers must advertise a reachable address"
    assert worker.params["shm"] == "/dev/shm"
    entries = {k: v for s, k, v in unit_entries(SYSTEMD / "cachefs-worker.service")}
    assert "PrivateDevices" not in entries, "a private /dev/shm loses the MEM tier"


def test_systemd_units_authenticate_with_the_cluster_secret():
    master_unit = SYSTEMD / "cachefs-master.service"
    (master,) = unit_invocations(master_unit)["ExecStart"]
    assert not master.params["insecure"]
    if master.params["secret_file"] is None:
        # the master makes STATE/secret on first start: the state dir is the unit's own, private
        entries = {k: v for s, k, v in unit_entries(master_unit) if s == "Service"}
        state = PurePosixPath("/var/lib") / entries["StateDirectory"]
        assert PurePosixPath(master.params["state"]) == state
        assert int(entries["StateDirectoryMode"], 8) & 0o077 == 0
    for unit in ("cachefs-worker.service", "cachefs-mount@.service"):
        found = unit_invocations(SYSTEMD / unit)
        assert takes_secret(found["ExecStart"][0]), unit
        for invocations in found.values():
            for inv in filter(takes_secret, invocations):
                assert check_passes_secret(inv) == PurePosixPath("/etc/cachefs/secret"), unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    cachefs_bin = Path(sys.executable).with_name("cachefs")
    if not cachefs_bin.exists():
        pytest.skip("no cachefs console script next to the interpreter")
    names = []
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text().replace("/opt/cachefs/bin/cachefs", str(cachefs_bin))
        name = unit.replace("@.", f"@{INSTANCE}.")
        (tmp_path / name).write_text(text)
        names.append(f"./{name}")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    if "Failed to" in result.stderr and "bus" in result.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()}")
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if any(name.lstrip("./") in line for name in names)
    ]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


# --- shared helpers, tested ----------------------------------------------------------------------


def test_shell_command_splitting():
    script = (
        'set -eu\nif ! cachefs dataset ls --master "$M" | cut -f1; then\n'
        "  cachefs dataset add d s3://b/p $OPTS\nfi\n"
        "fusermount3 -uz /x 2>/dev/null || true\n"
        "python3 - <<'EOF'\ncachefs not-a-command\nEOF\n"
        'exec cachefs mount d "/mnt/$D" -f "$@"\n'
    )
    env = {"M": "m:1", "OPTS": "-o scheme=http -o region=x", "D": "a b"}
    commands = [cachefs_argv(c) for c in shell_commands(script, env)]
    assert [c for c in commands if c is not None] == [
        ["dataset", "ls", "--master", "m:1"],
        ["dataset", "add", "d", "s3://b/p", "-o", "scheme=http", "-o", "region=x"],
        ["mount", "d", "/mnt/a b", "-f"],
    ]


def test_cachefs_env_names_follow_the_cli():
    names = cachefs_env_names()
    assert {"CACHEFS_MASTER", "CACHEFS_WORKER_MEM", "CACHEFS_MASTER_LISTEN"} <= names
    with pytest.raises(AssertionError, match="CACHEFS_WORKER_MEMORY"):
        check_cachefs_env({"CACHEFS_WORKER_MEMORY": "1G", "OTHER": "x"}, "test")


def test_a_renamed_flag_is_caught():
    with pytest.raises(AssertionError, match="no option --memory"):
        parse_cachefs(["worker", "--state", "/s", "--memory", "1G"], "test")
    with pytest.raises(pytest.fail.Exception, match="[Mm]issing"):
        parse_cachefs(["worker", "--mem", "1G"], "test")
    with pytest.raises(pytest.fail.Exception, match="no subcommand"):
        parse_cachefs(["dataset", "register", "x", "s3://b"], "test")
