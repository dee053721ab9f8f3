"""Real `glmcpu worker` processes on 127.0.0.1: the same numbers as one process, faults at chosen
moments, a second root, keys, shipped shares and what a worker refuses."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import glmcpu
from glmcpu.cluster import ClusterError, make_plan
from glmcpu.net.link import keygen
from conftest import PROMPT, greedy, start_worker, worker_log

TOPOLOGY = "star"          # tests/test_*_mesh.py run these tests again over a mesh


def kl(want, got):
    def logp(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lw, lg = logp(want), logp(got)
    return float((np.exp(lw) * (lw - lg)).sum(-1).max())


def assert_same_logits(want, got, rel=1e-4):
    """Within rel of the largest logit, KL <= 1e-6, same argmax everywhere (rel=0: bit for bit)."""
    if rel == 0:
        np.testing.assert_array_equal(got, want)
        return
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= rel * scale, (np.abs(got - want).max() / scale)
    assert kl(want, got) <= 1e-6
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("family", ["glm4", "glm", "glm4_moe"])
@pytest.mark.parametrize("n_workers,shares", [(1, None), (2, None), (3, None), (2, [1, 3, 2]), (3, [0, 2, 1, 1])])
def test_cluster_computes_what_one_process_does(tiny, workers, family, n_workers, shares, cluster_topology):
    _, path, _ = tiny(family, "q8_0", fuse_qkv=family == "glm")
    one = glmcpu.load(path, threads=1)
    want_logits, want = one.logits(PROMPT), greedy(one)
    _, eps = workers(path, n_workers, "--insecure")
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True, timeout=5, shares=shares)
    # the same modules, and partial sums added in double where float32 chunk sums add exactly:
    # the same bits as one process
    assert_same_logits(want_logits, m.logits(PROMPT), rel=0)
    assert greedy(m) == want
    sampled = dict(max_tokens=10, temperature=0.8, seed=5, ignore_eos=True)     # top-k 40: the workers' 40 best
    assert list(m.generate(PROMPT, **sampled)) == list(one.generate(PROMPT, **sampled))
    assert m.cluster.stats["round_trips" if cluster_topology == "star" else "mesh_steps"] > 0
    assert m.cluster.stats["failovers"] == 0 and m.cluster.status()["topology"] == cluster_topology
    plan = m.cluster.plan
    if shares:   # an uneven plan really is uneven, and a node with share 0 holds nothing
        sizes = [b - a for _, a, b in (plan.tables["ffn"].get(1) or plan.tables["moe"][1])]
        assert len(set(sizes)) > 1
        assert all(n > 0 for n, _, _ in plan.tables["head"][-1]) == (shares[0] == 0)
    assert {n for n, _, _ in plan.tables["head"][-1]} - {0}          # the output head is split too
    m.cluster.close()


@pytest.fixture(scope="module")
def wide_file(tmp_path_factory):
    """GLM-4-9B's widths (4096 hidden, 13696 FFN, 32/2 heads, 151,552-row head), 2 layers, Q4_0."""
    path = str(tmp_path_factory.mktemp("wide") / "w9b.gguf")
    subprocess.run([sys.executable, TOOLS + "/make_model.py", path, "--layers", "2", "--type", "q4_0"], check=True,
                   capture_output=True, timeout=300)
    return path


TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")


def test_cluster_on_a_9b_wide_q4_0_file(workers, wide_file):
    ids = list(range(1000, 1012))
    want = glmcpu.load(wide_file, threads=1).logits(ids)
    _, eps = workers(wide_file, 2, "--insecure")
    for eps_used, shares in ((eps[:1], None), (eps, [1, 2, 1])):
        m = glmcpu.load(wide_file, threads=1, workers=eps_used, insecure=True, shares=shares)
        assert_same_logits(want, m.logits(ids), rel=0)
        m.cluster.close()
    # decoding, the head's slices come back as their best logits only: 40 of them, not ~75,000
    m = glmcpu.load(wide_file, threads=1, workers=eps[:1], insecure=True)
    one = glmcpu.load(wide_file, threads=1)
    for how in (dict(temperature=0), dict(temperature=0.8, seed=1)):
        assert list(m.generate(ids, max_tokens=4, ignore_eos=True, **how)) == list(
            one.generate(ids, max_tokens=4, ignore_eos=True, **how))

    def received(**how):        # by the root, over 5 steps of one row (the prompt is in the cache)
        r0 = m.cluster.stats["received"]
        list(m.generate(ids, max_tokens=5, ignore_eos=True, **how))
        return m.cluster.stats["received"] - r0
    list(m.generate(ids, max_tokens=1))
    slices = received(temperature=0, repeat_penalty=1.1)                # a penalty needs every logit
    best = received(temperature=0)
    assert slices - best > 5 * 151552 // 2 * 4 * 0.95, (slices, best)
    m.cluster.close()


