"""`fedrec server`, `client`, `certs`, `nodes` and `run`: Flower's Deployment Engine, wrapped.

Each command is a thin layer over a Flower tool (`flower-superlink`, `flower-supernode`,
`flwr run`, `flwr supernode`), so what it does can always be done with Flower's own commands
too (README shows both). The layer adds what fedrec needs: checked inputs with one-line errors,
the node config a fedrec ClientApp reads, and a `run` whose exit status tells the truth.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from client.supernode import check_data, supernode_command
from common.config import PYPROJECT, Config, ConfigError
from common.dataset import DataError
from common.flower_compat import parse_config_args
from server import certs
from server import flower_cli as fc
from server.superlink import superlink_command

APP_DIR = PYPROJECT.parent  # the Flower App that `fedrec run` submits
CONNECTION = "fedrec"
POLL_INTERVAL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own setting, seconds

nodes_app = typer.Typer(help="Register and list the SuperNodes allowed to join (SuperNode authentication).",
                        no_args_is_help=True)

SuperLink = Annotated[str, typer.Option(help="The SuperLink's address, HOST:PORT")]
RootCertificates = Annotated[Optional[Path], typer.Option(help="CA certificate that signed the server's (TLS)")]
Insecure = Annotated[bool, typer.Option("--insecure", help="Plain text, no TLS: local trials only")]


def register(app: typer.Typer) -> None:
    app.command("server")(server_command)
    app.command("client")(client_command)
    app.command("certs")(certs_command)
    app.command("run")(run_command)
    app.add_typer(nodes_app, name="nodes")


def server_command(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface)")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port of the SuperLink (Fleet, Control and Runtime APIs)")] = 9092,
    state_dir: Annotated[Path, typer.Option(help="SuperLink database and Flower's files")] = Path("fedrec-server"),
    certfile: Annotated[Optional[Path], typer.Option(help="Server certificate (PEM)")] = None,
    keyfile: Annotated[Optional[Path], typer.Option(help="Server private key (PEM)")] = None,
    ca_certfile: Annotated[Optional[Path], typer.Option(help="CA certificate (PEM)")] = None,
    insecure: Insecure = False,
    auth: Annotated[bool, typer.Option("--auth/--no-auth",
                                       help="Only registered SuperNodes may join (needs TLS)")] = True,
) -> None:
    """Start the coordinating server: a Flower SuperLink, TLS and node authentication by default."""
    tls = (certfile, keyfile, ca_certfile)
    if insecure:
        tls, auth = (None, None, None), False
    elif None in tls:
        raise ConfigError("TLS needs --certfile, --keyfile and --ca-certfile (`fedrec certs` makes trial ones), "
                          "or --insecure for a local trial")
    for path in filter(None, tls):
        _require_file(path)
    for path, option in ((tls[0], "--certfile"), (tls[2], "--ca-certfile")):
        if path is not None:
            certs.check_certificates(path, option)
    command = superlink_command(fc.BIN, host=host, port=port, state_dir=state_dir, certfile=tls[0],
                                keyfile=tls[1], ca_certfile=tls[2], auth=auth)
    mode = "plain text (trial only)" if insecure else "TLS" + (", registered SuperNodes only" if auth else "")
    typer.echo(f"fedrec server: SuperLink on {host}:{port}, {mode}; state in {state_dir} (pid {os.getpid()})")
    _become(command, _flower_environment(state_dir))


def client_command(
    superlink: SuperLink,
    data: Annotated[Path, typer.Option(help="This device's interactions file (it never leaves the device)")],
    data_format: Annotated[str, typer.Option(help="Its format: seq, inter, csv or a MovieLens name")] = "seq",
    state_dir: Annotated[
        Path, typer.Option(help="Privacy ledger and Flower's files (keep across reboots)"),
    ] = Path("fedrec-client"),
    root_certificates: RootCertificates = None,
    insecure: Insecure = False,
    auth_key: Annotated[Optional[Path],
                        typer.Option(help="This node's private key (registered with `fedrec nodes register`)")] = None,
    port: Annotated[
        int, typer.Option(help="Local port of the SuperNode's ClientApp API (one per node on a machine)"),
    ] = 9094,
    max_retries: Annotated[Optional[int],
                           typer.Option(help="Reconnection attempts before giving up (default: forever)")] = None,
    max_wait_time: Annotated[Optional[float],
                             typer.Option(help="Seconds of reconnecting before giving up (default: forever)")] = None,
    cold: Annotated[bool, typer.Option(
        "--cold", help="Flower's stock launcher: a fresh ClientApp process (and its imports) per message")] = False,
) -> None:
    """Start a client on an edge device: a Flower SuperNode whose ClientApp trains on --data only.

    By default the ClientApp runs warm: this process imports torch and the app once and forks a
    process per message (`client.warm`); `--cold` leaves launching to Flower."""
    ca = _trusted_ca(root_certificates, insecure)
    if auth_key is not None:
        _require_file(auth_key)
    info = check_data(data, data_format)
    command = supernode_command(fc.BIN, superlink=superlink, data=data, data_format=data_format,
                                state_dir=state_dir, port=port, root_certificates=ca,
                                auth_key=auth_key, max_retries=max_retries, max_wait_time=max_wait_time,
                                warm=not cold)
    typer.echo(f"fedrec client: {info['users']} users, {info['interactions']} interactions in {data}; "
               f"joining {superlink} (pid {os.getpid()}, {'cold' if cold else 'warm'} ClientApp)")
    env = _flower_environment(state_dir)
    if cold:
        _become(command, env)
    # The warm launcher forks: one BLAS thread (numpy's, scipy's) in it would be unsafe; torch's
    # own intra-op threads start only in the children, as they train.
    _become([sys.executable, "-m", "client.warm", f"127.0.0.1:{port}", *command], {**env, "OPENBLAS_NUM_THREADS": "1"})


def certs_command(
    out: Annotated[Path,
                   typer.Option(help="Folder for the CA, server certificate and node keys")] = Path("certificates"),
    host: Annotated[Optional[list[str]], typer.Option(help="Server name or IP clients connect to (repeatable)")] = None,
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to create", min=0)] = 1,
) -> None:
    """Create a CA, a server certificate and SuperNode key pairs for a trial deployment."""
    hosts = host or ["localhost", "127.0.0.1"]
    for path in certs.create(out, hosts, nodes):
        typer.echo(str(path))


def run_command(
    superlink: SuperLink,
    root_certificates: RootCertificates = None,
    insecure: Insecure = False,
    out: Annotated[Optional[str], typer.Option(help="Folder for the run's artefacts, on the server machine")] = None,
    data_dir: Annotated[
        Optional[str], typer.Option(help="The server's held-out evaluation data, a path on the server machine"),
    ] = None,
    dataset: Annotated[
        Optional[str], typer.Option(help="Format of --data-dir: seq, inter, csv, a MovieLens name or synthetic"),
    ] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Federated rounds")] = None,
    run_config: Annotated[
        Optional[str], typer.Option(help="Other run-config values, as `flwr run --run-config`: 'key=value ...'"),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run to finish")] = 3600,
) -> None:
    """Submit a training run to the server and follow it; exit status 1 unless it completed."""
    config = _run_config_overrides(run_config) if run_config else {}
    config.setdefault("partition", "devices")
    for key, value in (("out-dir", out), ("data-dir", data_dir), ("dataset", dataset), ("num-server-rounds", rounds)):
        if value is not None:
            config[key] = value
    for key in ("out-dir", "data-dir"):  # read by the ServerApp, whose working folder is Flower's
        if config.get(key) and not Path(str(config[key])).is_absolute():
            raise ConfigError(f"{key} {config[key]!r} must be an absolute path on the server machine")
    Config.from_run_config(config)  # fail here, with one line, rather than in the ServerApp
    home, env = _flwr_home(superlink, root_certificates, insecure)
    with home:
        status, details, run_id, log = fc.submit_run(APP_DIR, CONNECTION, env, config, time.monotonic() + timeout,
                                                     echo=True)
    if status != "finished:completed":
        typer.echo(f"error: run {run_id} ended as {status}: {fc.failure_reason(log, details)}", err=True)
        raise typer.Exit(1)
    typer.echo(f"fedrec run: run {run_id} completed")


# What Flower's parser reads from `--run-config` (flwr.common.config.parse_config_args): anything
# else in the text it skips without a word, so a stray `foo` would vanish.
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def _run_config_overrides(text: str) -> dict[str, object]:
    """`key=value ...` (or a .toml file) parsed as Flower will, refusing what Flower would drop."""
    if text.strip().endswith(".toml"):
        _require_file(Path(text.strip()).expanduser())
    else:
        stray = _PAIR.sub(" ", text).split()
        if stray:
            raise ConfigError(f"--run-config: {stray[0]!r} is not key=value: write e.g. 'local-epochs=1 dp=true'")
    try:
        return parse_config_args([text])
    except (click.ClickException, ValueError) as e:
        message = e.format_message() if isinstance(e, click.ClickException) else str(e)
        raise ConfigError(f"--run-config: {message}") from None


@nodes_app.command("register")
def nodes_register(
    public_key: Annotated[Path, typer.Argument(help="The node's public key (OpenSSH format, `node-<i>.pub`)")],
    superlink: SuperLink,
    root_certificates: RootCertificates = None,
    insecure: Insecure = False,
) -> None:
    """Allow the SuperNode holding the matching private key to join (`flwr supernode register`)."""
    _require_file(public_key)
    _flwr(["supernode", "register", str(public_key.resolve()), CONNECTION], superlink, root_certificates, insecure)


@nodes_app.command("list")
def nodes_list(superlink: SuperLink, root_certificates: RootCertificates = None, insecure: Insecure = False) -> None:
    """The registered SuperNodes and their state (`flwr supernode list`)."""
    _flwr(["supernode", "list", CONNECTION], superlink, root_certificates, insecure)


def _flwr(arguments: list[str], superlink: str, root_certificates: Path | None, insecure: bool) -> None:
    home, env = _flwr_home(superlink, root_certificates, insecure)
    with home:
        done = subprocess.run([str(fc.BIN / "flwr"), *arguments], env=env, capture_output=True, text=True)
    typer.echo(done.stdout, nl=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        typer.echo(f"error: flwr {arguments[0]} {arguments[1]} failed: {lines[-1] if lines else done.returncode}",
                   err=True)
        raise typer.Exit(1)


def _flwr_home(superlink: str, root_certificates: Path | None,
               insecure: bool) -> tuple[tempfile.TemporaryDirectory[str], dict[str, str]]:
    """A throw-away FLWR_HOME holding one connection to `superlink`."""
    ca = _trusted_ca(root_certificates, insecure)
    home = tempfile.TemporaryDirectory(prefix="fedrec-flwr-")
    fc.write_connection(Path(home.name), CONNECTION, superlink, ca)
    return home, fc.environment(Path(home.name))


def _trusted_ca(root_certificates: Path | None, insecure: bool) -> Path | None:
    """The CA a client side verifies the server with; None for plain text (--insecure)."""
    if root_certificates is None and not insecure:
        raise ConfigError("TLS needs --root-certificates (the CA that signed the server's certificate), "
                          "or --insecure for a local trial")
    if root_certificates is not None:
        _require_file(root_certificates)
        certs.check_certificates(root_certificates, "--root-certificates")
    return None if insecure else root_certificates


def _flower_environment(state_dir: Path) -> dict[str, str]:
    home = state_dir.resolve() / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = fc.environment(home)
    # Flower's SuperExec checks for work every second by default; a round waits on it twice per node.
    env.setdefault(POLL_INTERVAL, "0.1")
    return env


def _become(command: list[str], env: dict[str, str]) -> None:
    """Replace this process by the Flower server or SuperNode (same PID: stopping it stops that)."""
    os.execve(command[0], command, env)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path} not found")
