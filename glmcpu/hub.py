"""Getting models: the models directory, a small catalogue of known GLM GGUF files, `pull` from the
Hugging Face Hub (resumable across runs, checked against the hub's sha256) and `resolve`, which turns
what a user typed (a path, a local name, a catalogue name) into a file."""
import hashlib
import os
import re
import shutil
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlparse

from .errors import (ChecksumMismatch, DownloadInterrupted, HubError, ModelFileError, ModelNotFound,
                     NotEnoughDiskSpace, UnsupportedTensorType)
from .gguf import GGUFFile, SPLIT_NAME as SPLIT     # SPLIT: llama.cpp's gguf-split part names

GB = 10**9
# the quantisation tried first when a repository has several GGUF files (llama.cpp's usual default)
PREFERRED = ("Q4_K_M", "Q4_0", "Q8_0")


def models_dir() -> str:
    """GLMCPU_MODELS, else glmcpu/models in the user's cache (XDG_CACHE_HOME, ~/.cache, %LOCALAPPDATA%)."""
    if os.environ.get("GLMCPU_MODELS"):
        return os.path.abspath(os.path.expanduser(os.environ["GLMCPU_MODELS"]))
    if os.environ.get("XDG_CACHE_HOME"):
        cache = os.environ["XDG_CACHE_HOME"]
    elif sys.platform == "win32":
        cache = os.environ.get("LOCALAPPDATA", os.path.expanduser(r"~\AppData\Local"))
    else:
        cache = os.path.expanduser("~/.cache")
    return os.path.join(cache, "glmcpu", "models")


def demo_path() -> str:
    return str(resources.files("glmcpu") / "data" / "demo.gguf")


@dataclass(frozen=True)
class Entry:
    name: str            # family:quant; the family alone means its first entry
    repo: str
    files: tuple         # one file, or every part of a split GGUF, first part first
    size: int            # bytes, all parts together (approximate)
    ram: int             # bytes to run at ctx 4096 with the weights resident (approximate)
    arch: str            # general.architecture of the file
    types: tuple         # the ggml types that make up most of the file
    note: str = ""

    @property
    def family(self) -> str:
        return self.name.split(":")[0]

    @property
    def split(self) -> bool:
        return len(self.files) > 1

    def paths(self) -> list:
        return [os.path.join(models_dir(), self.repo, f) for f in self.files]

    def downloaded(self) -> bool:
        return all(os.path.isfile(p) for p in self.paths())


def _parts(stem: str, n: int) -> tuple:
    return tuple(f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1))


# Written from knowledge of the public GGUF repositories (bartowski, unsloth), not checked online from
# the machine this was written on: sizes and RAM are approximate, and a renamed file shows up as a
# one-line "no such file" error from `glmcpu pull`. The `types` are what llama.cpp mostly writes for that
# quantisation; rows whose length is not a multiple of 256 fall back to other types.
CATALOGUE = [
    Entry("glm-4-9b-chat:q4_k_m", "bartowski/glm-4-9b-chat-GGUF", ("glm-4-9b-chat-Q4_K_M.gguf",),
          int(6.3 * GB), int(7.5 * GB), "chatglm", ("Q4_K", "Q6_K"), "GLM-4-9B-chat (2024), 128k context"),
    Entry("glm-4-9b-chat:q8_0", "bartowski/glm-4-9b-chat-GGUF", ("glm-4-9b-chat-Q8_0.gguf",),
          int(10.0 * GB), int(11.0 * GB), "chatglm", ("Q8_0",), "GLM-4-9B-chat (2024), 128k context"),
    Entry("glm-4-9b-0414:q4_k_m", "bartowski/THUDM_GLM-4-9B-0414-GGUF", ("THUDM_GLM-4-9B-0414-Q4_K_M.gguf",),
          int(6.2 * GB), int(7.0 * GB), "glm4", ("Q4_K", "Q6_K"), "GLM-4-9B-0414, 32k context"),
    Entry("glm-4-9b-0414:q8_0", "bartowski/THUDM_GLM-4-9B-0414-GGUF", ("THUDM_GLM-4-9B-0414-Q8_0.gguf",),
          int(10.0 * GB), int(11.0 * GB), "glm4", ("Q8_0",), "GLM-4-9B-0414, 32k context"),
    Entry("glm-4-32b-0414:q4_k_m", "bartowski/THUDM_GLM-4-32B-0414-GGUF", ("THUDM_GLM-4-32B-0414-Q4_K_M.gguf",),
          int(19.7 * GB), int(21.0 * GB), "glm4", ("Q4_K", "Q6_K"), "GLM-4-32B-0414, 32k context"),
    Entry("glm-4.5-air:q4_k_m", "unsloth/GLM-4.5-Air-GGUF", _parts("Q4_K_M/GLM-4.5-Air-Q4_K_M", 2),
          int(72.9 * GB), int(76.0 * GB), "glm4moe", ("Q4_K", "Q6_K"),
          "106B MoE, 12B active; runs in less RAM with experts paged from disk"),
    Entry("intellect-3:q4_k_m", "bartowski/PrimeIntellect_INTELLECT-3-GGUF",
          _parts("PrimeIntellect_INTELLECT-3-Q4_K_M/PrimeIntellect_INTELLECT-3-Q4_K_M", 2),
          int(72.9 * GB), int(76.0 * GB), "glm4moe", ("Q4_K", "Q6_K"),
          "GLM-4.5-Air fine-tuned by Prime Intellect; experts paged from disk as above"),
]