def test_plan_predicts_a_rate_limited_link(wide_file, tmp_path):
    """A worker in a network namespace behind a 50 Mbit/s tbf link: the measured decode speed is
    within 25% of what `glmcpu plan` predicts for that link."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("needs root, ip and tc to make a rate-limited network namespace")
    out = tmp_path / "bench.json"
    # medians of 3: with the head's logits no longer crossing the link, the q8_0 star is bound by
    # the cores, and a full suite once ran it at 0.59 of its prediction in one noisy run
    p = subprocess.run([sys.executable, TOOLS + "/bench_cluster.py", wide_file, "--runs", "3", "--tokens", "10",
                        "--link-mbit", "50", "--wires", "f32,q8_0", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    if p.returncode == 3:
        pytest.skip(p.stderr.strip().splitlines()[-1])
    assert p.returncode == 0, p.stderr
    import json
    r = json.loads(out.read_text())
    for w in ("f32", "q8_0"):
        assert 0.75 < r["cluster"][w] / r["predicted"][w] < 1.25, r
    assert r["per_token"]["q8_0"]["sent"] < 0.3 * r["per_token"]["f32"]["sent"]


def test_netns_mesh_measures_cluster_and_ceiling(wide_file, tmp_path):
    """bench_cluster.py --netns: every node in a namespace of its own and on a core of its own,
    joined by a tbf-limited veth pair (a bridge for more nodes), CurveZMQ keys made for the run. The ceiling
    (2 pinned one-core processes at once) beats one alone, and the cluster's figures come from a
    cluster whose worker stayed alive (the tool refuses otherwise), over both link speeds."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc") or not shutil.which("taskset"):
        pytest.skip("needs root, ip, tc and taskset to make pinned nodes in network namespaces")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores: one per node")
    out = tmp_path / "mesh.json"
    p = subprocess.run([sys.executable, TOOLS + "/bench_cluster.py", wide_file, "--netns", "--runs", "1", "--tokens",
                        "6", "--link-mbit", "1000,100", "--json", str(out)], capture_output=True, text=True, timeout=900)
    if p.returncode == 3:
        pytest.skip(p.stderr.strip().splitlines()[-1])
    assert p.returncode == 0, p.stderr[-2000:]
    import json
    r = json.loads(out.read_text())
    assert r["nodes"] == 2 and r["ceiling"] > 1.05 * r["alone"] > 0, r      # (1.05: 2 vCPUs may share a core)
    assert set(r["cluster"]) == {"star 1000", "star 100", "mesh 1000", "mesh 100"}, r
    for mbit, rate in r["cluster"].items():
        # a sanity bound, not a speed claim: one run of a few tokens of this small file moves by
        # +-20% here (a mesh run measured 1.11x a ceiling of 1.44x one core, 2026-12-07)
        assert 0 < rate < r["ceiling"] * 1.5, r
        assert r["predicted"][mbit] > 0, r
    assert "of the ceiling" in p.stdout
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("glmb-") == 0


# ---- faults ---------------------------------------------------------------------------------

FAULT_KINDS = {"glm4": ("attn", "ffn", "head"), "glm4_moe": ("attn", "ffn", "moe")}


def nth_request(m, kind, token):
    """The worker's request count of `kind` that falls in decode step `token` of greedy()."""
    cfg = m.cfg
    per_token = {"attn": cfg.n_layer, "head": 1,
                 "ffn": cfg.n_layer if not getattr(cfg, "n_expert", 0) else cfg.n_dense_lead,
                 "moe": cfg.n_layer - getattr(cfg, "n_dense_lead", 0)}[kind]
    return per_token * (1 + token) + 1        # the prompt's prefill is one request per module


@pytest.mark.parametrize("family", ["glm4", "glm4_moe"])
@pytest.mark.parametrize("how", ["kill", "stop"])
@pytest.mark.parametrize("n_workers", [2, 3])
def test_a_worker_lost_mid_answer_changes_nothing(tiny, workers, family, how, n_workers):
    """kill -9 or SIGSTOP of a worker at a chosen request of each kind (attention, FFN, MoE or the
    output head), each worker in turn: the same greedy answer as without the fault."""
    _, path, _ = tiny(family, "q8_0")
    one = glmcpu.load(path, threads=1)
    want = greedy(one, 16)
    plan = make_plan(one.cfg, ["root"] + ["w"] * n_workers)      # threads 1 each: equal shares
    for i, kind in enumerate(FAULT_KINDS[family]):
        holders = sorted({n - 1 for parts in plan.tables[kind].values() for n, _, _ in parts if n > 0})
        victim = holders[i % len(holders)]
        faults = [None] * n_workers
        faults[victim] = f"{how}:{kind}:{nth_request(one, kind, 3 + i)}"
        procs, eps = workers(path, n_workers, "--insecure", faults=faults)
        m = glmcpu.load(path, threads=1, workers=eps, insecure=True, timeout=1.5)
        assert greedy(m, 16) == want, faults
        st = m.cluster.status()
        held_kv = any(n == victim + 1 for parts in plan.tables["attn"].values() for n, _, _ in parts)
        assert st["failovers"] == 1 and st["alive"] == f"{n_workers - 1}/{n_workers}", (
            faults, st, [worker_log(p)[-2000:] for p in procs])
        assert (st["replays"] >= 1) == held_kv        # only a lost KV cache needs the sequence again
        if how == "stop":       # the stopped worker wakes up: its stale answers change nothing, and
            procs[victim].send_signal(signal.SIGCONT)        # it is used again, from a clean start
            time.sleep(0.3)
            assert greedy(m, 16) == want
            assert m.cluster.status()["alive"] == f"{n_workers}/{n_workers}", (
                faults, m.cluster.status(), worker_log(procs[victim])[-2000:])
        m.cluster.close()
        for p in procs:
            p.kill()


