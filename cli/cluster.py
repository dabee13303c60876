"""`dgemma cluster up | status | down`: team serving on Ray Serve (dgemma.cluster), added to the main
typer app by cli/main.py. Ray is imported inside the commands: the core install has none."""
from __future__ import annotations

import json
from typing import Any, Optional

import typer

from dgemma.cli.doctor import replica_counts
from dgemma.errors import DgemmaError

app = typer.Typer(help="Serve the model to a team on Ray Serve (needs: pip install \"dgemma[cluster]\").",
                  no_args_is_help=True)

AddressOpt = typer.Option(None, "--address", help="Ray cluster address, e.g. 10.0.0.5:6379 (default: the one "
                                                  "`up` used, else this machine's; `up` starts one when none runs).")


def _config() -> Any:
    from dgemma.daemon.config import load_config
    return load_config()


def _print(st: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print(json.dumps(st))
        return
    replicas = replica_counts(st["replicas"]) or "none"
    print(f"{'application':13} dgemma, {st['status'].lower()}")
    print(f"{'replicas':13} {replicas}")
    if st.get("url"):
        print(f"{'url':13} {st['url']}")
    if st.get("token_file"):
        print(f"{'token file':13} {st['token_file']}")
    if st.get("message"):
        print(f"{'message':13} {st['message']}")


@app.command("up")
def up(
    address: Optional[str] = AddressOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint every replica loads (default: config, "
                                                              "$DGEMMA_MODEL, then the bundled model)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda where the cluster "
                                                                "has GPUs, one per replica)."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", min=1,
                                           help="CPUs of a local head that `up` starts (default: all)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Deploy the model as a Ray Serve application ([cluster] in config.toml sets host, port, replicas)."""
    from dgemma.cluster import control
    from dgemma.engine.devices import model_spec

    config = _config()
    st = control.up(config, address=address, model=model_spec(model, config.model), device=device,
                    num_cpus=num_cpus)
    st["token_file"] = str(config.token_path())
    _print(st, json_out)
    if not json_out:
        print(f"\nclients: remote = \"{st['url']}\" and token_file (a copy of {config.token_path()}) in "
              "their config.toml")


@app.command("status")
def status(address: Optional[str] = AddressOpt,
           json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show the application's state and replicas."""
    from dgemma.cluster import control

    config = _config()
    control.connect(address)
    st = control.status_info(config)
    st["token_file"] = str(config.token_path())
    _print(st, json_out)
    if st["status"] != "RUNNING":
        raise typer.Exit(1)


@app.command("down")
def down(address: Optional[str] = AddressOpt) -> None:
    """Delete the application (and stop the local Ray head `up` started)."""
    from dgemma.cluster import control

    if not control.down(address):
        raise DgemmaError("unavailable", "no Ray cluster to take down (nothing runs)")
    print("dgemma: the cluster application is down")


def register(main_app: typer.Typer) -> None:
    main_app.add_typer(app, name="cluster")