def find_entry(name: str):
    """The catalogue entry called `name`, or the first of its family ("glm-4-9b-0414"), or None."""
    name = name.lower()
    for e in CATALOGUE:
        if e.name == name:
            return e
    return next((e for e in CATALOGUE if e.family == name), None)


def missing_kernels(entry: Entry) -> list:
    """The entry's tensor types glmcpu's kernels cannot run yet (asked of the loader, so it stays true)."""
    from .gguf import GT, RUNNABLE

    return [t for t in entry.types if GT[t] not in RUNNABLE]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


# --- what is on disk ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Local:
    name: str            # path under the models directory, without .gguf: owner/repo/file
    path: str
    size: int
    partial: bool        # a download that stopped; `glmcpu pull` resumes it


def local_models() -> list:
    root = models_dir()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if f.endswith(".gguf"):
                found.append(Local(rel[:-len(".gguf")], path, os.path.getsize(path), False))
            elif f.endswith(".part"):
                found.append(Local(rel.rsplit(".gguf.", 1)[0], path, os.path.getsize(path), True))
    return found


def resolve(name: str) -> str:
    """A path to a GGUF file for what the user typed: a path; a model in models_dir() (its name as
    `glmcpu list` shows it, its file name, or OWNER/REPO:FILE); "demo"; or a pulled catalogue name."""
    if os.path.exists(name):
        return name
    root = models_dir()
    repo, colon, filename = name.partition(":")
    spec = f"{repo}/{filename}" if colon and repo.count("/") == 1 else name     # OWNER/REPO:FILE
    for candidate in (spec, spec + ".gguf"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    complete = [m for m in local_models() if not m.partial]
    if name.count("/") == 1 and os.path.isdir(os.path.join(root, name)):      # OWNER/REPO
        inside = [m for m in complete if m.name.startswith(name + "/") and _is_first_part(m.path)]
        if len(inside) == 1:
            return inside[0].path
    base = name[:-len(".gguf")] if name.endswith(".gguf") else name
    same = [m for m in complete if m.name.rsplit("/", 1)[-1].lower() == base.lower()]
    if len(same) == 1:
        return same[0].path
    if len(same) > 1:
        raise ModelNotFound(f"{name!r} matches {len(same)} local models: "
                            f"{', '.join(m.name for m in same)}; give the whole name")
    if name == "demo":
        return demo_path()
    entry = find_entry(name)
    if entry is not None:
        if entry.downloaded():
            return entry.paths()[0]            # llama.cpp's convention: the first part names a split model
        raise ModelNotFound(f"{entry.name} is not downloaded yet (about {entry.size / GB:.1f} GB): "
                            f"run `glmcpu pull {entry.name}` first")
    if os.path.isabs(name) or name.endswith(".gguf") or name.startswith((".", "~")):
        raise ModelNotFound(f"{name}: no such file (nor a model of that name in {root}; see `glmcpu list`)")
    raise ModelNotFound(f"no model {name!r}: it is not a file, not one of the {len(complete)} models in "
                        f"{root}, and not a catalogue name (see `glmcpu list`; "
                        "`glmcpu pull OWNER/REPO:FILE.gguf` fetches any GGUF from the Hugging Face Hub)")


def _is_first_part(path: str) -> bool:
    m = SPLIT.search(path)
    return m is None or m.group(1) == "00001"


# --- the hub -----------------------------------------------------------------------------------

def _network_errors() -> tuple:
    # huggingface_hub 1.x talks through httpx, 2.x through httpx2: catch whichever is there
    import importlib

    found = []
    for mod in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(mod).HTTPError)
        except ImportError:
            pass
    return tuple(found)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextmanager
def _hub_errors(repo: str, filename: str = None):
    """The hub's exceptions as one-line HubErrors that say what to do."""
    from huggingface_hub import errors as hf

    what = f"{repo}:{filename}" if filename else repo
    try:
        yield
    except hf.GatedRepoError:
        raise HubError(f"{repo} is gated: accept its terms on the hub's page, then `hf auth login`") from None
    except hf.RepositoryNotFoundError:
        raise HubError(f"{repo}: no such repository on {_endpoint()} (or it is private: `hf auth login`)") from None
    except hf.RevisionNotFoundError:
        raise HubError(f"{what}: no such revision on {_endpoint()}") from None
    except (hf.RemoteEntryNotFoundError, hf.EntryNotFoundError):
        raise HubError(f"{repo} has no file {filename!r}; `glmcpu pull {repo}` lists its GGUF files") from None
    except hf.OfflineModeIsEnabled:
        raise HubError(f"cannot fetch {what}: HF_HUB_OFFLINE is set; unset it to reach the hub") from None
    except hf.HfHubHTTPError as e:
        raise HubError(f"{_endpoint()} refused {what}: {_first_line(e)}") from None
    except _network_errors() as e:
        raise HubError(f"cannot reach {_endpoint()} for {what} ({type(e).__name__}: {_first_line(e)}); "
                       "check the network, or HF_ENDPOINT for a mirror") from None


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def choose_file(repo: str, names: list) -> tuple:
    """The files to fetch when a repository is named without a file: its only GGUF, else the first
    PREFERRED quantisation; every part of it when it is split."""
    ggufs = [n for n in names if n.endswith(".gguf")]
    models = [n for n in ggufs if _is_first_part(n)]
    if not models:
        raise HubError(f"{repo} holds no .gguf file (a Hugging Face checkpoint? `glmcpu convert` makes one)")
    pick = models[0] if len(models) == 1 else None
    for quant in PREFERRED:
        if pick is None:
            pick = next((n for n in models if quant.lower() in os.path.basename(n).lower()), None)
    if pick is None:
        raise ModelNotFound(f"{repo} has {len(models)} GGUF files and none is {' or '.join(PREFERRED)}; "
                            f"name one: `glmcpu pull {repo}:FILE` with FILE one of {', '.join(sorted(models))}")
    return expand_parts(pick)


def expand_parts(filename: str) -> tuple:
    m = SPLIT.search(filename)
    if m is None:
        return (filename,)
    return _parts(filename[:m.start()], int(m.group(2)))