def test_every_worker_lost_and_one_back(tiny, workers):
    """Both workers die at different points: the root ends up doing everything, same answer; a
    worker restarted on the same address is used again from the next request."""
    _, path, _ = tiny("glm4_moe", "q8_0")
    one = glmcpu.load(path, threads=1)
    want = greedy(one, 16)
    procs, eps = workers(path, 2, "--insecure",
                         faults=[f"kill:moe:{nth_request(one, 'moe', 2)}", f"kill:attn:{nth_request(one, 'attn', 9)}"])
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True, timeout=3)
    assert greedy(m, 16) == want
    assert m.cluster.stats["failovers"] == 2 and m.cluster.status()["alive"] == "0/2"
    back, _ = start_worker(path, "--insecure", bind=eps[1])
    try:
        assert greedy(m, 16) == want and m.cluster.status()["alive"] == "1/2"
    finally:
        back.kill()
        back.wait()


# ---- one root at a time ---------------------------------------------------------------------

def test_a_second_root_is_refused_and_changes_nothing(tiny, workers):
    _, path, _ = tiny("glm4", "q8_0")
    want = greedy(glmcpu.load(path, threads=1), 16)
    _, eps = workers(path, 2, "--insecure", lease=2)
    first = glmcpu.load(path, threads=1, workers=eps, insecure=True)
    got = []
    for i, piece in enumerate(first.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True)):
        got.append(piece)
        if i == 5:                       # a second root arrives mid-answer
            with pytest.raises(ClusterError) as e:
                glmcpu.load(path, threads=1, workers=eps[1:], insecure=True)
            msg = str(e.value)
            assert "busy" in msg and eps[1] in msg and "\n" not in msg
    assert got == want and first.cluster.stats["failovers"] == 0
    time.sleep(2.5)                      # idle, but its keepalive holds the workers
    with pytest.raises(ClusterError, match="busy"):
        glmcpu.load(path, threads=1, workers=eps, insecure=True)
    first.cluster.close()                # says goodbye: the workers are free at once
    second = glmcpu.load(path, threads=1, workers=eps, insecure=True)
    assert greedy(second, 16) == want
    second.cluster.close()


def test_a_root_that_dies_frees_its_workers(tiny, workers, tmp_path):
    _, path, _ = tiny("glm4", "q8_0")
    _, eps = workers(path, 1, "--insecure", lease=1.5)
    code = ("import glmcpu, sys, time; m = glmcpu.load(%r, threads=1, workers=[%r], insecure=True); "
            "list(m.generate([5, 6, 7], max_tokens=2)); print('up', flush=True); time.sleep(60)" % (path, eps[0]))
    root = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert root.stdout.readline().strip() == "up"
    with pytest.raises(ClusterError, match="busy"):
        glmcpu.load(path, threads=1, workers=eps, insecure=True)
    root.kill()
    root.wait()
    time.sleep(2)
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True)
    assert greedy(m) == greedy(glmcpu.load(path, threads=1))
    m.cluster.close()


# ---- keys, shipped shares, files ------------------------------------------------------------

def test_keys_required_and_checked(tiny, workers, tmp_path):
    _, path, _ = tiny("glm4", "q8_0")
    for name in ("root", "worker", "stranger"):
        keygen(str(tmp_path / name))
    _, eps = workers(path, 1, "--key", str(tmp_path / "worker"), "--allow", str(tmp_path / "root.pub"))
    want = greedy(glmcpu.load(path, threads=1))
    m = glmcpu.load(path, threads=1, workers=eps, key=str(tmp_path / "root"),
                    worker_key=str(tmp_path / "worker.pub"))
    assert greedy(m) == want
    m.cluster.close()
    with pytest.raises(ClusterError, match="not reachable"):      # a key the worker was not given
        glmcpu.load(path, workers=eps, key=str(tmp_path / "stranger"),
                    worker_key=str(tmp_path / "worker.pub"), timeout=1)
    with pytest.raises(ClusterError, match="not reachable"):      # plain text gets nothing
        glmcpu.load(path, workers=eps, insecure=True, timeout=1)
    with pytest.raises(glmcpu.GlmcpuError, match="--key"):
        glmcpu.load(path, workers=eps)
    m = glmcpu.load(path, threads=1, workers=eps, key=str(tmp_path / "root"),
                    worker_key=str(tmp_path / "worker.pub"))
    assert greedy(m) == want
    m.cluster.close()


