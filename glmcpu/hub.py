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
from .gguf import SPLIT_NAME as SPLIT     # llama.cpp's gguf-split part names

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
        raise HubError(f"cannot fetch {what}: HF_HUB_OFFLINE is set; unset it to download") from None
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


def _range(url: str, size: int, n: int, headers: dict) -> bytes:
    """The first n bytes of a remote file (a server that ignores the Range is read no further)."""
    from huggingface_hub.utils import get_session

    got = bytearray()
    with get_session().stream("GET", url, headers={**headers, "Range": f"bytes=0-{min(n, size) - 1}"},
                              follow_redirects=True) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            got += chunk
            if len(got) >= n:
                break
    return bytes(got[:n])


def peek(repo: str, filename: str, meta, log, arch=None):
    """Read a remote GGUF's header (Range requests) before downloading it: refuse, in one line, a file
    whose architecture or tensor types glmcpu cannot run; say what it holds. Returns its architecture
    (a split file's later parts have none of their own). A header that cannot be read is only warned
    of: the download's checksum and the load judge the file."""
    from . import gguf
    from .models import model_class

    what = f"{repo}/{filename}"
    headers = _auth_headers(meta)
    n, size = 4 << 20, meta.size or HEADER_MAX
    try:
        while True:
            with _hub_errors(repo, filename):
                head = _range(meta.location, size, n, headers)
            try:
                table, infos = gguf.read_header(head, size, what)
                break
            except gguf.HeaderCut:
                if n >= min(size, HEADER_MAX) or len(head) < min(n, size):
                    raise ModelFileError(f"{what}: its header does not end within its first {human(len(head))}")
                n *= 4
    except (ModelFileError, HubError, *_network_errors(), *_hub_http_errors()) as e:
        log(f"{what}: could not read its header before the download ({_first_line(e)}); it is checked after")
        return None
    arch = table.get("general.architecture", arch)
    if arch is not None:
        model_class(arch)                    # UnsupportedArchitecture: one line naming it
    from .ops import is_expert

    types, total, expert = Counter(), 0, 0
    for name, code, ne, _ in infos:
        if code not in gguf.GGML_QUANT_SIZES or gguf.GT(code) not in gguf.RUNNABLE:
            raise UnsupportedTensorType(
                f"{what}: tensor {name} is stored as {gguf.type_name(code)}, which glmcpu cannot run; "
                f"nothing was downloaded (glmcpu runs {', '.join(t.name for t in gguf.RUNNABLE)})")
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