def _plan(spec: str):
    """(repo, files, the name to give `run` afterwards) for a catalogue name or OWNER/REPO[:FILE]."""
    entry = find_entry(spec)
    if entry is not None:
        return entry.repo, entry.files, entry.name
    repo, _, filename = spec.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelNotFound(f"unknown model {spec!r}: not a catalogue name (see `glmcpu list`) and not "
                            "OWNER/REPO[:FILE.gguf] on the Hugging Face Hub")
    if filename:
        if filename.startswith("/") or ".." in filename.split("/"):    # it becomes a path under models_dir()
            raise ModelNotFound(f"{filename!r} is not a file name inside a repository")
        return repo, expand_parts(filename), spec
    from huggingface_hub import HfApi

    with _hub_errors(repo):
        names = HfApi(endpoint=_endpoint()).list_repo_files(repo)
    files = choose_file(repo, names)
    return repo, files, f"{repo}:{files[0]}"


def pull(spec: str, progress: bool = True, log=None) -> list:
    """Download a catalogue model or OWNER/REPO[:FILE] into models_dir(); returns the local paths.
    A stopped download is kept as FILE.<etag>.part and resumed by the next pull; a finished one is
    checked against the hub's sha256 before it takes its name."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    repo, files, name = _plan(spec)
    metas = []
    for f in files:
        with _hub_errors(repo, f):
            metas.append(get_hf_file_metadata(hf_hub_url(repo, f, endpoint=_endpoint())))
    dests = [os.path.join(models_dir(), repo, f) for f in files]
    _check_space(dests, metas)
    arch = None
    for f, dest, meta in zip(files, dests, metas):   # every part's header, before any part's body
        if not (os.path.isfile(dest) and os.path.getsize(dest) == meta.size):
            arch = peek(repo, f, meta, log, arch) or arch
    for f, dest, meta in zip(files, dests, metas):
        if os.path.isfile(dest) and os.path.getsize(dest) == meta.size:
            log(f"{repo}/{f}: already downloaded")
            continue
        log(f"pulling {repo}/{f} ({human(meta.size) if meta.size else 'size unknown'})")
        _fetch(repo, f, dest, meta, spec, progress, log)
    log(f"ready: glmcpu run {name}" + (f" (its {len(files)} parts are read as one model)" if len(files) > 1 else ""))
    return dests


HEADER_MAX = 256 << 20      # a GGUF header (metadata, tokenizer, tensor table) is a few MB; stop looking here


def _range(url: str, size, n: int, headers: dict) -> tuple:
    """(the first n bytes of a remote file, its size as the server gives it or None). A server that
    ignores the Range is read no further than n bytes either."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    got = bytearray()
    with get_session().stream("GET", url, headers={**headers, "Range": f"bytes=0-{min(n, size or n) - 1}"},
                              follow_redirects=True) as r:
        hf_raise_for_status(r)
        total = (r.headers.get("Content-Range", "").rpartition("/")[2] if r.status_code == 206
                 else r.headers.get("Content-Length", ""))
        for chunk in r.iter_bytes():
            got += chunk
            if len(got) >= n:
                break
    return bytes(got[:n]), int(total) if total.isdigit() else None


def read_remote_header(what: str, url: str, size, headers: dict) -> tuple:
    """(metadata, tensor table, the file's size or None) of a remote GGUF, from Range requests of its
    first 4 MiB, then 4x more until the tensor table ends (HEADER_MAX at most). size: its bytes when
    known already (else the server's Content-Range tells)."""
    from . import gguf

    n = 4 << 20
    while True:
        head, total = _range(url, size, n, headers)
        size = size or total
        known = size or HEADER_MAX
        try:
            table, infos = gguf.read_header(head, known, what)
            return table, infos, size
        except gguf.HeaderCut:
            if n >= min(known, HEADER_MAX) or len(head) < min(n, known):
                raise ModelFileError(f"{what}: its header does not end within its first {human(len(head))}") from None
            n *= 4


def check_runnable(what: str, arch, infos):
    """Refuse, in one line, a file whose architecture (UnsupportedArchitecture) or tensor types
    (UnsupportedTensorType, naming the type and where it comes from) glmcpu cannot run."""
    from . import gguf
    from .models import model_class

    if arch is not None:
        model_class(arch)
    for name, code, ne, _ in infos:
        if code not in gguf.GGML_QUANT_SIZES or gguf.GT(code) not in gguf.RUNNABLE:
            raise UnsupportedTensorType(
                f"{what}: tensor {name} is stored as {gguf.type_name(code)}, which glmcpu cannot run; "
                f"nothing was downloaded (glmcpu runs {', '.join(t.name for t in gguf.RUNNABLE)})")


