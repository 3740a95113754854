"""Pushing to the Hub, against a real HTTP server on 127.0.0.1 that speaks the Hub endpoints huggingface_hub uses.

Each push runs in a subprocess so that HF_ENDPOINT, HF_TOKEN and HF_HOME are set before huggingface_hub is imported
(it reads them into module constants) and nothing leaks into the other tests. ``HF_HUB_DISABLE_XET=1`` makes
huggingface_hub take the LFS path (preupload, LFS batch, PUT, verify, NDJSON commit) that this server implements;
with hf_xet installed it would otherwise upload large files through the Xet storage protocol.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from hf_subprune.calibration import builtin_text
from hf_subprune.outputs.hub import HubError, push_folder

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_dummy_token_for_tests"
LFS_SUFFIXES = (".safetensors", ".png", ".bin")


class FakeHub:
    """What the server received: every request, created repos and branches, LFS blobs and commits."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.create_requests: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.blobs: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.lock = threading.Lock()
        self.url = ""


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries a Content-Length

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _send(self, status: int, payload: dict | None = None, content_type: str = "application/json") -> None:
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            body = self._body()
            with hub.lock:
                hub.requests.append({"method": method, "path": path, "query": query,
                                     "authorization": self.headers.get("Authorization"), "body": body})
            parts = path.strip("/").split("/")
            if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub 2.x asks once for its user agent
                return self._send(200, {"standardEnvVars": [], "harnesses": {}})
            if method == "POST" and path == "/api/validate-yaml":  # README.md metadata check
                return self._send(200, {"errors": [], "warnings": []})
            if method == "POST" and path == "/api/repos/create":
                spec = json.loads(body)
                repo_id = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
                hub.create_requests.append(spec)
                if repo_id in hub.repos:  # the Hub's 409 carries the url, which create_repo(exist_ok=True) reads
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"{hub.url}/{repo_id}"})
                hub.repos[repo_id] = spec
                return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if method == "POST" and len(parts) == 6 and parts[0] == "api" and parts[1] == "models":
                repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                if repo_id not in hub.repos:
                    return self._send(404, {"error": "Repository not found"})
                if action == "branch":
                    hub.branches.append((repo_id, revision))
                    return self._send(200, {})
                if action == "preupload":
                    files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                              "shouldIgnore": False} for f in json.loads(body)["files"]]
                    return self._send(200, {"files": files, "commitOid": "0" * 40})
                if action == "commit":
                    return self._commit(repo_id, revision, query, body)
            if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                batch = json.loads(body)
                assert batch["operation"] == "upload" and "basic" in batch["transfers"]
                objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                            "actions": {"upload": {"href": f"{hub.url}/lfs-store/{o['oid']}"},
                                        "verify": {"href": f"{hub.url}/lfs-verify"}}} for o in batch["objects"]]
                # "transfer": "basic" only; a server that wants Xet would answer "xet" here
                return self._send(200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")
            if method == "PUT" and path.startswith("/lfs-store/"):
                oid = parts[-1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._send(400, {"error": "sha256 mismatch"})
                hub.blobs[oid] = body
                return self._send(200, {})
            if method == "POST" and path == "/lfs-verify":
                obj = json.loads(body)
                ok = obj["oid"] in hub.blobs and len(hub.blobs[obj["oid"]]) == obj["size"]
                return self._send(200 if ok else 404, {} if ok else {"error": "object not found"})
            return self._send(404, {"error": f"no such endpoint: {method} {path}"})

        def _commit(self, repo_id: str, revision: str, query: dict, body: bytes) -> None:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]
            assert header["key"] == "header"
            files = {}
            for item in lines[1:]:
                value = item["value"]
                if item["key"] == "file":
                    assert value["encoding"] == "base64"
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.blobs:
                        return self._send(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                    files[value["path"]] = hub.blobs[value["oid"]]
                else:
                    return self._send(400, {"error": f"unexpected commit operation {item['key']}"})
            oid = hashlib.sha1(body).hexdigest()
            create_pr = query.get("create_pr") == ["1"]
            hub.commits.append({"repo_id": repo_id, "revision": revision, "create_pr": create_pr,
                                "summary": header["value"]["summary"], "files": files,
                                "lfs": sorted(i["value"]["path"] for i in lines[1:] if i["key"] == "lfsFile")})
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": f"{hub.url}/{repo_id}/discussions/1" if create_pr else None})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

    return Handler


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama folder (with a word-level tokenizer, so that it can also be pruned) and the extras a pruned
    folder has: card, report and a binary plot."""
    folder = tmp_path_factory.mktemp("pruned")
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=40, num_attention_heads=6, num_key_value_heads=2,
                                   head_dim=8, num_hidden_layers=2, vocab_size=128)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    words = sorted(set(builtin_text()[:20000].split()))[:126]
    core = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}, "<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- pruned\n---\n# tiny pruned\n")
    (folder / "subprune_report.json").write_text(json.dumps({"widths": {"mlp": 28}, "sparsity": 0.3}))
    (folder / "widths.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20 + b"\x00\xff" * 100)
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _env(endpoint: str, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if token is not None:
        env["HF_TOKEN"] = token
    return env


PUSH = """
import json, sys
from hf_subprune.outputs.hub import HubError, push_folder
try:
    print(push_folder(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3])))
except HubError as e:
    print(f"HubError: {e}", file=sys.stderr)
    sys.exit(3)
