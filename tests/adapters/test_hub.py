"""Hub adapter downloads against a local stand-in for the Hub's file API: nothing here touches the real Hub.

The stand-in answers what `hf_hub_download` / `get_hf_file_metadata` ask for: HEAD and GET on
`/{org}/{name}/resolve/{revision}/{file}`, with the headers huggingface_hub reads (X-Repo-Commit,
ETag, X-Linked-Etag, X-Linked-Size, Content-Length), Range requests for resumed downloads, and the
Hub's error answers (X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound / GatedRepo, 401).
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from huggingface_hub import constants

from multilora.adapters.hub import download_adapter
from multilora.adapters.ids import list_local_adapters
from multilora.errors import AdapterLoadError, AdapterNotFoundError, InvalidParameterError
from multilora.prefetch import main as prefetch_main

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _commit(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]]  # commit hash -> {filename: content}
    refs: dict[str, str]  # branch or tag -> commit hash
    token: str | None = None  # private: only this bearer token may read it
    gated: bool = False


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, path, headers)
    interrupt: set[str] = field(default_factory=set)  # files whose 1st GET is cut halfway, later GETs get 503
    hide_sizes: bool = False  # HEAD without Content-Length / X-Linked-Size, as some mirrors answer
    url: str = ""

    def gets(self, filename: str) -> list[dict[str, str]]:
        return [headers for method, path, headers in self.requests if method == "GET" and path.endswith(filename)]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, body: bool) -> None:
            hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            parts = self.path.split("/")  # ['', org, name, 'resolve', revision, file]
            if len(parts) != 6 or parts[3] != "resolve":
                return self._error(404, None, "Not Found")
            repo = hub.repos.get(f"{parts[1]}/{parts[2]}")
            revision, filename = unquote(parts[4]), unquote(parts[5])
            auth = self.headers.get("Authorization")
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if repo.token and auth != f"Bearer {repo.token}":
                if auth:
                    return self._error(401, None, "Invalid credentials in Authorization header")
                return self._error(401, "RepoNotFound", "Repository not found")  # as the Hub answers anonymous calls
            if repo.gated:
                return self._error(403, "GatedRepo", "Access to this model is restricted")
            commit = repo.refs.get(revision, revision if revision in repo.commits else None)
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            content = repo.commits[commit].get(filename)
            if content is None:
                return self._error(404, "EntryNotFound", "Entry not found", commit)
            self._send_file(content, filename, commit, body)

        def _send_file(self, content: bytes, filename: str, commit: str, body: bool) -> None:
            start = 0
            if body and filename in hub.interrupt and len(hub.gets(filename)) > 1:
                return self._error(503, None, "Service Unavailable")  # the retry finds the Hub gone
            if body and "Range" in self.headers:
                start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
            if filename.endswith(".safetensors"):  # LFS files: the Hub gives the blob's sha256 and size
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(content).hexdigest()}"')
                if not hub.hide_sizes:
                    self.send_header("X-Linked-Size", str(len(content)))
            if body or not hub.hide_sizes:
                self.send_header("Content-Length", str(len(content) - start))
            self.end_headers()
            if not body:
                return
            if filename in hub.interrupt:  # connection drops halfway through
                self.wfile.write(content[: len(content) // 2])
                self.close_connection = True
                return
            self.wfile.write(content[start:])

    return Handler


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS)}


@pytest.fixture
def hub(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The stand-in Hub, with huggingface_hub pointed at it and at caches and token files under tmp_path."""
    adapters = demo_dir / "adapters"
    sql, summarize = _files(adapters / "sql"), _files(adapters / "summarize")
    bin_only = {CONFIG: sql[CONFIG], "adapter_model.bin": b"pickle"}
    fake = FakeHub({
        "acme/sql": FakeRepo({_commit("sql-1"): sql, _commit("sql-2"): summarize},
                             {"main": _commit("sql-1"), "v1": _commit("sql-2")}),
        "acme/private": FakeRepo({_commit("p"): sql}, {"main": _commit("p")}, token="hf_secret"),
        "acme/gated": FakeRepo({_commit("g"): sql}, {"main": _commit("g")}, gated=True),
        "acme/bin-only": FakeRepo({_commit("b"): bin_only}, {"main": _commit("b")}),
    })
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"

    # huggingface_hub reads these at import, so the environment alone is too late: patch the constants too.
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # else a GET /api/agent-harnesses too
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "adapters"


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) if dest.exists() else []