def peek(repo: str, filename: str, meta, log, arch=None):
    """Read a remote GGUF's header (Range requests) before downloading it: refuse, in one line, a file
    whose architecture or tensor types glmcpu cannot run; say what it holds. Returns its architecture
    (a split file's later parts have none of their own). A header that cannot be read is only warned
    of: the download's checksum and the load judge the file."""
    from . import gguf

    what = f"{repo}/{filename}"
    try:
        with _hub_errors(repo, filename):
            table, infos, _ = read_remote_header(what, meta.location, meta.size, _auth_headers(meta))
    except (ModelFileError, HubError, *_network_errors(), *_hub_http_errors()) as e:
        log(f"{what}: could not read its header before the download ({_first_line(e)}); it is checked after")
        return None
    arch = table.get("general.architecture", arch)
    check_runnable(what, arch, infos)
    from .ops import is_expert

    types, total, expert = Counter(), 0, 0
    for name, code, ne, _ in infos:
        b = gguf.tensor_bytes(gguf.GT(code), ne)
        types[gguf.GT(code).name] += 1
        total += b
        expert += b if is_expert(name) else 0
    log(f"{what}: {arch or 'a later part'}, " + ", ".join(f"{k} x{v}" for k, v in types.most_common())
        + f"; runs here; {human(total)} of weights" + (f", {human(total - expert)} of them not experts "
                                                       "(the RAM it needs; experts are paged from disk)" if expert else ""))
    return arch


def _auth_headers(meta) -> dict:
    """The hub's token goes to the hub itself only, never to the CDN a large file is served from."""
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers() if urlparse(meta.location).netloc == urlparse(_endpoint()).netloc else {}


def _part_path(dest: str, etag: str) -> str:
    # the etag in the name: a part left from an older version of the file is never resumed
    return f"{dest}.{(etag or 'unknown')[:16]}.part"


def _check_space(dests, metas):
    need = 0
    for dest, meta in zip(dests, metas):
        if meta.size and not (os.path.isfile(dest) and os.path.getsize(dest) == meta.size):
            part = _part_path(dest, meta.etag)
            need += meta.size - (os.path.getsize(part) if os.path.isfile(part) else 0)
    folder = models_dir()
    while not os.path.isdir(folder):                  # the nearest folder that exists is on the same disk
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise NotEnoughDiskSpace(f"the download needs {human(need)} and {folder} has {human(free)} free; "
                                 "free some space or set GLMCPU_MODELS to a folder on a bigger disk")


def _fetch(repo, filename, dest, meta, spec, progress, log):
    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)

    # httpx hands over a chunk only when it is full, so a dropped connection loses the chunk in
    # flight: 1 MiB rather than huggingface_hub's 10 MiB keeps more of a stopped download
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, 1 << 20)
    part = _part_path(dest, meta.etag)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    for stale in os.listdir(os.path.dirname(dest)):
        if stale.startswith(os.path.basename(dest) + ".") and stale.endswith(".part") and \
                os.path.join(os.path.dirname(dest), stale) != part:
            os.remove(os.path.join(os.path.dirname(dest), stale))
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if meta.size is not None and have > meta.size:
        os.remove(part)
        have = 0
    if have:
        log(f"resuming at {human(have)}")
    headers = _auth_headers(meta)
    hide = not progress and not are_progress_bars_disabled()
    if hide:
        disable_progress_bars()
    try:
        with open(part, "ab") as out:
            # huggingface_hub's own loop: Range requests, a tqdm bar, and a few in-process retries when
            # the connection drops mid-body; what it cannot finish stays in `part` for the next pull
            http_get(meta.location, out, resume_size=have, headers=headers, expected_size=meta.size,
                     displayed_filename=os.path.basename(filename))
    except (KeyboardInterrupt, OSError, *_network_errors(), *_hub_http_errors()) as e:
        got = os.path.getsize(part) if os.path.isfile(part) else 0
        why = "stopped by Ctrl-C" if isinstance(e, KeyboardInterrupt) else _first_line(e)
        raise DownloadInterrupted(f"download of {repo}/{filename} stopped at {human(got)} of "
                                  f"{human(meta.size) if meta.size else '?'} ({why}); "
                                  f"run `glmcpu pull {spec}` again to resume") from None
    finally:
        if hide:
            enable_progress_bars()
    _verify(part, meta.etag, f"{repo}/{filename}", progress, log)
    os.replace(part, dest)


