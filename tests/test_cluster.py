"""Team serving on Ray Serve (issue 26), on this machine: a real local Ray cluster started by
`dgemma cluster up`, two CPU replicas of the bundled model behind Serve's HTTP proxy on 127.0.0.1,
reached through the daemon's remote client, a local daemon in remote mode, `dgemma fill` and the
language server. Every wait is bounded."""
from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from lsprotocol import types as t

from dgemma.daemon.client import Client
from dgemma.daemon.config import parse_config
from dgemma.daemon.remote import Remote, check_url
from dgemma.daemon.scheduler import CancelFlag
from dgemma.errors import DgemmaError

from test_daemon_util import BUSY, FAST_CONFIG, dgemma, in_threads, isolated_env, short_tmp
from test_lsp_e2e import inline_params, open_doc, running_client

pytest.importorskip("ray.serve", reason='team serving needs the cluster extra: pip install -e ".[cluster]"')

FILL = {"prefix": "def add(a, b):\n    return ", "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 8}
BUSY_FILL = {**FILL, "max_tokens": 256, "settings": BUSY}  # runs until it is stopped


def _running(send: Callable[[Callable[[Any], None]], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `send(on_draft)`, a request that runs until it is stopped, on a thread; return once it
    has drafted. `outcome["value"]` is then its result or its DgemmaError."""
    drafted = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = send(lambda d: drafted.set())
        except DgemmaError as exc:
            outcome["value"] = exc
    worker = threading.Thread(target=run)
    worker.start()
    assert drafted.wait(60), "the request never drafted"
    return worker, outcome


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Team:
    def __init__(self, root: Path, env: dict[str, str], url: str) -> None:
        self.root, self.env, self.url = root, env, url
        self.token_file = root / "cfg" / "cluster.token"

    def remote(self, token_file: Path | None = None) -> Remote:
        return Remote(self.url, token_file or self.token_file, read_timeout_s=60)

    def replica_of(self, document: str) -> str:
        return self.remote().status(document)["replica"]

    def documents_on_two_replicas(self) -> tuple[str, str]:
        """Two documents the router sends to different replicas (consistent hashing puts any two
        on the same one half the time)."""
        first = "file:///team/doc0.py"
        home = self.replica_of(first)
        for i in range(1, 64):
            other = f"file:///team/doc{i}.py"
            if self.replica_of(other) != home:
                return first, other
        raise AssertionError("64 documents all went to one replica")


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    root = short_tmp("dgc-")
    env = isolated_env(root)
    port = _free_port()
    (root / "cfg" / "config.toml").write_text(FAST_CONFIG + f"\n[cluster]\nreplicas = 2\nport = {port}\n")
    r = dgemma(["cluster", "up", "--num-cpus", "4", "--json"], env, timeout=600, cwd=str(root))
    try:
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["status"] == "RUNNING" and st["replicas"] == {"RUNNING": 2}, st
        assert (root / "cfg" / "cluster.token").stat().st_mode & 0o777 == 0o600
        yield Team(root, env, st["url"])
    finally:
        dgemma(["cluster", "down"], env, timeout=120, cwd=str(root))
        shutil.rmtree(root, ignore_errors=True)


def test_config_checks_remote_and_cluster_tables():
    cfg = parse_config('remote = "http://gpu-box:8000"\ntoken_file = "~/t"\n[cluster]\nreplicas = 2\n')
    assert cfg.remote == "http://gpu-box:8000" and cfg.cluster.replicas == 2 and not cfg.token_file.startswith("~")
    for bad, why in [('remote = "gpu-box:8000"', "http://"), ('[cluster]\nmin_replicas = 1', "both"),
                     ('[cluster]\nreplicas = 2\nmin_replicas = 1\nmax_replicas = 3', "pick one"),
                     ('[cluster]\nport = 70000', "port"), ('[cluster]\nreplica = 2', "unknown")]:
        with pytest.raises(DgemmaError, match=why):
            parse_config(bad)
    with pytest.raises(DgemmaError, match="not a URL"):
        check_url("http://host:port")


def test_a_ray_cluster_that_is_gone_is_one_line_and_forgotten():
    root = short_tmp("dgs-")
    env = isolated_env(root)
    run = root / "run"
    run.mkdir(mode=0o700)
    (run / "cluster.json").write_text(json.dumps({"address": f"127.0.0.1:{_free_port()}", "started_here": True}))
    try:
        r = dgemma(["cluster", "status"], env, timeout=60, cwd=str(root))
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "no Ray cluster here; run `dgemma cluster up`" in r.stderr
        assert not (run / "cluster.json").exists()  # so the next `up` starts a head of its own
        r = dgemma(["cluster", "status", "--address", f"127.0.0.1:{_free_port()}"], env, timeout=60, cwd=str(root))
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot reach the Ray cluster" in r.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_replicas_follow_the_gpus_and_the_config():
    from dgemma.cluster.app import ROUTER, build

    def deployment(toml: str, gpus: int) -> Any:
        return build(parse_config(toml), "digest", gpus=gpus)._bound_deployment  # what serve.run deploys

    on_gpus = deployment("", gpus=4)
    assert on_gpus.num_replicas == 4 and on_gpus.ray_actor_options["num_gpus"] == 1
    assert on_gpus.init_args[2] == "cuda"  # the device each replica loads on
    on_cpus = deployment("[cluster]\nreplica_cpus = 2\n", gpus=0)
    assert on_cpus.num_replicas == 1 and on_cpus.ray_actor_options == {"num_cpus": 2, "num_gpus": 0}
    assert on_cpus.init_args[2] == "cpu"
    scaled = deployment("[cluster]\nmin_replicas = 1\nmax_replicas = 3\n", gpus=2)._deployment_config
    assert (scaled.autoscaling_config.min_replicas, scaled.autoscaling_config.max_replicas) == (1, 3)
    assert scaled.request_router_config.request_router_class == ROUTER


def test_documents_stay_on_their_replica_and_spread_over_both(team: Team):
    a, b = team.documents_on_two_replicas()
    remote = team.remote()
    for doc in (a, b):  # each replica's prefix cache holds its document's prompt
        remote.forward("fill", FILL, document=doc)
    results: list[tuple[str, dict[str, Any] | Exception]] = []

    def one(i: int) -> None:
        doc = (a, b)[i % 2]
        try:
            results.append((doc, team.remote().forward("fill", {**FILL, "seed": i}, document=doc)))
        except Exception as exc:  # reported below
            results.append((doc, exc))
    in_threads(one, 8, timeout=120)
    assert len(results) == 8 and all(isinstance(r, dict) for _, r in results), results
    replicas = {doc: {r["replica"] for d, r in results if d == doc} for doc in (a, b)}  # type: ignore[index]
    assert all(len(s) == 1 for s in replicas.values()), replicas
    assert replicas[a] != replicas[b]
    assert all(r["cached_tokens"] > 0 for _, r in results), [r["cached_tokens"] for _, r in results]  # type: ignore[index]


def test_cluster_status_shows_the_application_and_its_replicas(team: Team):
    r = dgemma(["cluster", "status", "--json"], team.env, cwd=str(team.root))
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert (st["status"], st["replicas"], st["url"]) == ("RUNNING", {"RUNNING": 2}, team.url)
    r = dgemma(["cluster", "status"], team.env, cwd=str(team.root))
    assert "replicas      2 running" in r.stdout and str(team.token_file) in r.stdout


def _post(url: str, headers: dict[str, str]) -> int:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v1/fill", body=json.dumps(FILL), headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_a_missing_or_wrong_token_is_refused_before_any_work(team: Team, tmp_path: Path):
    a, b = team.documents_on_two_replicas()
    served = {doc: team.remote().status(doc)["served"] for doc in (a, b)}
    assert _post(team.url, {}) == 401
    assert _post(team.url, {"Authorization": "Bearer not-the-token"}) == 401
    assert _post(team.url, {"Authorization": "Basic " + team.token_file.read_text().strip()}) == 401
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")
    with pytest.raises(DgemmaError, match="refused the token"):
        team.remote(wrong).forward("fill", FILL, document=a)
    assert {doc: team.remote().status(doc)["served"] for doc in (a, b)} == served


def test_a_client_that_goes_away_cancels_its_request_on_the_replica(team: Team):
    doc = "file:///team/cancelled.py"
    before = team.remote().status(doc)["cancelled"]
    flag = CancelFlag()
    with pytest.raises(DgemmaError) as err:
        team.remote().forward("fill", BUSY_FILL, document=doc, on_draft=lambda d: flag.set(), cancel=flag)
    assert err.value.code == "cancelled"
    for _ in range(100):  # the replica notices at its next step
        st = team.remote().status(doc)
        if st["cancelled"] > before and st["waiting"] == 0:
            break
        time.sleep(0.1)
    assert st["cancelled"] == before + 1 and st["waiting"] == 0, st


def test_the_local_daemon_in_remote_mode_serves_the_cli_and_the_language_server(team: Team):
    root = short_tmp("dgr-")
    env = isolated_env(root)
    (root / "cfg" / "config.toml").write_text(f'remote = "{team.url}"\ntoken_file = "{team.token_file}"\n')
    src = root / "add.py"
    src.write_text("def add(a, b):\n    return \n\n\nprint(add(1, 2))\n")
    try:
        r = dgemma(["fill", f"{src}:2:11", "--json", "--max-tokens", "8"], env, cwd=str(root))
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["model"] == "dgemma-bundled" and isinstance(out["middle"], str)
        before = src.read_bytes()
        r = dgemma(["edit", f"{src}:2-2", "-m", "return the sum", "--yes", "--max-tokens", "16"], env, cwd=str(root))
        assert r.returncode == 0 or "returned nothing" in r.stderr, r.stderr  # nothing: the file is unchanged
        lines, old = src.read_bytes().split(b"\n"), before.split(b"\n")
        assert lines[0] == old[0] and lines[-4:] == old[-4:]  # only the selected line may change
        r = dgemma(["status"], env, cwd=str(root))
        assert r.returncode == 0 and f"remote        {team.url}: model dgemma-bundled" in r.stdout, r.stdout
        assert "replicas 2 running" in r.stdout
        r = dgemma(["doctor"], env, cwd=str(root))
        assert f"ok    remote: {team.url}: model dgemma-bundled on cpu, replicas 2 running" in r.stdout, r.stdout

        async def through_the_editor() -> Any:
            async with running_client(env, {"seed": 0, "maxTokensInvoked": 8}) as client:
                open_doc(client, src.read_text(), src.as_uri())
                return await client.text_document_inline_completion_async(inline_params(1, 11, uri=src.as_uri()))
        served = team.remote().status(src.as_uri())["served"]
        res = asyncio.run(through_the_editor())
        assert res is None or isinstance(res.items[0].insert_text, str)
        assert team.remote().status(src.as_uri())["served"] == served + 1  # the editor's fill ran there
        _a_superseded_request_stops_on_its_replica(team, root / "run" / "daemon.sock")
    finally:
        dgemma(["stop"], env, cwd=str(root))
        shutil.rmtree(root, ignore_errors=True)


def _a_superseded_request_stops_on_its_replica(team: Team, sock: Path) -> None:
    """A newer request for the same document supersedes a running one in the local daemon, and the
    replica running it stops too (the daemon closes its HTTP connection)."""
    doc = "file:///team/superseded.py"
    before = team.remote().status(doc)["cancelled"]

    def busy(on_draft: Callable[[Any], None]) -> Any:
        with Client.connect(sock, timeout=30) as c:
            return c.request("fill", {**BUSY_FILL, "document": doc}, on_draft=on_draft)
    worker, outcome = _running(busy)
    with Client.connect(sock, timeout=30) as c:
        assert "completions" in c.request("fill", {**FILL, "document": doc})
    worker.join(60)
    assert isinstance(outcome["value"], DgemmaError) and outcome["value"].code == "superseded", outcome
    for _ in range(100):
        st = team.remote().status(doc)
        if st["cancelled"] > before:
            break
        time.sleep(0.1)
    assert st["cancelled"] == before + 1, st


async def _editor_says_once(env: dict[str, str], src: Path, says: str) -> None:
    """Keystrokes and an explicit request against a failing remote: one error message in the editor."""
    async with running_client(env) as client:
        open_doc(client, src.read_text(), src.as_uri())
        for kind in (t.InlineCompletionTriggerKind.Invoked, t.InlineCompletionTriggerKind.Automatic,
                     t.InlineCompletionTriggerKind.Invoked):
            params = inline_params(0, 4, kind, uri=src.as_uri())
            assert await client.text_document_inline_completion_async(params) is None
        errors = [m.message for m in client.messages if m.type == t.MessageType.Error]
        assert len(errors) == 1 and says in errors[0], client.messages


def test_a_remote_that_is_down_or_refuses_is_one_line_never_a_hang(team: Team):
    root = short_tmp("dgr-")
    env = isolated_env(root)
    src = root / "x.py"
    src.write_text("x = \n")
    cfg = root / "cfg" / "config.toml"
    wrong = root / "wrong.token"
    wrong.write_text("nope\n")
    try:
        for remote, token, says in [(f"http://127.0.0.1:{_free_port()}", team.token_file, "does not answer"),
                                    (team.url, wrong, "refused the token")]:
            dgemma(["stop"], env, cwd=str(root))
            cfg.write_text(f'remote = "{remote}"\ntoken_file = "{token}"\n')
            t0 = time.monotonic()
            r = dgemma(["fill", f"{src}:1:4"], env, timeout=60, cwd=str(root))
            assert r.returncode == 1 and r.stdout == "", r
            assert r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
            assert time.monotonic() - t0 < 60
            asyncio.run(_editor_says_once(env, src, says))
    finally:
        dgemma(["stop"], env, cwd=str(root))
        shutil.rmtree(root, ignore_errors=True)


def test_a_replica_killed_mid_request_fails_that_request_and_the_others_are_served(team: Team):
    import ray

    a, b = team.documents_on_two_replicas()
    victim = team.replica_of(a)
    worker, outcome = _running(lambda on_draft: team.remote().forward("fill", BUSY_FILL, document=a,
                                                                      on_draft=on_draft))
    ray.init(address="auto", namespace="dgemma-test", log_to_driver=False, logging_level="ERROR")
    try:
        name = next(a_["name"] for a_ in ray.util.list_named_actors(all_namespaces=True)
                    if a_["name"].startswith("SERVE_REPLICA::") and a_["name"].endswith(victim))
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    finally:
        ray.shutdown()
    worker.join(60)
    assert not worker.is_alive()
    assert isinstance(outcome["value"], DgemmaError) and outcome["value"].code == "remote_unavailable", outcome
    # The other replica goes on serving at once; the killed one's documents move to a healthy replica
    # once Serve has noticed the death (a request routed before that fails the same way).
    assert team.remote().forward("fill", FILL, document=b)["replica"] != victim
    for _ in range(60):
        try:
            assert team.remote().forward("fill", FILL, document=a)["replica"] != victim
            break
        except DgemmaError as exc:
            assert exc.code == "remote_unavailable"
            time.sleep(0.5)
    else:
        raise AssertionError("the killed replica's document was not served elsewhere within 30 s")