"""


def _push(folder: Path, repo_id: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PUSH, str(folder), repo_id, json.dumps(kwargs)], env=env,
                          capture_output=True, text=True, timeout=120)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_subprune", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_push_sends_every_file_byte_identical(fake_hub, model_dir, tmp_path):
    before = _snapshot(model_dir)
    run = _push(model_dir, "someone/tiny-pruned", _env(fake_hub.url, tmp_path), private=True, revision="pruned-30",
                commit_message="Prune 30% of the MLP neurons")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(f"{fake_hub.url}/someone/tiny-pruned/commit/")

    assert fake_hub.repos["someone/tiny-pruned"]["visibility"] == "private"
    assert fake_hub.branches == [("someone/tiny-pruned", "pruned-30")]
    (commit,) = fake_hub.commits
    assert (commit["repo_id"], commit["revision"], commit["summary"]) == \
           ("someone/tiny-pruned", "pruned-30", "Prune 30% of the MLP neurons")
    received = {path: hashlib.sha256(data).hexdigest() for path, data in commit["files"].items()}
    assert received == before
    assert "model.safetensors" in commit["lfs"] and "widths.png" in commit["lfs"]  # the LFS path was exercised
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.requests if r["path"].startswith("/api/r"))
    assert _snapshot(model_dir) == before


def test_missing_token_is_a_clear_error_and_sends_nothing(fake_hub, model_dir, tmp_path):
    run = _cli("push", str(model_dir), "someone/tiny-pruned", env=_env(fake_hub.url, tmp_path, token=None))
    assert run.returncode == 2
    assert "hf auth login" in run.stderr and "HF_TOKEN" in run.stderr, run.stderr
    assert fake_hub.requests == []


def test_unreachable_endpoint_is_a_clear_error(model_dir, tmp_path):
    with socket.socket() as s:  # a free port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = _snapshot(model_dir)
    run = _push(model_dir, "someone/tiny-pruned", _env(f"http://127.0.0.1:{port}", tmp_path))
    assert run.returncode == 3, run.stderr
    assert f"127.0.0.1:{port}" in run.stderr and "unchanged" in run.stderr and "Traceback" not in run.stderr
    assert _snapshot(model_dir) == before


@pytest.mark.parametrize("make", ["missing", "no_config", "file"])
def test_not_a_model_folder(tmp_path, make):
    target = tmp_path / "out"
    if make == "no_config":
        target.mkdir()
        (target / "README.md").write_text("# not a model\n")
    elif make == "file":
        target.write_text("{}")
    with pytest.raises(HubError, match="not a model folder"):
        push_folder(target, "someone/tiny-pruned", token=TOKEN)


def test_cli_push_to_an_existing_repo(fake_hub, model_dir, tmp_path):
    fake_hub.repos["someone/cli-pruned"] = {"visibility": "private"}
    run = _cli("push", str(model_dir), "someone/cli-pruned", "--commit-message", "from the CLI", "--create-pr",
               env=_env(fake_hub.url, tmp_path))
    assert run.returncode == 0, run.stderr
    assert f"{fake_hub.url}/someone/cli-pruned/discussions/1" in run.stdout
    assert [r["visibility"] for r in fake_hub.create_requests] == ["public"]
    assert fake_hub.repos["someone/cli-pruned"]["visibility"] == "private"  # answered 409, left as it was
    (commit,) = fake_hub.commits
    assert (commit["revision"], commit["create_pr"], commit["summary"]) == ("main", True, "from the CLI")
    assert set(commit["files"]) == set(_snapshot(model_dir))


def test_prune_push_to_hub(fake_hub, model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(builtin_text()[:20000])
    args = ("prune", str(model_dir), "--sparsity", "0.3", "--calibration", str(text), "--num-samples", "8",
            "--seq-len", "32", "--quiet", "--push-to-hub", "me/pruned", "--private", "--hub-revision", "v1",
            "--commit-message", "pruned 30%")
    early = _cli(*args, "--output", str(tmp_path / "never"), env=_env(fake_hub.url, tmp_path, token=None))
    assert early.returncode == 2 and "hf auth login" in early.stderr, early.stderr
    assert not (tmp_path / "never").exists() and fake_hub.requests == []  # failed before pruning

    out = tmp_path / "out"
    run = _cli(*args, "--output", str(out), env=_env(fake_hub.url, tmp_path))
    assert run.returncode == 0, run.stderr
    assert "saved to" in run.stdout and f"pushed to {fake_hub.url}/me/pruned/commit/" in run.stdout
    (commit,) = fake_hub.commits
    assert (commit["repo_id"], commit["revision"], commit["summary"]) == ("me/pruned", "v1", "pruned 30%")
    assert {path: hashlib.sha256(data).hexdigest() for path, data in commit["files"].items()} == _snapshot(out)
    assert [r["visibility"] for r in fake_hub.create_requests] == ["private"]


PUSH_RESULT = """
import sys
import transformers
from hf_subprune import prune
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
result = prune(model, tokenizer, [sys.argv[3]], sparsity=0.3, num_samples=4, seq_len=32, budget="uniform",
               progress=False, device="cpu")
print(result.push_to_hub(sys.argv[2], private=True, commit_message="from python"))
"""


def test_prune_result_push_to_hub(fake_hub, model_dir, tmp_path):
    """``PruneResult.push_to_hub`` uploads the folder ``save`` writes (card, report, settings, weights)."""
    run = subprocess.run([sys.executable, "-c", PUSH_RESULT, str(model_dir), "me/from-python", builtin_text()[:20000]],
                         env=_env(fake_hub.url, tmp_path), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(f"{fake_hub.url}/me/from-python/commit/")
    (commit,) = fake_hub.commits
    assert commit["summary"] == "from python"
    assert {"README.md", "config.json", "model.safetensors", "subprune_report.json", "subprune_config.json",
            "kept_widths.png"} <= set(commit["files"])
    report = json.loads(commit["files"]["subprune_report.json"])
    assert report["export"] == "stock" and report["reload_check"]["relative_max_difference"] < 1e-4
    assert fake_hub.repos["me/from-python"]["visibility"] == "private"