def test_worker_holding_another_model_gets_this_ones_shares(tiny, workers):
    _, path, _ = tiny("glm4", "q8_0")
    _, other, _ = tiny("glm", "q8_0")
    _, eps = workers(path, 1, "--insecure")
    m = glmcpu.load(other, threads=1, workers=eps, insecure=True)
    assert m.cluster.shipped > 0 and greedy(m) == greedy(glmcpu.load(other, threads=1))
    m.cluster.close()
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True)
    assert m.cluster.shipped == 0 and greedy(m) == greedy(glmcpu.load(path, threads=1))
    m.cluster.close()


def flip_a_weight(src, dst, tensor):
    """A copy of src with one byte of `tensor` changed (in its last columns: the last node's
    share of a column split): same header, same size, other weights."""
    from glmcpu.gguf import GGUFFile
    shutil.copy(src, dst)
    t = GGUFFile(src).tensors[tensor]
    with open(dst, "r+b") as f:
        f.seek(t.data_offset + t.n_bytes - 3)
        b = f.read(1)
        f.seek(t.data_offset + t.n_bytes - 3)
        f.write(bytes([b[0] ^ 0x5A]))


def test_a_worker_whose_file_differs_is_refused(tiny, workers, tmp_path):
    _, path, _ = tiny("glm4", "q8_0")
    bad = str(tmp_path / "same-header.gguf")
    flip_a_weight(path, bad, "blk.1.ffn_down.weight")
    from glmcpu.gguf import GGUFFile
    assert GGUFFile(bad).fingerprint() == GGUFFile(path).fingerprint()      # the header can't tell
    _, eps = workers(bad, 1, "--insecure")
    with pytest.raises(ClusterError) as e:
        glmcpu.load(path, threads=1, workers=eps, insecure=True)
    msg = str(e.value)
    assert "differs from the root's" in msg and "layer 1" in msg and "\n" not in msg
    # the file it has is used for what matches nothing: as another model, the root's file works
    _, good = workers(path, 1, "--insecure")
    m = glmcpu.load(path, threads=1, workers=good, insecure=True)
    assert greedy(m) == greedy(glmcpu.load(path, threads=1))
    m.cluster.close()


@pytest.mark.parametrize("family", ["glm4", "glm4_moe"])
def test_worker_without_the_file_gets_its_share_once(tiny, tmp_path, family):
    """No copy of the GGUF: the root sends the worker's slices, the worker caches them under their
    digests, and the next start of the worker needs nothing."""
    _, path, _ = tiny(family, "q8_0")
    want = greedy(glmcpu.load(path, threads=1))
    cache = str(tmp_path / "cache")
    for round_ in range(2):
        p, ep = start_worker(None, "--insecure", "--cache", cache)
        try:
            m = glmcpu.load(path, threads=1, workers=[ep], insecure=True)
            assert greedy(m) == want
            shipped = m.cluster.shipped
            if round_ == 0:
                full = sum(t.n_bytes for t in m.file.tensors.values())
                assert 0 < shipped < full       # only this worker's slices, not the file
            else:
                assert shipped == 0             # all from the worker's cache
            m.cluster.close()
        finally:
            p.kill()
            p.wait()


def test_poisoned_shares_change_no_answer(tiny, tmp_path):
    """A peer re-putting other bytes under a stored share's name is refused; bytes changed on disk
    are noticed before use (and fetched again), also after a restart."""
    from glmcpu.net.link import Client, LinkError
    _, path, _ = tiny("glm4", "q8_0")
    want = greedy(glmcpu.load(path, threads=1))
    cache = tmp_path / "cache"
    p, ep = start_worker(None, "--insecure", "--cache", str(cache))
    try:
        m = glmcpu.load(path, threads=1, workers=[ep], insecure=True)
        assert greedy(m) == want
        digests = sorted(m.cluster.digests.values())
        m.cluster.close()
        stored = sorted(f.name[:-len(".share")] for f in cache.glob("*.share"))
        assert stored == sorted(set(digests))
        # a peer (its own session, even one that loaded first) puts other bytes under a stored name
        peer = Client(ep, timeout=5)
        entries = [["vector", ["x"], [0], "<f4", [4]]]
        for meta in ({"s": "p" * 32, "digest": digests[0], "entries": entries},
                     {"s": "q" * 32, "digest": digests[1], "entries": entries}):
            with pytest.raises(LinkError, match="put"):
                peer.request("put", meta, [np.zeros(4, np.float32)])
        peer.close()
        m = glmcpu.load(path, threads=1, workers=[ep], insecure=True)
        assert m.cluster.shipped == 0 and greedy(m) == want
        m.cluster.close()
        # bytes changed on the worker's disk are caught by the digest before use
        victim = cache / (digests[0] + ".share")
        data = bytearray(victim.read_bytes())
        data[-5] ^= 0xFF
        victim.write_bytes(bytes(data))
    finally:
        p.kill()
        p.wait()
    p, ep = start_worker(None, "--insecure", "--cache", str(cache))        # and after a restart
    try:
        m = glmcpu.load(path, threads=1, workers=[ep], insecure=True)
        assert 0 < m.cluster.shipped and greedy(m) == want                   # that one share came again
        m.cluster.close()
    finally:
        p.kill()
        p.wait()