def _hub_http_errors() -> tuple:
    from huggingface_hub.errors import HfHubHTTPError

    return (HfHubHTTPError,)


def _verify(path, etag, what, progress, log):
    """The file's hash against the hub's: the etag of an LFS file is its sha256 (GGUFs always are
    LFS); a small file kept in git has its git blob id (sha1 of "blob SIZE\\0" + bytes) instead."""
    from tqdm.auto import tqdm

    etag = (etag or "").lower()
    size = os.path.getsize(path)
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        h, kind = hashlib.sha256(), "sha256"
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        h, kind = hashlib.sha1(b"blob %d\0" % size), "git blob id"
    else:
        log(f"warning: the hub gave no checksum for {what} (etag {etag!r}); not verified")
        return
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"checking {kind}",
                                     disable=None if progress else True) as bar:
        while chunk := f.read(1 << 23):
            h.update(chunk)
            bar.update(len(chunk))
    if h.hexdigest() != etag:
        os.remove(path)
        raise ChecksumMismatch(f"{what}: the download's {kind} is {h.hexdigest()[:16]}..., the hub's is "
                               f"{etag[:16]}...; the file was deleted, run `glmcpu pull` again")


# --- what a remote file holds, from its header alone (`glmcpu info URL-or-name`) -----------------

HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")


def as_url(name: str):
    """name as a URL if it is one (http(s)://..., or hf.co/... and huggingface.co/... without the
    scheme), else None."""
    if name.startswith(("http://", "https://")):
        return name
    return "https://" + name if name.split("/", 1)[0] in HUB_HOSTS else None


def names_remote(name: str) -> bool:
    """Whether `name` names a file on the web or the hub: a URL, a catalogue name, OWNER/REPO[:FILE]
    (a path such as dir/x.gguf or ./a/b is not taken for a repository)."""
    if as_url(name) or find_entry(name):
        return True
    repo, colon, _ = name.partition(":")
    return (repo.count("/") == 1 and all(repo.split("/")) and not repo.startswith((".", "~"))
            and (bool(colon) or not repo.endswith(".gguf")))


def _hub_file(url: str):
    """(repo, revision, file) of a Hugging Face file URL, .../OWNER/REPO/resolve/REV/FILE (or /blob/,
    the page's), on the hub or HF_ENDPOINT's host; None for any other URL."""
    from urllib.parse import unquote

    u = urlparse(url)
    if u.netloc not in HUB_HOSTS and u.netloc != urlparse(_endpoint()).netloc:
        return None
    p = [unquote(x) for x in u.path.strip("/").split("/")]
    if len(p) < 5 or p[2] not in ("resolve", "blob"):
        return None
    return f"{p[0]}/{p[1]}", p[3], "/".join(p[4:])


@contextmanager
def _url_errors(url: str):
    """A web server's refusals as one-line HubErrors (the hub's own go through _hub_errors)."""
    host = urlparse(url).netloc or url
    try:
        yield
    except _hub_http_errors() as e:
        r = getattr(e, "response", None)
        code = getattr(r, "status_code", None)
        why = {404: "no such file", 401: "it asks for a login", 403: "access is refused",
               416: "it cannot serve a byte range of the file"}.get(code, "it refused the request")
        raise HubError(f"{url}: {why} ({host} answered {code or _first_line(e)})") from None
    except _network_errors() as e:
        raise HubError(f"cannot reach {host} for {url} ({type(e).__name__}: {_first_line(e)}); "
                       "check the URL and the network") from None