def test_download_writes_exactly_the_two_files_of_the_source(hub, dest, demo_dir):
    folder = download_adapter("acme/sql", dest)
    assert folder == (dest / "acme" / "sql").resolve()
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG, WEIGHTS]  # no .cache bookkeeping left
    assert _files(folder) == _files(demo_dir / "adapters" / "sql")
    assert list_local_adapters(dest) == ["acme/sql"]
    assert _leftovers(dest) == ["acme", "acme/sql", f"acme/sql/{CONFIG}", f"acme/sql/{WEIGHTS}"]
    # Both files were fetched at the commit `main` pointed to when the config was asked for.
    gets = [path for method, path, _ in hub.requests if method == "GET"]
    assert gets == [f"/acme/sql/resolve/{_commit('sql-1')}/{name}" for name in (CONFIG, WEIGHTS)]


def test_a_present_adapter_is_returned_without_asking_the_hub(hub, dest):
    first = download_adapter("acme/sql", dest)
    hub.requests.clear()
    assert download_adapter("acme/sql", dest) == first
    assert hub.requests == []


def test_revision_goes_to_its_own_folder(hub, dest, demo_dir):
    pinned = download_adapter("acme/sql@v1", dest)
    latest = download_adapter("acme/sql", dest)
    assert pinned == (dest / "acme" / "sql@v1").resolve()
    assert _files(pinned) == _files(demo_dir / "adapters" / "summarize")
    assert _files(latest) == _files(demo_dir / "adapters" / "sql")
    assert any(path == f"/acme/sql/resolve/v1/{CONFIG}" for _, path, _ in hub.requests)


def test_unknown_repo_revision_or_file_is_not_found(hub, dest):
    with pytest.raises(AdapterNotFoundError) as repo:
        download_adapter("acme/nope", dest)
    assert str(repo.value) == "unknown adapter 'acme/nope': no repository 'acme/nope' on the Hugging Face Hub"
    with pytest.raises(AdapterNotFoundError) as revision:
        download_adapter("acme/sql@nope", dest)
    assert str(revision.value) == ("unknown adapter 'acme/sql@nope': repository 'acme/sql' has no revision 'nope' "
                                   "on the Hugging Face Hub")
    with pytest.raises(AdapterNotFoundError) as entry:
        download_adapter("acme/bin-only", dest)
    assert str(entry.value) == ("unknown adapter 'acme/bin-only': 'acme/bin-only' on the Hugging Face Hub has no "
                                f"{WEIGHTS} (only PEFT LoRA adapters saved as safetensors are served)")
    assert _leftovers(dest) == []


@pytest.mark.parametrize("adapter_id", ["sql", "acme/sql@", "acme/../etc", "acme/sql@v1/x", "/acme/sql"])
def test_malformed_ids_are_refused_before_any_request(hub, dest, adapter_id):
    with pytest.raises(InvalidParameterError, match="is not a Hugging Face Hub adapter id"):
        download_adapter(adapter_id, dest)
    assert hub.requests == []