def test_cache_max_keeps_the_cache_small(tiny, tmp_path):
    _, path, _ = tiny("glm4", "q8_0")
    _, other, _ = tiny("glm", "q8_0")
    cache = tmp_path / "cache"
    p, ep = start_worker(None, "--insecure", "--cache", str(cache), "--cache-max", "0.0002")   # ~210 KB
    try:
        for f in (path, other, path):
            m = glmcpu.load(f, threads=1, workers=[ep], insecure=True)
            assert greedy(m) == greedy(glmcpu.load(f, threads=1))
            m.cluster.close()
            assert sum(x.stat().st_size for x in cache.iterdir()) <= 0.0002 * 2**30
    finally:
        p.kill()
        p.wait()


def test_stats_line(tiny, workers):
    _, path, _ = tiny("glm4_moe", "q8_0")
    _, eps = workers(path, 2, "--insecure")
    p = subprocess.run([sys.executable, "-m", "glmcpu", "run", path, "-p", "hi", "-n", "4", "--ignore-eos",
                        "--workers", ",".join(eps), "--insecure", "--stats"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "cluster, per token:" in p.stderr and "round trips" in p.stderr and "alive 2/2" in p.stderr


def test_plan_command_and_figures(tiny):
    _, path, _ = tiny("glm4_moe", "q8_0")
    p = subprocess.run([sys.executable, "-m", "glmcpu", "plan", path, "--workers",
                        "tcp://a:1,tcp://b:2", "--shares", "2,1,1", "--speed", "10",
                        "--link-mbit", "100"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "3 nodes: root 50%" in p.stdout and "round trips" in p.stdout and "predicted decode" in p.stdout
    assert "star: 2 nodes" in p.stdout and "mesh: 2 nodes" in p.stdout and "8 nodes" in p.stdout
    f = glmcpu.load(path).cfg
    import re

    def one_node(*extra):
        q = subprocess.run([sys.executable, "-m", "glmcpu", "plan", path, "--workers", "tcp://a:1", "--speed", "10",
                            *extra], capture_output=True, text=True)
        assert q.returncode == 0, q.stderr
        return float(re.search(r"one node: ([0-9.]+) tok/s", q.stdout).group(1))
    # a file cut short, predicted at 4x its depth: its layers' reads 4x (the head's once)
    assert one_node("--layers", str(4 * f.n_layer)) < 0.6 * one_node()
    plan = make_plan(f, ["root", "a", "b"], [1, 1, 1])
    assert all(sum(b - a for _, a, b in parts) == f.n_ff for parts in plan.tables["ffn"].values())
    assert all(sum(b - a for _, a, b in parts) == f.n_expert for parts in plan.tables["moe"].values())
    assert sum(b - a for _, a, b in plan.tables["head"][-1]) == f.n_vocab
    p = subprocess.run([sys.executable, "-m", "glmcpu", "worker", "--bind", "tcp://127.0.0.1:*"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "--insecure" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    for bad in ("1,x", "1,2,3,4"):
        p = subprocess.run([sys.executable, "-m", "glmcpu", "plan", path, "--workers", "tcp://a:1", "--shares", bad],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and "--shares" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("wire,rel", [("f16", 0.7), ("q8_0", 0.45)])
def test_smaller_wires(tiny, workers, wire, rel, cluster_topology):
    """f16 and Q8_0 activations and partial sums, over the star or the mesh (where every node adds
    the parts as they travel, its own too): near one process's logits, for fewer bytes."""
    _, path, _ = tiny("glm4_moe", "q8_0")
    single = glmcpu.load(path, threads=1)
    _, eps = workers(path, 2, "--insecure")
    want = single.logits(PROMPT)
    exact = glmcpu.load(path, threads=1, workers=eps, insecure=True)
    assert_same_logits(want, exact.logits(PROMPT), rel=0)
    exact.cluster.close()
    small = glmcpu.load(path, threads=1, workers=eps, insecure=True, wire=wire)
    got = small.logits(PROMPT)
    # rounding of the hidden state is of the order of the int8 activation rounding (~0.1 here)
    assert np.abs(got - want).max() < 0.2 and (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    a, b = exact.cluster.status(), small.cluster.status()
    assert b["sent_kib"] < rel * a["sent_kib"] and b["topology"] == cluster_topology, (a, b)
    assert list(small.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)) == list(
        small.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True))       # every node the same bits
    small.cluster.close()


def test_shares_follow_speed_within_memory():
    from glmcpu.plan import weigh
    s = weigh([20, 10, 10], [16, 8, 1], need_gb=10)       # the third can hold 9% of a 10 GB model
    assert abs(sum(s) - 1) < 1e-9 and s[2] <= 0.09 + 1e-9 and s[0] > s[1] > s[2]
    assert weigh([1, 1, 1], [0, 0, 0], 10) == [1 / 3] * 3   # memory unknown: speed alone


def test_plan_slices_whole_k_quant_blocks():
    """Wo and FFN-down column slices are whole 256-value super-blocks where the widths allow
    (K-quant files), whole 32-blocks otherwise (Q4_0/Q8_0, and llama.cpp's fallback types)."""
    from types import SimpleNamespace
    from glmcpu.plan import chunk_edges
    for head_dim, n_head, n_kv, n_ff, blk in [(128, 32, 2, 13696, 32), (128, 96, 8, 10944, 32),
                                             (64, 16, 4, 1024, 256), (16, 4, 2, 96, 32)]:
        cfg = SimpleNamespace(head_dim=head_dim, n_head=n_head, n_head_kv=n_kv, n_ff=n_ff, n_layer=2,
                              n_vocab=1000, d_model=64, n_expert=0)
        for nodes in (2, 3, 5):
            plan = make_plan(cfg, [f"n{i}" for i in range(nodes)], [1, 3, 2, 1, 1][:nodes])
            for parts in plan.tables["attn"].values():      # Wo columns: whole chunks of whole blocks
                assert all(a * head_dim in chunk_edges(n_head * head_dim, head_dim) for _, a, _ in parts)
                assert all(a * head_dim % 256 == 0 or blk == 32 and a * head_dim % 32 == 0 for _, a, _ in parts)
                assert sum(b - a for _, a, b in parts) == n_head
            for parts in plan.tables["ffn"].values():
                ffn_blk = 256 if n_ff % 256 == 0 else 32
                assert all(a % ffn_blk == 0 and a in chunk_edges(n_ff) for _, a, _ in parts)
                assert sum(b - a for _, a, b in parts) == n_ff


def test_chunks_are_as_even_as_the_blocks_allow():
    """About 12 chunks of whole blocks whose widths differ by one block at most, so two nodes of
    GLM-4-9B get 6,848 FFN units each (uniform 1,152-wide chunks gave 6,912 and 6,784: the root
    waited at every FFN sync) and 16 query heads each; a narrow matrix goes block by block."""
    from types import SimpleNamespace
    from glmcpu.plan import chunk_edges, local_edges
    for n, unit, blk in [(13696, 1, 32), (4096, 128, 256), (12288, 128, 256), (10944, 1, 32), (1024, 1, 256)]:
        e = chunk_edges(n, unit)
        w = np.diff(e)
        assert e[0] == 0 and e[-1] == n and (w > 0).all() and all(x % blk == 0 and x % unit == 0 for x in e[:-1])
        if n >= 2048:
            assert len(w) == 12 and w[:-1].max() - w[:-1].min() <= np.lcm(blk, unit)
    assert local_edges(chunk_edges(13696), 6848, 13696)[-1] == 6848
    cfg = SimpleNamespace(head_dim=128, n_head=32, n_head_kv=2, n_ff=13696, n_layer=1, n_vocab=151552,
                          d_model=4096, n_expert=0)
    plan = make_plan(cfg, ["root", "w1"])
    assert plan.tables["ffn"][0] == [(0, 0, 6848), (1, 6848, 13696)]
    assert plan.tables["attn"][0] == [(0, 0, 16), (1, 16, 32)]


def test_plan_predicts_from_speeds_and_link():
    from types import SimpleNamespace
    from glmcpu.plan import predict
    cfg = SimpleNamespace(head_dim=128, n_head=32, n_head_kv=2, n_ff=13696, n_layer=40, n_vocab=151552,
                          d_model=4096, n_expert=0)
    sizes = {"attn": {l: 20e6 for l in range(40)}, "ffn": {l: 100e6 for l in range(40)}, "moe": {},
             "head": 350e6, "root": 0}
    plan2 = make_plan(cfg, ["root", "w"])
    one = predict(make_plan(cfg, ["root"]), cfg, sizes, [20])
    bare = predict(plan2, cfg, sizes, [20, 20], latency_ms=0.05, sync_ms=0)
    two = predict(plan2, cfg, sizes, [20, 20], latency_ms=0.05)
    slow_link = predict(plan2, cfg, sizes, [20, 20], link_mbit=100, latency_ms=0.5)
    assert abs(one["tok_s"] - 20e9 / 5.15e9) < 0.01
    # halved reading but for the FFN's chunk grid (6912 | 6784 units) and 81 round trips
    assert 1.8 < bare["tok_s"] / one["tok_s"] < 1.97
    # each of the 81 syncs costs the star's 0.3 ms of software
    assert abs(1e3 / two["tok_s"] - 1e3 / bare["tok_s"] - 81 * 0.3) < 0.5
    assert slow_link["tok_s"] < two["tok_s"] and slow_link["network_ms"] > 80
    # over 100 Mbit/s a star sync waits for the 16 KB input to go out and the 32 KB partial to come
    # back, a mesh sync only for the partials crossing at once
    for mbit in (100, 1000):
        star, mesh = (predict(plan2, cfg, sizes, [20, 20], link_mbit=mbit, latency_ms=0.1, topology=t)
                      for t in ("star", "mesh"))
        assert mesh["tok_s"] > star["tok_s"], (mbit, star, mesh)
    star = predict(plan2, cfg, sizes, [20, 20], link_mbit=100, latency_ms=0.1, sync_ms=0)
    per_sync = 2 * 0.1 + (4096 * 4 + 120 + 8) * 8 / 1e5 + 4096 * 8 * 8 / 1e5      # ms: latencies, input, partial
    assert star["network_ms"] > 0.98 * 80 * per_sync          # (less the root's own part, computed meanwhile)
    mesh = predict(plan2, cfg, sizes, [20, 20], link_mbit=100, latency_ms=0.1, topology="mesh", sync_ms=0)
    assert mesh["network_ms"] < 80 * (0.1 + 4096 * 8 * 8 / 1e5) + 5        # + the head's best logits to the root


def test_plan_expects_the_busiest_node_of_a_moe_layer():
    """One token's 8 of 128 experts fall unevenly on 2 nodes: the layer waits for the node with
    more (E[max] of a hypergeometric split: 5.04 experts, not 4)."""
    from glmcpu.plan import expected_max_experts
    assert expected_max_experts([(0, 0, 128)], 128, 8, [1.0]) == 8
    two = expected_max_experts([(0, 0, 64), (1, 64, 128)], 128, 8, [1.0, 1.0])
    assert 4.95 < two < 5.15
    four = expected_max_experts([(i, 32 * i, 32 * i + 32) for i in range(4)], 128, 8, [1.0] * 4)
    assert 3.0 < four < 3.6
    # a node twice as fast is waited for half as long per expert
    fast = expected_max_experts([(0, 0, 64), (1, 64, 128)], 128, 8, [2.0, 1.0])
    assert fast < two


def test_cluster_runs_a_llama_cpp_q4_k_m_file(tiny, workers, tmp_path):
    """A Q4_K_M file (Q4_K + Q6_K rows, 256-value blocks) split across workers: same tokens."""
    _, src, _ = tiny("glm4", "f32", hidden=256, ffn=512, head_dim=64, layers=2)
    out = str(tmp_path / "q4_k_m.gguf")
    quantize = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M; "
                "sys.exit(llama_cpp.llama_model_quantize(%r.encode(), %r.encode(), p))" % (src, out))
    p = subprocess.run([sys.executable, "-c", quantize], capture_output=True, timeout=300)
    if p.returncode != 0:
        pytest.skip("llama-cpp-python cannot quantise here (not installed, or cannot run on this CPU)")
    one = glmcpu.load(out, threads=1)
    want, want_logits = greedy(one), one.logits(PROMPT)
    _, eps = workers(out, 2, "--insecure")
    m = glmcpu.load(out, threads=1, workers=eps, insecure=True, timeout=5, shares=[1, 1, 2])
    assert greedy(m) == want
    assert_same_logits(want_logits, m.logits(PROMPT), rel=0)
    m.cluster.close()


@pytest.mark.parametrize("mode", ["mtp", "lookup"])
def test_drafts_over_a_cluster(tiny, workers, mode):
    """Speculative decoding with workers: the guesses are checked in one round trip, rejected
    positions are simply written again (each request names its first position), and greedy
    text is one process's without drafts, token for token."""
    _, path, _ = tiny("glm4_moe", "q8_0", mtp=True, qk_norm=False, scaling=1.0)
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    one = glmcpu.load(path, threads=1, draft="none")
    want = list(one.generate(prompt, max_tokens=60, temperature=0, ignore_eos=True))
    _, eps = workers(path, 2, "--insecure")
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True, timeout=5, draft=mode, draft_tokens=2)
    assert list(m.generate(prompt, max_tokens=60, temperature=0, ignore_eos=True)) == want
    s = m.last_stats
    assert s["drafted"] > 0, s
    if mode == "lookup":
        assert s["accepted"] > 0 and m.cluster.stats["round_trips"] + m.cluster.stats["mesh_steps"] > 0
    m.cluster.close()


@pytest.mark.parametrize("fault", [None, "kill:attn:30", "stop:attn:45"])
def test_batched_sequences_over_a_cluster_equal_alone(tiny, workers, fault, cluster_topology):
    """serve --parallel over workers: 4 generations (greedy, seeded sampling, a repeat penalty)
    through 3 KV slots per worker, prompts joining between decode steps, each the tokens it
    gives alone in one process; a worker lost mid-batch (its KV heads with it) is a failover and
    a replay of every sequence, and changes no token."""
    from glmcpu.batching import Scheduler

    _, path, _ = tiny("glm4_moe", "q8_0")
    one = glmcpu.load(path, threads=1, draft="none")
    prompts = [PROMPT, [3, 4, 5], list(range(20, 61)), [99] + PROMPT[:4]]
    kws = [dict(temperature=0), dict(temperature=0.8, seed=5), dict(temperature=0.7, seed=1, top_k=0),
           dict(temperature=0, repeat_penalty=1.3)]

    def run(model, parallel, chunk=64):
        s = Scheduler(model, parallel, chunk=chunk)
        try:
            jobs = [s.submit(p, max_tokens=10, ignore_eos=True, **kw) for p, kw in zip(prompts, kws)]
            return [list(j.tokens()) for j in jobs], s.counts
        finally:
            s.close()
    want = []
    for p, kw in zip(prompts, kws):
        one.reset()
        want.append(run_one(one, p, kw))
    _, eps = workers(path, 2, "--insecure", faults=[fault, None])
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True, timeout=1.5, slots=3, draft="none")
    got, counts = run(m, 3, chunk=8)
    assert got == want
    assert counts["step_rows"] > counts["steps"] + counts["prompt_tokens"] / 8     # steps carried several sequences
    st = m.cluster.status()
    assert st["failovers"] == (fault is not None) and (st["replays"] >= 1) == (fault is not None), st
    with pytest.raises(glmcpu.GlmcpuError, match="loaded for 3"):
        Scheduler(m, 4)
    m.cluster.close()


def run_one(model, prompt, kw):
    """The tokens of one generation alone (a scheduler of one slot)."""
    from glmcpu.batching import Scheduler

    s = Scheduler(model, 1)
    try:
        return list(s.submit(prompt, max_tokens=10, ignore_eos=True, **kw).tokens())
    finally:
        s.close()


def test_a_worker_refuses_slots_past_its_memory(tiny, workers):
    """A KV cache per slot counts against --memory: 64 slots of 2048 positions (~48 MB of this
    worker's KV heads) are refused in 30 MB, 2 slots fit."""
    _, path, _ = tiny("glm4", "q8_0")
    _, eps = workers(path, 1, "--insecure", "--memory", "0.03")
    with pytest.raises(ClusterError, match="for 64 sequences"):
        glmcpu.load(path, threads=1, workers=eps, insecure=True, ctx=2048, slots=64, kv_type="f32")
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True, ctx=2048, slots=2, kv_type="f32")
    assert m.cluster.slots == 2 and m.cluster.status()["alive"] == "1/1"
    m.cluster.close()


def test_batched_steps_take_only_the_best_logits_from_workers(tiny, workers, cluster_topology):
    """Every sampler of a batched step needs only its top-k (greedy, top-k 40): the workers send
    each row's best logits alone (fewer bytes back), and each answer is still the one alone."""
    from glmcpu.batching import Scheduler

    _, path, _ = tiny("glm4", "q8_0")
    one = glmcpu.load(path, threads=1, draft="none")
    prompts = [PROMPT, [3, 4, 5], list(range(20, 41))]
    kws = [dict(temperature=0), dict(temperature=0.8, seed=5), dict(temperature=1.0, seed=2, top_k=40)]
    want = []
    for p, kw in zip(prompts, kws):
        one.reset()
        want.append(run_one(one, p, kw))
    _, eps = workers(path, 2, "--insecure")
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True, slots=3, draft="none")
    c = m.cluster
    sent = []
    exchange = c.exchange if cluster_topology == "star" else c.exchange_mesh

    def spy(mod, x, args):                  # the head's `top` of each batched step
        if mod.kind == "head":
            sent.append(c.top)
        return exchange(mod, x, args)
    if cluster_topology == "star":
        c.exchange = spy
    else:
        c.exchange_mesh = spy
    s = Scheduler(m, 3, chunk=8)
    try:
        jobs = [s.submit(p, max_tokens=10, ignore_eos=True, **kw) for p, kw in zip(prompts, kws)]
        got = [list(j.tokens()) for j in jobs]
    finally:
        s.close()
    assert got == want
    assert sent and min(sent) == 40 and s.counts["step_rows"] > s.counts["steps"]
    m.cluster.close()
