"""`glmcpu pull` / `list` / names, against a fake Hugging Face Hub on 127.0.0.1: just the endpoints
huggingface_hub calls (HEAD/GET .../resolve/..., the tree listing), with Range, a dropped connection
and corrupted bytes on demand. Nothing here leaves this machine."""
import hashlib
import json
import os
import socket
import threading
from types import SimpleNamespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest

import glmcpu
from conftest import relabel, run_cli
from glmcpu import cli, hub
from glmcpu.errors import (HubError, ModelNotFound,
                           NotEnoughDiskSpace)

COMMIT = "c0ffee" * 6 + "c0ff"          # 40 hex digits, as the hub's X-Repo-Commit
DEMO = open(hub.demo_path(), "rb").read()


class FakeHub:
    """repos: {"owner/name": {path: bytes}}. cut_after=N: the next GET of a file stops after N bytes of
    its body and the hub then answers 503 until `up()`; stay_up=True keeps it answering instead.
    corrupt=True: GETs send the right length of wrong bytes."""

    def __init__(self, repos):
        self.repos = repos
        self.requests = []            # (method, path, Range header)
        self.cut_after, self.stay_up, self.down, self.corrupt = None, False, False, False
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub_.answer(self, body=False)

            def do_GET(self):
                hub_.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def up(self):
        self.down, self.cut_after = False, None

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def ranges(self):
        """The open-ended Range requests: downloads and their resumptions."""
        return [r for m, _, r in self.requests if m == "GET" and r and r.endswith("-")]

    def peeks(self):
        """The closed ones (bytes=0-N): headers read before a download."""
        return [r for m, _, r in self.requests if m == "GET" and r and not r.endswith("-")]

    def answer(self, h, body):
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        if self.down:
            return self.send(h, 503, b"hub down", body)
        if path.startswith("/api/models/") and "/tree/" in path:
            repo = path[len("/api/models/"):].split("/tree/")[0]
            if repo not in self.repos:
                return self.send(h, 404, b"{}", body, {"X-Error-Code": "RepoNotFound"})
            tree = [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                     "lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                    for p, d in self.repos[repo].items()]
            return self.send(h, 200, json.dumps(tree).encode(), body, {"Content-Type": "application/json"})
        owner, name, kind, rev, *rest = path.strip("/").split("/") + [""] * 4
        repo, filename = f"{owner}/{name}", "/".join(rest).strip("/")
        if kind != "resolve" or repo not in self.repos:
            return self.send(h, 404, b"", body, {"X-Error-Code": "RepoNotFound"})
        if filename not in self.repos[repo]:
            return self.send(h, 404, b"", body, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        data = self.repos[repo][filename]
        sha = hashlib.sha256(data).hexdigest()
        if self.corrupt:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes"}
        start, end, status = 0, len(data) - 1, 200
        ask = h.headers.get("Range")
        if ask:
            a, b = ask.split("=")[1].split("-")
            start, end, status = int(a), min(int(b), len(data) - 1) if b else len(data) - 1, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if body and self.cut_after is not None and not (ask and not ask.endswith("-")):   # a download, not a peek
            self.down = not self.stay_up
            cut, self.cut_after = self.cut_after, None
            return self.send(h, status, data[start:end + 1], body, headers, cut=cut)
        self.send(h, status, data[start:end + 1], body, headers)

    @staticmethod
    def send(h, status, data, body, headers=(), cut=None):
        h.send_response(status)
        for k, v in dict(headers).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if not body:
            return
        h.wfile.write(data[:cut])
        if cut is not None:               # the connection drops mid-body
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    split = {f"x-Q4_K_M-0000{i}-of-00002.gguf": DEMO[(i - 1) * 1000:i * 1000] for i in (1, 2)}
    fh = FakeHub({"glmtest/Demo-GGUF": {"demo-Q8_0.gguf": DEMO, "README.md": b"# demo\n"},
                  "glmtest/Split-GGUF": {"x-Q8_0.gguf": DEMO[:500], **split}})
    # for the in-process tests: what huggingface_hub derived from HF_ENDPOINT when it was imported
    monkeypatch.setattr(constants, "ENDPOINT", fh.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fh.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("GLMCPU_MODELS", str(tmp_path / "models"))
    yield fh
    fh.close()


def pull_cli(fake_hub, tmp_path, *args):
    """The CLI in a child process: huggingface_hub reads HF_ENDPOINT when it is imported."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("HF_")}
    env.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1",
               GLMCPU_MODELS=str(tmp_path / "models"))
    return run_cli(*args, env=env, timeout=120)


def one_line_error(p, *words):
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("glmcpu: error: ") and all(w in last for w in words), p.stderr
    return last


def test_interrupted_pull_resumes_then_runs(fake_hub, tmp_path, capsys):
    dest = tmp_path / "models" / "glmtest" / "Demo-GGUF" / "demo-Q8_0.gguf"
    fake_hub.cut_after = 3_000_000
    p = pull_cli(fake_hub, tmp_path, "pull", "glmtest/Demo-GGUF:demo-Q8_0.gguf")
    one_line_error(p, "stopped at", "again to resume")
    [part] = dest.parent.glob("*.part")
    kept = part.stat().st_size                 # whole 1 MiB chunks received before the cut
    assert not dest.exists() and 0 < kept <= 3_000_000 and part.read_bytes() == DEMO[:kept]
    assert cli.main(["list"]) == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if "glmtest/Demo-GGUF/demo-Q8_0 " in line]
    assert "partial" in row

    fake_hub.up()
    fake_hub.requests.clear()
    p = pull_cli(fake_hub, tmp_path, "pull", "glmtest/Demo-GGUF:demo-Q8_0.gguf")
    assert p.returncode == 0, p.stderr
    assert fake_hub.ranges() == [f"bytes={kept}-"]              # only the rest was fetched
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == hashlib.sha256(DEMO).hexdigest()
    assert not list(dest.parent.glob("*.part")) and p.stdout.strip() == str(dest)

    p = pull_cli(fake_hub, tmp_path, "run", "glmtest/Demo-GGUF:demo-Q8_0.gguf", "-p", "hi", "-n", "4")
    assert p.returncode == 0 and "generation:" in p.stderr, p.stderr
    p = pull_cli(fake_hub, tmp_path, "info", "demo-Q8_0")                  # the file's name alone
    assert p.returncode == 0 and str(dest) in p.stdout, p.stderr
    p = pull_cli(fake_hub, tmp_path, "list")
    assert p.returncode == 0 and "glmtest/Demo-GGUF/demo-Q8_0" in p.stdout and "glm-4.5-air" in p.stdout


def test_dropped_connection_is_resumed_within_one_pull(fake_hub):
    fake_hub.cut_after, fake_hub.stay_up = 2_500_000, True     # huggingface_hub retries with a Range
    [path] = hub.pull("glmtest/Demo-GGUF:demo-Q8_0.gguf", progress=False, log=lambda m: None)
    [asked] = fake_hub.ranges()
    assert asked.startswith("bytes=") and 0 < int(asked[6:-1]) <= 2_500_000
    assert open(path, "rb").read() == DEMO


def test_corrupt_download_fails_the_checksum(fake_hub, capsys):
    fake_hub.corrupt = True
    assert cli.main(["pull", "-q", "glmtest/Demo-GGUF:demo-Q8_0.gguf"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("glmcpu: error: ") and "sha256" in err and "deleted" in err
    folder = os.path.join(hub.models_dir(), "glmtest", "Demo-GGUF")
    assert os.listdir(folder) == []                            # neither the file nor a part is left


def test_repo_without_file_takes_q4_k_m_and_all_its_parts(fake_hub):
    paths = hub.pull("glmtest/Split-GGUF", progress=False, log=lambda m: None)
    assert [os.path.basename(p) for p in paths] == ["x-Q4_K_M-00001-of-00002.gguf", "x-Q4_K_M-00002-of-00002.gguf"]
    assert open(paths[1], "rb").read() == DEMO[1000:2000]
    assert hub.resolve("glmtest/Split-GGUF:x-Q4_K_M-00001-of-00002.gguf") == paths[0]
    # naming the first part of a split file fetches every part; a second pull finds them there
    seen = []
    hub.pull("glmtest/Split-GGUF:x-Q4_K_M-00001-of-00002.gguf", progress=False, log=seen.append)
    assert sum("already downloaded" in m for m in seen) == 2


def test_choosing_a_file():
    assert hub.choose_file("o/r", ["README.md", "only.gguf"]) == ("only.gguf",)
    assert hub.choose_file("o/r", ["m-Q8_0.gguf", "m-Q4_0.gguf"]) == ("m-Q4_0.gguf",)
    with pytest.raises(ModelNotFound, match="name one: `glmcpu pull o/r:FILE`.*m-IQ2_XS.gguf"):
        hub.choose_file("o/r", ["m-IQ2_XS.gguf", "m-F16.gguf"])
    with pytest.raises(HubError, match="no .gguf"):
        hub.choose_file("o/r", ["config.json", "model.safetensors"])


def test_hub_errors_are_one_line(fake_hub, monkeypatch):
    quiet = dict(progress=False, log=lambda m: None)
    with pytest.raises(HubError, match="no such repository"):
        hub.pull("glmtest/Nope-GGUF:x.gguf", **quiet)
    with pytest.raises(HubError, match="has no file 'nope.gguf'"):
        hub.pull("glmtest/Demo-GGUF:nope.gguf", **quiet)
    with pytest.raises(ModelNotFound, match="unknown model 'no-such-model'"):
        hub.pull("no-such-model", **quiet)
    with socket.socket() as s:                                 # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(HubError, match="cannot reach"):
        hub.pull("glmtest/Demo-GGUF:demo-Q8_0.gguf", **quiet)


def test_disk_space_is_checked_first(fake_hub, monkeypatch):
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=0, free=1000))
    with pytest.raises(NotEnoughDiskSpace, match="GLMCPU_MODELS"):
        hub.pull("glmtest/Demo-GGUF:demo-Q8_0.gguf", progress=False, log=lambda m: None)
    assert fake_hub.ranges() == [] and not [m for m, _, _ in fake_hub.requests if m == "GET"]


def test_names(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMCPU_MODELS", str(tmp_path))
    assert hub.resolve(hub.demo_path()) == hub.demo_path()
    assert hub.resolve("demo") == hub.demo_path()
    with pytest.raises(ModelNotFound, match=r"run `glmcpu pull glm-4-9b-0414:q4_k_m` first"):
        hub.resolve("glm-4-9b-0414")                           # a family means its first entry
    with pytest.raises(ModelNotFound, match="not a file, not one of the 0 models"):
        hub.resolve("nothing-like-this")
    with pytest.raises(ModelNotFound, match="no such file"):
        hub.resolve(str(tmp_path / "missing.gguf"))
    entry = hub.find_entry("glm-4-9b-0414:q8_0")
    for path in entry.paths():
        os.makedirs(os.path.dirname(path))
        open(path, "wb").write(DEMO)
    assert hub.resolve("glm-4-9b-0414:q8_0") == entry.paths()[0]
    assert hub.resolve("THUDM_GLM-4-9B-0414-Q8_0") == entry.paths()[0]
    assert hub.resolve(entry.repo) == entry.paths()[0]         # OWNER/REPO with one model in it


def test_models_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("GLMCPU_MODELS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hub.models_dir() == os.path.join(str(tmp_path), "glmcpu", "models")
    monkeypatch.setenv("GLMCPU_MODELS", str(tmp_path / "m"))
    assert hub.models_dir() == str(tmp_path / "m")


def test_catalogue_is_consistent():
    names = [e.name for e in hub.CATALOGUE]
    assert len(set(names)) == len(names)
    for e in hub.CATALOGUE:
        assert e.files == hub.expand_parts(e.files[0]) and e.size < e.ram
        assert e.repo.count("/") == 1 and all(f.endswith(".gguf") for f in e.files)
    families = {e.family for e in hub.CATALOGUE}
    assert {"glm-4-9b-chat", "glm-4-9b-0414", "glm-4-32b-0414", "glm-4.5-air", "intellect-3"} <= families


@pytest.mark.parametrize("code,named", [(39, "MXFP4, which glmcpu cannot run"),
                                        (31, "Q4_0_4_4 (ggml type 31: an ARM repack llama.cpp wrote"),
                                        (200, "ggml type 200, which no mainline llama.cpp")])
def test_pull_refuses_a_file_it_cannot_run_before_downloading(fake_hub, tmp_path, code, named):
    """The header is read first (a Range request): a tensor type glmcpu cannot run stops the pull in
    one line naming the type and where it comes from; nothing of the file's body is fetched."""
    from gguf import GGUFReader
    first = GGUFReader(hub.demo_path()).tensors[0].name
    fake_hub.repos["glmtest/Odd-GGUF"] = {"odd.gguf": relabel(DEMO, first, code)}
    p = pull_cli(fake_hub, tmp_path, "pull", "glmtest/Odd-GGUF:odd.gguf")
    one_line_error(p, first, named, "nothing was downloaded")
    assert fake_hub.peeks() and not fake_hub.ranges()
    assert not [m for m, path, r in fake_hub.requests if m == "GET" and "odd.gguf" in path and not r]
    assert not (tmp_path / "models" / "glmtest" / "Odd-GGUF").exists() or \
        not list((tmp_path / "models" / "glmtest" / "Odd-GGUF").iterdir())


def test_pull_says_what_a_file_holds_before_downloading(fake_hub):
    seen = []
    hub.pull("glmtest/Demo-GGUF:demo-Q8_0.gguf", progress=False, log=seen.append)
    line = next(m for m in seen if m.startswith("glmtest/Demo-GGUF/demo-Q8_0.gguf: "))
    assert "runs here" in line and "Q8_0 x" in line and "of weights" in line
    assert seen.index(line) < next(i for i, m in enumerate(seen) if m.startswith("pulling"))
    assert fake_hub.peeks() == ["bytes=0-4194303"]
    # an architecture glmcpu does not know is refused the same way
    at = DEMO.index(b"general.architecture") + len("general.architecture") + 4      # past the value's type
    n = int.from_bytes(DEMO[at:at + 8], "little")
    odd = DEMO[:at + 8] + b"x" * n + DEMO[at + 8 + n:]                              # same length, no model
    fake_hub.repos["glmtest/Odd-GGUF"] = {"o.gguf": odd}
    with pytest.raises(glmcpu.UnsupportedArchitecture, match="x" * n):
        hub.pull("glmtest/Odd-GGUF:o.gguf", progress=False, log=lambda m: None)
    assert [r for m, path, r in fake_hub.requests if m == "GET" and path.endswith("/o.gguf")] == ["bytes=0-4194303"]


# --- `glmcpu info` of a remote file: its header only ----------------------------------------------

FILE_ROWS = ("architecture", "layers", "hidden / ffn", "heads q / kv / dim", "vocabulary", "context",
             "tensor types", "memory", "draft head")


def info(capsys, *args):
    """(exit status, {row: value} of `glmcpu info`'s table, stderr)."""
    rc = cli.main(["info", *args])
    out, err = capsys.readouterr()
    return rc, dict(line.strip().split("  ", 1) for line in out.splitlines() if line.strip()), err


def error_line(capsys, *args):
    rc, rows, err = info(capsys, *args)
    assert rc == 1 and not rows and len(err.strip().splitlines()) == 1, err
    assert err.startswith("glmcpu: error: ") and "Traceback" not in err
    return err.strip()


def test_info_of_a_remote_file_reads_its_header_only(fake_hub, capsys):
    """A name not downloaded, or a hub URL: local info's rows of the file (types with their share of
    bytes, the RAM it needs) from one Range request of its header; nothing lands in the models folder."""
    _, local, _ = info(capsys, hub.demo_path())
    for name in ("glmtest/Demo-GGUF:demo-Q8_0.gguf",
                 "https://huggingface.co/glmtest/Demo-GGUF/resolve/main/demo-Q8_0.gguf",
                 "hf.co/glmtest/Demo-GGUF/blob/main/demo-Q8_0.gguf?download=true"):
        fake_hub.requests.clear()
        rc, rows, err = info(capsys, name)
        assert rc == 0, err
        assert rows["file"] == "glmtest/Demo-GGUF/demo-Q8_0.gguf" and rows["file size"] == hub.human(len(DEMO))
        assert rows["glmcpu runs it"].startswith("yes") and "split" not in rows
        assert {k: rows[k] for k in FILE_ROWS} == {k: local[k] for k in FILE_ROWS}
        assert "Q8_0 x26 (5.0 MiB, 100%)" in rows["tensor types"] and "KV cache at ctx" in rows["memory"]
        assert fake_hub.peeks() == ["bytes=0-4194303"] and not fake_hub.ranges()
        assert not [p for m, p, r in fake_hub.requests if m == "GET" and p.endswith(".gguf") and not r]
    assert not os.path.exists(hub.models_dir())


def a_type_glmcpu_cannot_run():
    """A ggml type glmcpu reads but does not run (as kernels are added, a later one), whose blocks fit
    the demo's 256-value rows."""
    from glmcpu.gguf import GGML_QUANT_SIZES, GT, RUNNABLE
    return next(t for t in GT if t in GGML_QUANT_SIZES and t not in RUNNABLE and 256 % GGML_QUANT_SIZES[t][0] == 0)


@pytest.mark.parametrize("code", ["known", 31, 200])
def test_info_of_a_remote_file_names_a_type_glmcpu_cannot_run(fake_hub, capsys, code):
    from gguf import GGUFReader
    from glmcpu.gguf import RUNNABLE, type_name
    code = int(a_type_glmcpu_cannot_run()) if code == "known" else code
    first = GGUFReader(hub.demo_path()).tensors[0].name
    fake_hub.repos["glmtest/Odd-GGUF"] = {"odd.gguf": relabel(DEMO, first, code)}
    rc, rows, err = info(capsys, "glmtest/Odd-GGUF:odd.gguf")
    assert rc == 0, err
    assert rows["glmcpu runs it"] == (f"no: glmtest/Odd-GGUF/odd.gguf: tensor {first} is stored as {type_name(code)}, "
                                      "which glmcpu cannot run; nothing was downloaded (glmcpu runs "
                                      + ", ".join(t.name for t in RUNNABLE) + ")")
    assert rows["layers"] == "4"                              # the rest of the header is still told
    label = {31: "Q4_0_4_4 x1 (size unknown)", 200: "type 200 x1 (size unknown)"}.get(code, f"{type_name(code)} x1 (")
    assert label in rows["tensor types"]
    assert not fake_hub.ranges() and not os.path.exists(hub.models_dir())


def test_info_of_a_split_file(fake_hub, tmp_path, capsys, monkeypatch):
    """On the hub every part is known by its name: all their sizes, and the types of all of them; by
    a plain URL, part 1 of N is what was read."""
    from huggingface_hub import constants
    from test_split import write_split
    (tmp_path / "split").mkdir()
    parts = write_split(hub.demo_path(), str(tmp_path / "split"), per_part=30)
    fake_hub.repos["glmtest/Parts-GGUF"] = {os.path.basename(p): open(p, "rb").read() for p in parts}
    first = os.path.basename(parts[0])
    _, local, _ = info(capsys, hub.demo_path())
    rc, rows, err = info(capsys, f"glmtest/Parts-GGUF:{first}")
    assert rc == 0, err
    sizes = [os.path.getsize(p) for p in parts]
    assert len(parts) == 2 and rows["split"] == "2 parts: " + ", ".join(map(hub.human, sizes))
    assert rows["file size"] == hub.human(sum(sizes)) and rows["glmcpu runs it"].startswith("yes")
    assert rows["tensor types"] == local["tensor types"] and rows["memory"] == local["memory"]
    assert len(fake_hub.peeks()) == 2 and not fake_hub.ranges()
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")     # the fake hub as any web server
    rc, rows, err = info(capsys, f"{fake_hub.url}/glmtest/Parts-GGUF/resolve/main/{first}")
    assert rc == 0 and rows["split"].startswith("part 1 of 2: ") and rows["file size"] == hub.human(sizes[0])


def test_info_of_a_bad_url_is_one_line(fake_hub, capsys, monkeypatch):
    from huggingface_hub import constants
    assert "has no file 'nope.gguf'" in error_line(
        capsys, "https://huggingface.co/glmtest/Demo-GGUF/resolve/main/nope.gguf")
    assert "no such repository" in error_line(capsys, "glmtest/Nope-GGUF:x.gguf")
    assert "is not a GGUF file" in error_line(capsys, "glmtest/Demo-GGUF:README.md")
    assert "not a file, not one of the 0 models" in error_line(capsys, "no-such-model")   # resolve's line
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    url = f"{fake_hub.url}/glmtest/Demo-GGUF/resolve/main/demo-Q8_0.gguf"
    rc, rows, err = info(capsys, url)                         # any web server's file, by Range too
    assert rc == 0 and rows["file"] == url and rows["file size"] == hub.human(len(DEMO)), err
    assert f"{url[:-5]}x.gguf: no such file (127.0.0.1" in error_line(capsys, url[:-5] + "x.gguf")
    with socket.socket() as s:                                 # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/m.gguf"
    assert "cannot reach" in error_line(capsys, dead)
    assert not os.path.exists(hub.models_dir())