def test_private_repo_needs_a_token(hub, dest, monkeypatch):
    with pytest.raises(AdapterLoadError) as anonymous:
        download_adapter("acme/private", dest)
    assert str(anonymous.value) == (
        "adapter 'acme/private': the Hugging Face Hub refused access to 'acme/private' (401: no token was sent; "
        "the repository is private, gated or does not exist); a token with access to it is needed (set HF_TOKEN)")
    with pytest.raises(AdapterLoadError, match=r"\(401: the token was refused\).*set HF_TOKEN"):
        download_adapter("acme/private", dest, token="hf_wrong")
    assert _leftovers(dest) == []

    monkeypatch.setenv("HF_TOKEN", "hf_secret")  # found by huggingface_hub itself, as in production
    hub.requests.clear()
    folder = download_adapter("acme/private", dest)
    assert (folder / WEIGHTS).stat().st_size > 0
    assert {headers.get("authorization") for _, _, headers in hub.requests} == {"Bearer hf_secret"}


def test_gated_repo_says_to_accept_its_terms(hub, dest):
    with pytest.raises(AdapterLoadError) as gated:
        download_adapter("acme/gated", dest)
    assert "gated repository: accept its terms on the Hub" in str(gated.value)
    assert "a token with access to it is needed (set HF_TOKEN)" in str(gated.value)


def test_max_bytes_refuses_before_fetching_the_weights(hub, dest, demo_dir):
    size = (demo_dir / "adapters" / "sql" / WEIGHTS).stat().st_size  # the cap is on the weights, as on load
    with pytest.raises(AdapterLoadError) as refused:
        download_adapter("acme/sql", dest, max_bytes=size - 1)
    assert str(refused.value) == f"adapter 'acme/sql' is {size} bytes, above max_adapter_bytes {size - 1}"
    assert hub.gets(WEIGHTS) == [] and hub.gets(CONFIG) == []
    assert [method for method, path, _ in hub.requests if path.endswith(WEIGHTS)] == ["HEAD"]
    assert _leftovers(dest) == []
    assert (download_adapter("acme/sql", dest, max_bytes=size) / WEIGHTS).stat().st_size == size


def test_max_bytes_is_checked_on_disk_when_the_hub_gives_no_size(hub, dest, demo_dir):
    hub.hide_sizes = True
    size = (demo_dir / "adapters" / "sql" / WEIGHTS).stat().st_size
    with pytest.raises(AdapterLoadError, match=f"is {size} bytes, above max_adapter_bytes 1000$"):
        download_adapter("acme/sql", dest, max_bytes=1000)
    assert len(hub.gets(WEIGHTS)) == 1  # fetched, measured, thrown away
    assert _leftovers(dest) == []


def test_offline_serves_a_prior_copy_without_network(hub, dest, monkeypatch):
    folder = download_adapter("acme/sql", dest)
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after import: still honoured
    assert download_adapter("acme/sql", dest) == folder
    assert hub.requests == []