class HeaderFile(GGUFFile):
    """A GGUF known from its header alone (metadata and tensor table, no data): what a model's Config,
    its check_tensors and `info` read, through GGUFFile's checked readers. A tensor of a type glmcpu
    cannot read has its type code as tensor_type and n_bytes None."""

    def __init__(self, path: str, meta: dict, infos: list, size):
        from .gguf import GGML_QUANT_SIZES, GT, Tensor, tensor_bytes

        self.path, self.meta, self.size, self.parts = path, meta, size, []
        self.arch = meta.get("general.architecture")
        self.tensors = {}
        for name, code, ne, off in infos:
            known = code in GGML_QUANT_SIZES
            self.tensors[name] = Tensor(name, GT(code) if known else code, ne,
                                        tensor_bytes(GT(code), ne) if known else None, off, None)


@dataclass
class Remote:
    """What `inspect_remote` read of a remote GGUF (its header only; nothing downloaded)."""
    name: str            # OWNER/REPO/FILE, or the URL
    parts: list          # [(name, bytes or None)]: every part of a split file whose name says them, first first
    count: int           # how many parts the file has (1: not split)
    file: HeaderFile     # the first part's metadata, the tensors of every part read
    cfg: object          # the model's Config, or None when the header does not make one
    refused: str         # why glmcpu cannot run it (the line `pull` would refuse it with), or None


def inspect_remote(target: str) -> Remote:
    """Read the header of a remote GGUF with Range requests, downloading nothing: a URL (a hub URL
    goes through the hub, HF_ENDPOINT and its token included), a catalogue name or OWNER/REPO[:FILE]
    as `pull` takes them. A split file named on the hub has every part's header read (as `pull` does),
    one given by another URL its first part's only."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = as_url(target)
    on_hub = _hub_file(url) if url else None
    heads, parts = [], []           # [(metadata, tensor table)], [(name, bytes)] of each part read
    if url and not on_hub:
        with _url_errors(url):
            table, infos, size = read_remote_header(url, url, None, {})     # never the hub's token elsewhere
        heads.append((table, infos))
        parts.append((url, size))
        name = url
    else:
        if on_hub:
            repo, revision, filename = on_hub
            files = expand_parts(filename)
        else:
            (repo, files, _), revision = _plan(target), None
        name = f"{repo}/{files[0]}"
        for f in files:
            with _hub_errors(repo, f):
                meta = get_hf_file_metadata(hf_hub_url(repo, f, revision=revision, endpoint=_endpoint()))
                table, infos, size = read_remote_header(f"{repo}/{f}", meta.location, meta.size,
                                                        _auth_headers(meta))
            heads.append((table, infos))
            parts.append((f"{repo}/{f}", size))
    meta = heads[0][0]
    infos = [i for _, table in heads for i in table]
    file = HeaderFile(name, meta, infos, sum(s for _, s in parts) if all(s for _, s in parts) else None)
    count = file.number("split.count", 1, maximum=99999)
    if file.number("split.no", 0, minimum=0) != 0:
        raise ModelFileError(f"{name} is part {file.number('split.no') + 1} of {count} of a split GGUF; "
                             "give the first part (…-00001-of-…gguf): its header holds the model's metadata")
    return Remote(name, parts, count, file, *_judge(file, infos))


def _judge(file: HeaderFile, infos) -> tuple:
    """(Config or None, why glmcpu cannot run the file or None): the load's own checks, on the header."""
    from .errors import GlmcpuError
    from .models import model_class

    cfg, refused = None, None
    if not isinstance(file.arch, str):
        return None, f"{file.path} has no general.architecture: not a model GGUF"
    try:
        cls = model_class(file.arch)
        cfg = cls.config_class.from_gguf(file)
        cls.check_tensors(file, cfg)
    except GlmcpuError as e:
        refused = str(e)
    try:
        check_runnable(file.path, file.arch, infos)
    except GlmcpuError as e:
        refused = refused or str(e)
    return cfg, refused
