"""Safe by default (contract v3): loopback unless told, no open service by accident, no rebinding.

``flushline serve`` listens on 127.0.0.1; on any other address it refuses to start unless
an API token is set or ``FLUSHLINE_AUTH=off`` says so; with auth off, a ``Host`` outside
``FLUSHLINE_ALLOWED_HOSTS`` is refused (a DNS-rebinding page carries its own name).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from app.core.settings import Settings, SettingsError, is_loopback
from app.web.factory import init_app
from tests.support.process import (
    clean_env,
    free_port,
    json_lines,
    read_log,
    run_cli,
    server_process,
    wait_accepting,
)

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[..., Awaitable[Client]]
SERVE = (sys.executable, "-m", "app", "serve")
TOKEN = "t" * 32


class TestRefusesToStartExposed:
    async def test_any_address_without_token_exits_2_with_one_line(self) -> None:
        """FLUSHLINE_HOST=0.0.0.0 and no token: exit 2, one line naming the three variables."""
        env = clean_env(FLUSHLINE_HOST="0.0.0.0", PORT=str(free_port()))
        code, out, err = await run_cli("serve", env=env, timeout_s=30)
        assert code == 2, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        for name in ("FLUSHLINE_HOST", "FLUSHLINE_API_TOKEN", "FLUSHLINE_AUTH=off"):
            assert name in lines[0]
        assert "0.0.0.0" in lines[0]

    async def test_host_flag_is_named_when_it_chose_the_address(self) -> None:
        """`serve --host 0.0.0.0` without a token names --host, the flag that chose it."""
        env = clean_env(PORT=str(free_port()))
        code, _, err = await run_cli("serve", "--host", "0.0.0.0", env=env, timeout_s=30)
        assert code == 2
        assert "--host" in err
        assert "FLUSHLINE_API_TOKEN" in err

    async def test_auth_on_without_token_exits_2(self) -> None:
        """FLUSHLINE_AUTH=on with no FLUSHLINE_API_TOKEN: exit 2 naming the token variable."""
        env = clean_env(FLUSHLINE_AUTH="on", PORT=str(free_port()))
        code, _, err = await run_cli("serve", env=env, timeout_s=30)
        assert code == 2
        assert "FLUSHLINE_API_TOKEN" in err

    @pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
    def test_loopback_addresses_need_nothing(self, host: str) -> None:
        """Loopback addresses start without a token (the check passes)."""
        settings = Settings.from_environ({"FLUSHLINE_HOST": host})
        assert is_loopback(host)
        assert settings.exposure_error() is None

    @pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.com"])
    def test_other_addresses_need_a_token_or_auth_off(self, host: str) -> None:
        """Any other address needs FLUSHLINE_API_TOKEN or FLUSHLINE_AUTH=off."""
        exposed = Settings.from_environ({"FLUSHLINE_HOST": host}).exposure_error()
        assert isinstance(exposed, SettingsError)
        assert exposed.variable == "FLUSHLINE_HOST"
        with_token = Settings.from_environ({"FLUSHLINE_HOST": host, "FLUSHLINE_API_TOKEN": TOKEN})
        assert with_token.exposure_error() is None
        auth_off = Settings.from_environ({"FLUSHLINE_HOST": host, "FLUSHLINE_AUTH": "off"})
        assert auth_off.exposure_error() is None

    def test_auth_off_with_a_token_is_a_contradiction(self) -> None:
        """FLUSHLINE_AUTH=off beside FLUSHLINE_API_TOKEN fails, naming FLUSHLINE_AUTH."""
        with pytest.raises(SettingsError) as caught:
            Settings.from_environ({"FLUSHLINE_AUTH": "off", "FLUSHLINE_API_TOKEN": TOKEN})
        assert caught.value.variable == "FLUSHLINE_AUTH"


class TestServesWhenTold:
    async def test_auth_off_on_every_address_serves_and_refuses_foreign_hosts(
        self, tmp_path: pathlib.Path
    ) -> None:
        """FLUSHLINE_HOST=0.0.0.0 with FLUSHLINE_AUTH=off serves; `Host: evil.example` gets 403."""
        port = free_port()
        env = clean_env(
            FLUSHLINE_HOST="0.0.0.0",
            FLUSHLINE_AUTH="off",
            PORT=str(port),
            FLUSHLINE_LOG_FORMAT="json",
        )
        log = tmp_path / "server.log"
        async with server_process(SERVE, env, log) as process:
            await wait_accepting(process, port)
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{base}/api/jobs") as ok:
                    assert ok.status == 200
                async with session.get(
                    f"{base}/api/jobs", headers={"Host": "evil.example"}
                ) as refused:
                    body = await refused.json()
                    assert refused.status == 403
                    assert body["error"]["code"] == "host_not_allowed"
                    assert "FLUSHLINE_ALLOWED_HOSTS" in body["error"]["message"]
            process.terminate()
            await process.wait()
        serving = [r for r in json_lines(read_log(log)) if r["message"] == "serving"]
        assert serving[0]["host"] == "0.0.0.0"
        assert serving[0]["auth"] == "off"

    async def test_defaults_listen_on_loopback(self, tmp_path: pathlib.Path) -> None:
        """With no FLUSHLINE_HOST the service starts, on 127.0.0.1."""
        port = free_port()
        env = clean_env(PORT=str(port), FLUSHLINE_LOG_FORMAT="json")
        log = tmp_path / "server.log"
        async with server_process(SERVE, env, log) as process:
            await wait_accepting(process, port)
            process.terminate()
            await process.wait()
        serving = [r for r in json_lines(read_log(log)) if r["message"] == "serving"]
        assert (serving[0]["host"], serving[0]["port"]) == ("127.0.0.1", port)


@pytest.fixture
async def auth_off_client(aiohttp_client: AiohttpClient) -> Client:
    """The app with auth off and the default allow-list, on a real socket."""
    app = init_app(Settings.from_environ({"FLUSHLINE_LOG_LEVEL": "warning"}))
    client: Client = await aiohttp_client(app)
    return client


class TestHostAllowList:
    @pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1:9", "[::1]:8080"])
    async def test_loopback_names_are_served(self, auth_off_client: Client, host: str) -> None:
        """The default allow-list serves the loopback names, with or without a port."""
        response = await auth_off_client.get("/api/jobs", headers={"Host": host})
        assert response.status == 200

    @pytest.mark.parametrize(
        "host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example"]
    )
    async def test_other_names_are_refused_in_json(
        self,
        auth_off_client: Client,
        host: str,
    ) -> None:
        """A rebinding page's Host is refused with 403 host_not_allowed, jobs and page alike."""
        for path in ("/api/jobs", "/"):
            response = await auth_off_client.get(path, headers={"Host": host})
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "host_not_allowed"
        created = await auth_off_client.post("/api/jobs", json={}, headers={"Host": host})
        assert created.status == 403
        listed = await auth_off_client.get("/api/jobs")
        assert (await listed.json())["jobs"] == []  # the refused POST created nothing

    async def test_health_probes_answer_any_host(self, auth_off_client: Client) -> None:
        """/healthz and /readyz answer a probe addressed by IP (any Host)."""
        for path in ("/healthz", "/readyz"):
            response = await auth_off_client.get(path, headers={"Host": "10.0.0.7:8080"})
            assert response.status == 200

    async def test_configured_names_and_star(self, aiohttp_client: AiohttpClient) -> None:
        """FLUSHLINE_ALLOWED_HOSTS names the hosts served; `*` serves any."""
        named = init_app(Settings.from_environ({"FLUSHLINE_ALLOWED_HOSTS": "app.example"}))
        client: Client = await aiohttp_client(named)
        assert (await client.get("/api/jobs", headers={"Host": "app.example"})).status == 200
        assert (await client.get("/api/jobs", headers={"Host": "localhost"})).status == 403
        anyone = init_app(Settings.from_environ({"FLUSHLINE_ALLOWED_HOSTS": "*"}))
        client = await aiohttp_client(anyone)
        assert (await client.get("/api/jobs", headers={"Host": "evil.example"})).status == 200

    async def test_auth_on_serves_any_host_but_asks_for_the_token(
        self,
        aiohttp_client: AiohttpClient,
    ) -> None:
        """With an API token the bearer is the guard: any Host, but 401 without it."""
        app = init_app(Settings.from_environ({"FLUSHLINE_API_TOKEN": TOKEN}))
        client: Client = await aiohttp_client(app)
        bare = await client.get("/api/jobs", headers={"Host": "evil.example"})
        assert bare.status == 401
        authed = await client.get(
            "/api/jobs", headers={"Host": "evil.example", "Authorization": f"Bearer {TOKEN}"}
        )
        assert authed.status == 200