def test_offline_without_a_copy_says_so(hub, dest, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as huggingface_hub reads it at import
    with pytest.raises(AdapterLoadError) as offline:
        download_adapter("acme/sql", dest)
    assert str(offline.value) == (f"adapter 'acme/sql' cannot be downloaded: HF_HUB_OFFLINE is set and the adapter "
                                  f"is not in {dest} (prefetch it there, or unset HF_HUB_OFFLINE)")
    assert hub.requests == []
    assert _leftovers(dest) == []


def test_interrupted_download_leaves_no_adapter_behind(hub, dest):
    hub.interrupt = {WEIGHTS}
    with pytest.raises(AdapterLoadError) as failed:
        download_adapter("acme/sql", dest)
    message = str(failed.value)
    assert message.startswith(f"adapter 'acme/sql': could not download 'acme/sql' from the Hugging Face Hub at "
                              f"{hub.url} (HfHubHTTPError: ")
    assert "503" in message
    assert len(hub.gets(WEIGHTS)) == 2  # huggingface_hub retried once after the cut
    assert _leftovers(dest) == []  # neither acme/sql nor the hidden partial folder
    assert list_local_adapters(dest) == []

    hub.interrupt = set()
    assert (download_adapter("acme/sql", dest) / WEIGHTS).is_file()  # and a retry starts clean


def test_network_error_names_the_cause(hub, dest, monkeypatch):
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{closed.server_address[1]}"
    closed.server_close()  # nothing listens there any more
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(AdapterLoadError) as failed:
        download_adapter("acme/sql", dest)
    assert str(failed.value).startswith(
        f"adapter 'acme/sql': could not download 'acme/sql' from the Hugging Face Hub at {url} (ConnectError: ")
    assert _leftovers(dest) == []


def test_prefetch_reports_each_adapter_and_fails_if_any_did(hub, dest, demo_dir, capsys):
    size = sum(len(content) for content in _files(demo_dir / "adapters" / "sql").values())
    assert prefetch_main(["--adapter-dir", str(dest), "acme/sql", "acme/nope"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith(f"downloaded  acme/sql: {size} bytes (")
    assert lines[1] == ("failed      acme/nope: unknown adapter 'acme/nope': no repository 'acme/nope' "
                        "on the Hugging Face Hub")
    assert lines[2] == f"1 of 2 adapters ready in {dest}; failed: acme/nope"
    assert "adapters: 100%" in err  # the overall bar
    assert _files(dest / "acme" / "sql") == _files(demo_dir / "adapters" / "sql")

    hub.requests.clear()
    assert prefetch_main(["--adapter-dir", str(dest), "--quiet", "acme/sql"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"present     acme/sql: {size} bytes ({size / 1024:.1f} KiB) already in adapter_dir"
    assert err == "" and hub.requests == []


def test_prefetch_passes_max_bytes(hub, dest, demo_dir, capsys):
    size = (demo_dir / "adapters" / "sql" / WEIGHTS).stat().st_size
    assert prefetch_main(["--adapter-dir", str(dest), "--quiet", "--max-bytes", "1KiB", "acme/sql"]) == 1
    out, _ = capsys.readouterr()
    assert out.splitlines()[0] == (f"failed      acme/sql: adapter 'acme/sql' is {size} bytes, "
                                   "above max_adapter_bytes 1024")
    assert hub.gets(WEIGHTS) == []
    with pytest.raises(SystemExit) as bad:
        prefetch_main(["--adapter-dir", str(dest), "--max-bytes", "lots", "acme/sql"])
    assert bad.value.code == 2
    assert "--max-bytes: parameter 'max_adapter_bytes': 'lots' is not a size like 512MiB" in capsys.readouterr().err


def test_the_engine_fetches_a_hub_adapter_on_first_use_and_serves_it(hub, dest, demo_dir):
    from multilora.config import EngineConfig
    from multilora.engine.llm_engine import LLMEngine
    from multilora.engine.sampling_params import SamplingParams
    from multilora.engine.sequence import FinishReason, GenerationRequest

    def engine(allow: bool) -> LLMEngine:
        return LLMEngine(EngineConfig(base_model=str(demo_dir / "base"), adapter_dir=str(dest),
                                      kv_cache_memory="16MiB", allow_hub_download=allow))

    request = GenerationRequest("r", "SELECT name", SamplingParams(max_tokens=6), "acme/sql")
    refused = engine(False).generate([request])["r"][-1]
    assert isinstance(refused.error, AdapterNotFoundError) and "unknown adapter 'acme/sql'" in str(refused.error)
    hub.requests.clear()
    out = engine(True).generate([request])["r"][-1]
    assert out.error is None and out.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert any(path.endswith(WEIGHTS) for _, path, _ in hub.requests)
    local = LLMEngine(EngineConfig(base_model=str(demo_dir / "base"), adapter_dir=str(demo_dir / "adapters"),
                                   kv_cache_memory="16MiB"))
    same = local.generate([GenerationRequest("r", "SELECT name", SamplingParams(max_tokens=6), "sql")])["r"][-1]
    assert out.text == same.text  # the Hub copy of 'sql' answers exactly like the local one
    bad = engine(True).generate([GenerationRequest("b", "x", SamplingParams(max_tokens=2), "acme/nope")])["b"][-1]
    assert bad.finish_reason is FinishReason.ERROR and "acme/nope" in str(bad.error)
